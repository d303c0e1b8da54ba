"""Nothing lost: every bad input of a JSONL manifest ends in rejects.jsonl with a reason; strict mode; exit rule."""

import gzip
import json
import logging

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import manifest_config, phantom_ct

from input_pipeline import prepare, tfdata

pytestmark = pytest.mark.slow  # subprocesses or training: not in the fast lane

FINDINGS = "Mild emphysema in both lungs. The liver is normal."
IMPRESSION = "Emphysema."


def _save(path, array, affine=None):
    nib.Nifti1Image(array, np.diag([10.0, 10.0, 10.0, 1.0]) if affine is None else affine).to_filename(str(path))
    return path.name


def _entry(sid, image, seg="seg.nii.gz", findings=FINDINGS, impression=IMPRESSION, **kw):
    return json.dumps({"id": sid, "image": image, "segmentation": seg, "findings": findings,
                       "impression": impression, **kw}).encode()


@pytest.fixture
def bad_manifest(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    hu, seg = phantom_ct()
    _save(d / "ct.nii.gz", hu)
    _save(d / "seg.nii.gz", seg)
    _save(d / "seg_empty.nii.gz", np.zeros_like(seg))
    _save(d / "seg_other_grid.nii.gz", seg[:-2])
    (d / "empty.nii.gz").write_bytes(b"")
    full = gzip.compress(nib.Nifti1Image(hu, np.diag([10.0, 10.0, 10.0, 1.0])).to_bytes())
    (d / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    _save(d / "four_d.nii.gz", np.stack([hu, hu], -1))
    nan = hu.astype(np.float32)
    nan[5, 5, 5] = np.nan
    _save(d / "nan.nii.gz", nan)
    mr = np.random.default_rng(0).uniform(0, 4000, hu.shape).astype(np.float32)
    _save(d / "mr.nii.gz", mr)
    lines = [
        _entry("ok1", "ct.nii.gz", labels={"Emphysema": 1}),
        _entry("truncated", "truncated.nii.gz"),
        _entry("zero_bytes", "empty.nii.gz"),
        _entry("not_3d", "four_d.nii.gz"),
        _entry("non_finite", "nan.nii.gz"),
        _entry("mr", "mr.nii.gz"),
        _entry("grid", "ct.nii.gz", seg="seg_other_grid.nii.gz"),
        _entry("empty_seg", "ct.nii.gz", seg="seg_empty.nii.gz"),
        _entry("no_report", "ct.nii.gz", findings="", impression=" "),
        _entry("no_anatomy", "ct.nii.gz", findings="Unremarkable study.", impression="Nothing to report."),
        _entry("ok1", "ct.nii.gz"),
        _entry("missing_file", "nowhere.nii.gz"),
        _entry("bad_image_and_report", "empty.nii.gz", findings="Not given.", impression=""),
        b'{"id": "latin1", "image": "ct.nii.gz", "segmentation": "seg.nii.gz", "findings": "L\xe9sion", '
        b'"impression": "x"}',
        b"{not json",
        _entry("ok2", "ct.nii.gz", labels={"Liver lesion": 0}),
        b"",
    ]
    path = d / "manifest.jsonl"
    path.write_bytes(b"\n".join(lines))
    return path


EXPECTED = {  # id -> a piece of its reason
    "truncated": "image could not be read", "zero_bytes": "empty (0 bytes)", "not_3d": "3D",
    "non_finite": "non-finite", "mr": "does not look like CT", "grid": "not on the grid",
    "empty_seg": "none of the configured anatomies", "no_report": "missing or empty report",
    "no_anatomy": "no anatomy text", "ok1": "duplicate id", "missing_file": "image not found",
    # Both the image and the report fail: reported for the image first.
    "bad_image_and_report": "image file is empty (0 bytes)",
    "manifest.jsonl line 14": "not valid UTF-8", "manifest.jsonl line 15": "not valid JSON",
}


def test_every_bad_input_is_rejected_with_a_reason(bad_manifest, tmp_path, caplog):
    out = tmp_path / "records"
    with caplog.at_level(logging.INFO):  # no line of the manifest names the evaluation split "valid"
        manifest = prepare.prepare(manifest_config(eval_split="valid"), str(bad_manifest), str(out), progress=False)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert all(set(r) == {"id", "split", "reason"} for r in rejects)
    got = {r["id"]: r["reason"] for r in rejects}
    assert set(got) == set(EXPECTED), got
    for sid, piece in EXPECTED.items():
        assert piece in got[sid], (sid, got[sid])
    assert got["bad_image_and_report"].startswith("image file is empty (0 bytes)") and \
        got["bad_image_and_report"].endswith("; the report is unusable too (missing or empty report)")
    assert manifest["splits"] == {"train": 2, "valid": 0} and manifest["rejected"] == len(EXPECTED)
    assert "split 'valid' holds no scans (the source lists none for it (no manifest line names it))" in caplog.text
    with pytest.raises(ValueError, match="split 'valid' holds no scans in "):
        next(tfdata.eval_batches(str(out), "valid", batch_size=2, size_zyx=(8, 8, 8)))
    assert manifest["label_columns"] == ["Emphysema", "Liver lesion"]
    ds = tfds.builder_from_directory(str(out)).as_dataset(split="train")
    examples = {e["id"].decode(): e for e in ds.as_numpy_iterator()}
    assert sorted(examples) == ["ok1", "ok2"]
    # A label left out of a manifest row is "unknown" (-1), not negative.
    assert examples["ok1"]["targets"].tolist() == [1, -1] and examples["ok2"]["targets"].tolist() == [-1, 0]
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "rejected 1: not CT (implausible HU)" in logs and "rejected 1: undecodable text encoding" in logs
    assert "emphysema in both" not in logs.lower() and "nothing to report" not in logs.lower()


def test_strict_raises_on_any_reject(bad_manifest, tmp_path):
    out = tmp_path / "records"
    with pytest.raises(RuntimeError, match="strict"):
        prepare.prepare(manifest_config(strict=True), str(bad_manifest), str(out), progress=False)
    assert len((out / "rejects.jsonl").read_text().splitlines()) == len(EXPECTED)


def test_nothing_written_raises(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    (d / "empty.nii.gz").write_bytes(b"")
    (d / "m.jsonl").write_bytes(_entry("a", "empty.nii.gz") + b"\n" + _entry("b", "ct.nii.gz", findings=""))
    out = tmp_path / "records"
    with pytest.raises(RuntimeError, match="nothing could be written"):
        prepare.prepare(manifest_config(), str(d / "m.jsonl"), str(out), progress=False)
    reasons = {json.loads(x)["id"]: json.loads(x)["reason"] for x in (out / "rejects.jsonl").read_text().splitlines()}
    assert "empty (0 bytes)" in reasons["a"] and "image not found" in reasons["b"]
