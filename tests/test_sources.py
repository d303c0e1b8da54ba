"""Sources of scans: CT-RATE metadata (geometry + HU), JSONL manifests, fVLM decomposition files, resume."""

import csv
import filecmp
import glob
import json
import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import ROOT, manifest_config, phantom_ct

from configs import demo
from input_pipeline import ct_rate, demo_data, label_packing, prepare, preprocess, sources

FINDINGS = "Mild emphysema in both lungs. The liver is normal."


def _examples(out, split="train"):
    """Records read through tfds, with the packed labels unpacked into "labels"."""
    builder = tfds.builder_from_directory(str(out))
    k = label_packing.packing_factor(builder.info.features["text_tokens"].shape[0])
    examples = {}
    for e in builder.as_dataset(split=split).as_numpy_iterator():
        e["labels"] = label_packing.unpack_labels(e["labels_packed"], k, e["image"].shape[2])
        examples[e["id"].decode()] = e
    return examples


def _write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# -------------------------------------------------------------------------------------------------------------
# CT-RATE metadata
# -------------------------------------------------------------------------------------------------------------
# True geometry: stored in LPS voxel order, anisotropic, off-centre; HU stored as uint16 = HU + 1024.
SX, SY, SZ = 6.0, 7.5, 12.0
ORIGIN_RAS = np.array([45.5, 52.25, -60.0])
TRUE_AFFINE = np.array([[-SX, 0, 0, ORIGIN_RAS[0]], [0, -SY, 0, ORIGIN_RAS[1]], [0, 0, SZ, ORIGIN_RAS[2]],
                        [0, 0, 0, 1.0]])
META = {"XYSpacing": f"[{SX}, {SY}]", "ZSpacing": str(SZ), "RescaleSlope": "1", "RescaleIntercept": "-1024",
        "ImagePositionPatient": f"[{-ORIGIN_RAS[0]}, {-ORIGIN_RAS[1]}, {ORIGIN_RAS[2]}]",
        "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]", "Manufacturer": "X"}


def _stored_like_ct_rate(path, hu):
    """Raw uint16 values and an identity header whose own scl_slope/scl_inter must not be applied on top."""
    img = nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.uint16), np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    img.to_filename(str(path))


def test_metadata_affine_and_raw_rescale(tmp_path):
    hu, _ = phantom_ct()
    _stored_like_ct_rate(tmp_path / "v.nii.gz", hu)
    geometry = ct_rate.geometry_from_metadata(META)
    vol, aff = preprocess.load_ct(tmp_path / "v.nii.gz", geometry)
    np.testing.assert_array_equal(vol, hu.astype(np.float32))
    np.testing.assert_allclose(aff, TRUE_AFFINE, atol=1e-9)
    # Oblique cosines: the slice axis is their cross product, LPS -> RAS negates x and y.
    c, s = np.cos(0.3), np.sin(0.3)
    aff = preprocess.metadata_affine([1, 2], 3, [1, 2, 3], [c, s, 0, -s, c, 0])
    np.testing.assert_allclose(aff[:3, :3], np.diag([-1, -1, 1]) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
                               @ np.diag([1, 2, 3]), atol=1e-12)
    np.testing.assert_allclose(aff[:3, 3], [-1, -2, 3])


@pytest.mark.slow
def test_ct_rate_metadata_gives_true_geometry_and_hu(tmp_path):
    hu, seg = phantom_ct()
    raw = tmp_path / "raw"
    d = raw / "dataset" / "train" / "train_1" / "train_1_a"
    d.mkdir(parents=True)
    (raw / "segmentations" / "train").mkdir(parents=True)
    for vol in ("train_1_a_1", "train_1_a_2"):
        _stored_like_ct_rate(d / f"{vol}.nii.gz", hu)
        nib.Nifti1Image(seg, np.eye(4)).to_filename(str(raw / "segmentations" / "train" / f"{vol}.nii.gz"))
    _write_csv(raw / "radiology_text_reports" / "train_reports.csv", [
        {"VolumeName": f"train_1_a_{i}.nii.gz", "Findings_EN": FINDINGS, "Impressions_EN": "Emphysema."}
        for i in (1, 2)])
    _write_csv(raw / "metadata" / "train_metadata.csv", [{"VolumeName": "train_1_a_1.nii.gz", **META}])
    # Row 2 of the report table holds Latin-1 bytes: that row is rejected, the others are kept.
    with open(raw / "radiology_text_reports" / "train_reports.csv", "ab") as f:
        f.write(b"train_1_a_2.nii.gz,L\xe9sion pulmonaire.,x\n")
    rows = (raw / "radiology_text_reports" / "train_reports.csv").read_bytes().split(b"\n")
    (raw / "radiology_text_reports" / "train_reports.csv").write_bytes(b"\n".join([rows[0], rows[1], rows[3], b""]))

    # Ground truth: the same scan written with its true geometry in HU.
    truth = tmp_path / "truth"
    truth.mkdir()
    nib.Nifti1Image(hu, TRUE_AFFINE).to_filename(str(truth / "ct.nii.gz"))
    nib.Nifti1Image(seg, TRUE_AFFINE).to_filename(str(truth / "seg.nii.gz"))
    cfg = manifest_config("ct_rate")
    kw = prepare.prep_kwargs(cfg.prep)
    expected = preprocess.preprocess_scan(truth / "ct.nii.gz", truth / "seg.nii.gz", **kw)
    fixed = preprocess.preprocess_scan(d / "train_1_a_1.nii.gz", raw / "segmentations" / "train" /
                                       "train_1_a_1.nii.gz", geometry=ct_rate.geometry_from_metadata(META), **kw)
    np.testing.assert_allclose(fixed["affine"], expected["affine"], atol=1e-9)  # world geometry
    np.testing.assert_array_equal(fixed["image"], expected["image"])
    unfixed = preprocess.preprocess_scan(d / "train_1_a_1.nii.gz", raw / "segmentations" / "train" /
                                         "train_1_a_1.nii.gz", **kw)
    assert not np.array_equal(unfixed["image"], expected["image"])  # without the table: 1 mm spacing, wrong

    out = tmp_path / "records"
    manifest = prepare.prepare(cfg, str(raw), str(out), progress=False)
    assert manifest["splits"] == {"train": 1}
    ex = _examples(out)["train_1_a_1"]
    np.testing.assert_array_equal(ex["image"], expected["image"])
    np.testing.assert_array_equal(ex["labels"], expected["labels"])
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["split"]) for r in rejects] == [("train_1_a_2", "train")]
    assert "not UTF-8" in rejects[0]["reason"]


@pytest.mark.slow
def test_demo_metadata_changes_nothing(tmp_path):
    raw = tmp_path / "raw"
    demo_data.generate_demo_dataset(str(raw), num_train=3, num_valid=1, num_test=1, progress=False)
    cfg = demo.get_config()
    cfg.data.workers, cfg.data.num_shards = 1, 1
    with_meta = prepare.prepare(cfg, str(raw), str(tmp_path / "a"), progress=False)
    assert ct_rate.list_split(str(raw), "train")[0][0].geometry is not None
    cfg.data.use_metadata = False
    without = prepare.prepare(cfg, str(raw), str(tmp_path / "b"), progress=False)
    assert with_meta == without and with_meta["rejected"] == 0
    files = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "a" / "fvlm_records-*")))
    assert len(files) == 3
    assert all(filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False) for f in files)


# -------------------------------------------------------------------------------------------------------------
# JSONL manifest, decomposition files, resume
# -------------------------------------------------------------------------------------------------------------
def _manifest(tmp_path, n=4, **extra):
    d = tmp_path / "raw"
    (d / "ct").mkdir(parents=True)
    (d / "seg").mkdir()
    lines = []
    for i in range(n):
        hu, seg = phantom_ct()
        hu[3 + i % 3, 5, 4] = -200 + 10 * i  # distinct images
        nib.Nifti1Image(hu, np.diag([10.0, 10.0, 10.0, 1.0])).to_filename(str(d / "ct" / f"{i}.nii.gz"))
        nib.Nifti1Image(seg, np.diag([10.0, 10.0, 10.0, 1.0])).to_filename(str(d / "seg" / f"{i}.nii.gz"))
        lines.append(json.dumps({"id": f"train_{i}_a_1", "image": f"ct/{i}.nii.gz", "segmentation": f"seg/{i}.nii.gz",
                                 "findings": FINDINGS, "impression": "Emphysema.",
                                 "labels": {"Emphysema": 1, f"X{i % 2}": 0}, **extra}))
    (d / "m.jsonl").write_text("\n".join(lines) + "\n")
    return d / "m.jsonl"


def test_manifest_source_paths_labels_and_splits(tmp_path):
    path = _manifest(tmp_path, 2)
    scans, columns, rejects = sources.read_manifest(str(path))
    assert columns == ["Emphysema", "X0", "X1"] and not rejects
    assert scans[0].split == "train" and os.path.isabs(scans[0].image) and os.path.exists(scans[0].image)
    with open(path, "a") as f:
        f.write(json.dumps({"id": "v", "image": "ct/0.nii.gz", "segmentation": "seg/0.nii.gz", "findings": FINDINGS,
                            "split": "valid", "labels": {"Emphysema": 2}}) + "\n")
        f.write(json.dumps({"id": "t", "image": "ct/0.nii.gz", "segmentation": "seg/0.nii.gz", "findings": FINDINGS,
                            "split": "elsewhere"}) + "\n")
    _, _, rejects = sources.read_manifest(str(path))
    assert [r["id"] for r in rejects] == ["v"] and "0 or 1" in rejects[0]["reason"]
    by_split, _, rejects = sources.list_all(manifest_config(), str(path), ["train"])
    assert len(by_split["train"]) == 2 and {r["id"] for r in rejects} == {"v", "t"}


def test_label_anatomy_text_negation_without_anatomy_words():
    a = sources.label_anatomy_text("No pleural effusion. Nodule of 6 mm in the right upper segment.", "lung")
    assert a.diseases == ("Lung nodule",) and not a.normal
    b = sources.label_anatomy_text("No nodules are seen. There is no consolidation.", "lung")
    assert b.normal and b.diseases == ()


@pytest.mark.slow
def test_decomposition_files(tmp_path):
    path = _manifest(tmp_path, 2)
    dec = tmp_path / "dec"
    dec.mkdir()
    (dec / "desc_info.json").write_text(json.dumps({
        "train_0_a": {"lung": "Centrilobular emphysema. No nodules.", "heart": "Heart size is normal.",
                      "bone": "Degenerative changes."}}))
    (dec / "conc_info.json").write_text(json.dumps({"train_0_a": {"lung": "Pleural effusion on the right."}}))
    cfg = manifest_config(decomposition_dir=str(dec))
    out = tmp_path / "records"
    manifest = prepare.prepare(cfg, str(path), str(out), progress=False)
    ex = _examples(out)
    anat, dis = manifest["anatomies"], manifest["diseases"]
    e0, lung, heart = ex["train_0_a_1"], anat.index("lung"), anat.index("heart")
    assert {a for a, h in zip(anat, e0["has_text"]) if h} == {"lung", "heart"}
    assert sorted(d for d, v in zip(dis, e0["disease"][lung]) if v) == ["Emphysema", "Pleural effusion"]
    assert e0["normal"][heart] and not e0["normal"][lung]
    text = "Centrilobular emphysema. No nodules. Pleural effusion on the right."
    assert e0["text_id"][lung] == prepare.text_id(text)
    # train_1 is not in the files: the built-in splitter (findings mention lung and liver).
    assert {a for a, h in zip(anat, ex["train_1_a_1"]["has_text"]) if h} == {"lung", "liver"}
    # A configuration without the field still works (tested throughout); an empty one means the built-in splitter.
    assert manifest_config().data.get("decomposition_dir", "") == ""


@pytest.mark.slow
def test_resume_recomputes_only_missing_and_gives_identical_records(tmp_path, caplog):
    path = _manifest(tmp_path, 5)
    out = tmp_path / "records"
    cfg = manifest_config()
    with caplog.at_level(logging.INFO, logger="input_pipeline.prepare"):
        prepare.prepare(cfg, str(path), str(out), progress=False)
    assert "images: 5 to preprocess, 0 already in the cache" in caplog.text
    records = sorted(glob.glob(str(out / "fvlm_records-*")))
    first = {p: open(p, "rb").read() for p in records}
    cache = {i: prepare.cache_path(str(out), "train", f"train_{i}_a_1") for i in range(5)}
    mtimes = {i: os.stat(p).st_mtime_ns for i, p in cache.items()}
    # Interruption: two scans never reached the cache, no records were written.
    for i in (1, 3):
        os.remove(cache[i])
    for p in records:
        os.remove(p)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="input_pipeline.prepare"):
        prepare.prepare(cfg, str(path), str(out), progress=False)
    assert "images: 2 to preprocess, 3 already in the cache" in caplog.text
    assert {p: open(p, "rb").read() for p in records} == first
    assert all(os.stat(cache[i]).st_mtime_ns == mtimes[i] for i in (0, 2, 4))
    # A changed input is recomputed (its cache entry is stale), the others are not.
    os.utime(tmp_path / "raw" / "ct" / "2.nii.gz", ns=(1, 1))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="input_pipeline.prepare"):
        prepare.prepare(cfg, str(path), str(out), progress=False)
    assert "images: 1 to preprocess, 4 already in the cache" in caplog.text
    assert {p: open(p, "rb").read() for p in records} == first


@pytest.mark.slow
def test_records_are_byte_identical_across_processes(tmp_path):
    path = _manifest(tmp_path, 2)
    prepare.prepare(manifest_config(), str(path), str(tmp_path / "here"), progress=False)
    # Another process with another string-hash seed: the order of a tf.train.Example's features followed it.
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    script = ("import sys; sys.path.insert(0, 'tests'); from conftest import manifest_config; "
              "from input_pipeline import prepare; "
              f"prepare.prepare(manifest_config(), {str(path)!r}, {str(tmp_path / 'there')!r}, progress=False)")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, PYTHONHASHSEED=seed))
    files = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "here" / "fvlm_records-*")))
    assert files and files == sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "there" / "fvlm_records-*")))
    assert all(filecmp.cmp(tmp_path / "here" / f, tmp_path / "there" / f, shallow=False) for f in files)


HEAD_CT_VOCABULARY = """\
skull:
  words: [skull, calvarium, calvarial]
  diseases:
    Skull fracture: [fracture, fractures]
brain:
  words: [brain, cerebral, intracranial]
  diseases:
    Intracranial hemorrhage: [hemorrhage, haemorrhage, bleed]
"""


@pytest.mark.slow
def test_head_ct_manifest_with_its_own_vocabulary(tmp_path):
    d = tmp_path / "raw"
    (d / "ct").mkdir(parents=True)
    hu, seg = phantom_ct()
    head = np.where(seg == 10, 91, np.where(seg == 5, 90, 0)).astype(np.uint8)  # TotalSegmentator skull, brain
    nib.Nifti1Image(hu, np.diag([10.0, 10.0, 10.0, 1.0])).to_filename(str(d / "ct" / "0.nii.gz"))
    nib.Nifti1Image(head, np.diag([10.0, 10.0, 10.0, 1.0])).to_filename(str(d / "ct" / "seg0.nii.gz"))
    reports = [("Acute bleed in the left cerebral hemisphere. The calvarium is intact.", "Intracranial hemorrhage."),
               ("No intracranial hemorrhage. Depressed skull fracture on the right.", "Skull fracture.")]
    (d / "m.jsonl").write_text("".join(json.dumps({
        "id": f"head{i}", "image": "ct/0.nii.gz", "segmentation": "ct/seg0.nii.gz", "findings": f,
        "impression": imp}) + "\n" for i, (f, imp) in enumerate(reports)))
    (tmp_path / "head_ct.yaml").write_text(HEAD_CT_VOCABULARY)
    cfg = manifest_config()
    cfg.prep.anatomies = {"skull": ["skull"], "brain": ["brain"]}  # the user's order, not sorted
    out = tmp_path / "records"
    with pytest.raises(ValueError, match="'skull' has no words in prep.report_vocabulary"):
        prepare.prepare(cfg, str(d / "m.jsonl"), str(out), progress=False)
    cfg.prep.report_vocabulary_file = str(tmp_path / "head_ct.yaml")
    manifest = prepare.prepare(cfg, str(d / "m.jsonl"), str(out), progress=False)
    assert manifest["anatomies"] == ["skull", "brain"] and manifest["rejected"] == 0
    assert manifest["diseases"] == ["Intracranial hemorrhage", "Skull fracture"]
    ex = _examples(out)
    assert ex["head0"]["has_text"].all() and ex["head1"]["has_text"].all()
    assert ex["head0"]["disease"].tolist() == [[False, False], [True, False]]  # skull intact, brain bleeding
    assert ex["head1"]["disease"].tolist() == [[False, True], [False, False]]
    assert ex["head0"]["normal"].tolist() == [True, False]
    # Label values follow the anatomy order: 1 = skull (class 91), 2 = brain (class 90).
    assert set(np.unique(ex["head0"]["labels"])) == {0, 1, 2}
    assert (ex["head0"]["labels"] == 1).sum() > (ex["head0"]["labels"] == 2).sum()  # the larger region is skull
