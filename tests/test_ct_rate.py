"""CT-RATE exactly as downloaded: tables inside dataset/, the corrected dataset/<split>_fixed/ volumes, the metadata
rescale applied once, report placeholders, and `configs/ct_rate.py:runlocal` end to end (prepare to predict) on a
fabricated copy.

The fabricated copies use the download's file and column names (../shared/FVLM_REFERENCE.md, "Data"): tiny noisy
phantoms with TotalSegmentator v2 multi-label files."""

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

from input_pipeline import ct_rate, preprocess, report_split

REPORT_COLUMNS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
METADATA_COLUMNS = ["VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept",
                    "ImagePositionPatient", "ImageOrientationPatient", "Manufacturer"]
LABEL_COLUMNS = ["Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
                 "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
                 "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
                 "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
                 "Interlobular septal thickening"]
# CT-RATE's split names: volume folder, report/metadata table prefix, label table prefix.
SPLIT_NAMES = {"train": ("train", "train", "train"), "valid": ("valid", "validation", "valid")}
SPACING_XYZ = (6.0, 6.0, 12.0)
META = {"XYSpacing": "[6.0, 6.0]", "ZSpacing": "12.0", "RescaleSlope": "1", "RescaleIntercept": "-1024",
        "ImagePositionPatient": "[-96.0, -84.0, -60.0]", "ImageOrientationPatient": "[1, 0, 0, 0, 1, 0]",
        "Manufacturer": "SIEMENS"}


def write_csv(path, rows, columns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def chest_phantom(rng, shape_xyz=(32, 28, 12)):
    """(HU int16, TotalSegmentator v2 labels uint8) of a tiny noisy chest, stored (x, y, z): lungs (5 lobes),
    heart, esophagus and aorta; air with scanner noise (sd 20 HU), so twice-rescaled air is not one value."""
    x, y, z = shape_xyz
    hu = rng.normal(-1000, 20, shape_xyz)
    seg = np.zeros(shape_xyz, np.uint8)
    body = (slice(3, x - 3), slice(3, y - 3), slice(0, z))
    hu[body] = rng.normal(40, 20, hu[body].shape)
    half = z // 2
    lungs = {10: (slice(5, 14), slice(5, y - 5), slice(half, z)), 11: (slice(5, 14), slice(5, y - 5), slice(0, half)),
             12: (slice(x - 14, x - 5), slice(5, y - 5), slice(2 * z // 3, z)),
             13: (slice(x - 14, x - 5), slice(5, y - 5), slice(half, 2 * z // 3)),
             14: (slice(x - 14, x - 5), slice(5, y - 5), slice(0, half))}
    for label, box in lungs.items():
        hu[box] = rng.normal(-850, 30, hu[box].shape)
        seg[box] = label
    for label, box, value in ((51, (slice(14, x - 14), slice(6, 14), slice(1, half + 2)), 45),  # heart
                              (15, (slice(14, 16), slice(y - 8, y - 6), slice(0, z)), 30),  # esophagus
                              (52, (slice(16, 18), slice(y - 12, y - 9), slice(0, z)), 180)):  # aorta
        hu[box] = rng.normal(value, 15, hu[box].shape)
        seg[box] = label
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), seg


def report(rng, labels):
    """Findings and impression that name each label's anatomy and state or negate it."""
    anatomy = {**{d: "lungs" for d in LABEL_COLUMNS[7:]}, "Cardiomegaly": "heart", "Pericardial effusion": "heart",
               "Coronary artery wall calcification": "heart", "Hiatal hernia": "esophagus",
               "Arterial wall calcification": "aorta", "Medical material": "mediastinum",
               "Lymphadenopathy": "mediastinum"}
    findings = [f"The {anatomy[d]} show {d.lower()}." if v else f"The {anatomy[d]} show no {d.lower()}."
                for d, v in labels.items() if rng.random() < 0.7]
    positives = [d for d, v in labels.items() if v]
    impression = f"{positives[0]} in the {anatomy[positives[0]]}." if positives else "Not given."
    return " ".join(findings) or "The lungs are clear.", impression


def write_ct_rate_copy(root: Path, scans: dict, *, seed: int = 0, fixed_splits=(), tables_inside=True):
    """A small CT-RATE copy as downloaded: {split: [volume names]}. Volumes of `fixed_splits` are corrected copies
    in dataset/<split>_fixed/ (HU, true geometry in the header); the others are stored like the originals in
    dataset/<split>/ (raw values = HU + 1024, a 1 mm identity header) with a metadata row each. TotalSegmentator
    multi-label files, as if run on the corrected volumes, in segmentations/<split>/. Tables inside dataset/, or
    beside it with `tables_inside=False`. Returns {volume name: HU array}."""
    rng = np.random.default_rng(seed)
    tables = root / "dataset" if tables_inside else root
    affine = np.asarray(ct_rate.geometry_from_metadata(META)["affine"])
    truth = {}
    for split, names in scans.items():
        folder, table, label_table = SPLIT_NAMES[split]
        fixed = split in fixed_splits
        reports, labels, metadata = [], [], []
        for k, name in enumerate(names):
            hu, seg = chest_phantom(rng)
            truth[name] = hu
            parts = name.split("_")
            d = root / "dataset" / (f"{folder}_fixed" if fixed else folder) / "_".join(parts[:2]) / "_".join(parts[:3])
            d.mkdir(parents=True, exist_ok=True)
            if fixed:
                nib.Nifti1Image(hu, affine).to_filename(str(d / f"{name}.nii.gz"))
            else:
                nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.uint16), np.eye(4)).to_filename(
                    str(d / f"{name}.nii.gz"))
            (root / "segmentations" / folder).mkdir(parents=True, exist_ok=True)
            nib.Nifti1Image(seg, affine).to_filename(str(root / "segmentations" / folder / f"{name}.nii.gz"))
            row = {c: (k + j) % 2 for j, c in enumerate(LABEL_COLUMNS)}  # both classes of every label in a split
            findings, impression = report(rng, row)
            reports.append({"VolumeName": f"{name}.nii.gz", "ClinicalInformation_EN": "Not given.",
                            "Technique_EN": "Non-contrast axial CT of the chest.", "Findings_EN": findings,
                            "Impressions_EN": impression})
            labels.append({"VolumeName": f"{name}.nii.gz", **row})
            metadata.append({"VolumeName": f"{name}.nii.gz", **META})
        write_csv(tables / "radiology_text_reports" / f"{table}_reports.csv", reports, REPORT_COLUMNS)
        write_csv(tables / "multi_abnormality_labels" / f"{label_table}_predicted_labels.csv", labels,
                  ["VolumeName", *LABEL_COLUMNS])
        if not fixed:
            write_csv(tables / "metadata" / f"{table}_metadata.csv", metadata, METADATA_COLUMNS)
    return truth


# -------------------------------------------------------------------------------------------------------------
# Layout
# -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inside", [True, False], ids=["download_layout", "tables_beside_dataset"])
def test_tables_found_inside_or_beside_dataset(tmp_path, caplog, inside):
    write_ct_rate_copy(tmp_path, {"train": ["train_1_a_1", "train_1_a_2"]}, tables_inside=inside)
    with caplog.at_level(logging.INFO, logger="input_pipeline.ct_rate"):
        scans, columns, rejects = ct_rate.list_split(str(tmp_path), "train")
    where = tmp_path / "dataset" if inside else tmp_path
    assert f"reports {where / 'radiology_text_reports' / 'train_reports.csv'}" in caplog.text
    assert [s.id for s in scans] == ["train_1_a_1", "train_1_a_2"] and not rejects
    assert columns == LABEL_COLUMNS and scans[0].labels["Emphysema"] == 1
    assert scans[0].image == str(tmp_path / "dataset" / "train" / "train_1" / "train_1_a" / "train_1_a_1.nii.gz")
    assert scans[0].geometry is not None and scans[0].geometry["intercept"] == -1024
    with pytest.raises(FileNotFoundError, match="report table for split 'valid' not found: looked for .*dataset/"
                                                "radiology_text_reports/validation_reports.csv and "):
        ct_rate.list_split(str(tmp_path), "valid")


def test_corrected_volumes_are_read_with_their_headers(tmp_path, caplog):
    write_ct_rate_copy(tmp_path, {"valid": ["valid_1_a_1"]}, fixed_splits=("valid",))
    assert not (tmp_path / "dataset" / "metadata").exists()  # the corrected copies need no metadata table
    with caplog.at_level(logging.INFO, logger="input_pipeline.ct_rate"):
        (scan,), _, rejects = ct_rate.list_split(str(tmp_path), "valid")
    assert "valid_fixed (corrected copies: their headers are used)" in caplog.text and not rejects
    assert scan.image == str(tmp_path / "dataset" / "valid_fixed" / "valid_1" / "valid_1_a" / "valid_1_a_1.nii.gz")
    assert scan.segmentation == str(tmp_path / "segmentations" / "valid" / "valid_1_a_1.nii.gz")
    assert scan.geometry is None


def test_missing_metadata_table_or_row(tmp_path):
    write_ct_rate_copy(tmp_path, {"train": ["train_1_a_1", "train_2_a_1"]})
    table = tmp_path / "dataset" / "metadata" / "train_metadata.csv"
    rows = table.read_text().splitlines()
    table.write_text("\n".join(rows[:2]) + "\n")  # train_2_a_1 has no row
    scans, _, rejects = ct_rate.list_split(str(tmp_path), "train")
    assert [s.id for s in scans] == ["train_1_a_1"]
    assert rejects == [{"id": "train_2_a_1", "split": "train", "reason": "no row in the metadata table "
                        "train_metadata.csv: the stored header's spacing and values are not HU-corrected"}]
    table.unlink()
    with pytest.raises(FileNotFoundError, match=r"data.use_metadata: no metadata table for split 'train' \(looked "
                                                r"for .*dataset/metadata/train_metadata.csv and .*"):
        ct_rate.list_split(str(tmp_path), "train")
    scans, _, rejects = ct_rate.list_split(str(tmp_path), "train", use_metadata=False)
    assert len(scans) == 2 and not rejects and scans[0].geometry is None


def test_report_placeholders_are_empty(tmp_path):
    write_ct_rate_copy(tmp_path, {"train": ["train_1_a_1"]})
    path = tmp_path / "dataset" / "radiology_text_reports" / "train_reports.csv"
    write_csv(path, [{"VolumeName": "train_1_a_1.nii.gz", "ClinicalInformation_EN": "Not given.",
                      "Technique_EN": "x", "Findings_EN": " Not given. ", "Impressions_EN": "NOT GIVEN"}],
              REPORT_COLUMNS)
    (scan,), _, _ = ct_rate.list_split(str(tmp_path), "train")
    assert scan.findings == "" and scan.impression == ""
    assert [report_split.report_text(v) for v in (None, "n/a", "-", "Not given", "Not given yet.", " Clear. ")] == \
        ["", "", "", "", "Not given yet.", "Clear."]


# -------------------------------------------------------------------------------------------------------------
# The metadata rescale, applied once
# -------------------------------------------------------------------------------------------------------------
def test_rescale_applied_once_and_ambiguity_refused(tmp_path):
    hu, _ = chest_phantom(np.random.default_rng(1))
    geometry = ct_rate.geometry_from_metadata(META)
    stored = {"raw": (hu.astype(np.int32) + 1024).astype(np.uint16), "already_hu": hu}
    for kind, values in stored.items():
        nib.Nifti1Image(values, np.eye(4)).to_filename(str(tmp_path / f"{kind}.nii.gz"))
        vol, aff = preprocess.load_ct(tmp_path / f"{kind}.nii.gz", geometry)
        np.testing.assert_array_equal(vol, hu.astype(np.float32), err_msg=kind)  # HU either way, never HU - 1024
        np.testing.assert_allclose(aff, geometry["affine"])
    assert preprocess.choose_rescale(stored["raw"], 1, -1024) == "metadata"
    assert preprocess.choose_rescale(stored["already_hu"], 1, -1024) == "header"
    assert preprocess.choose_rescale(stored["already_hu"], 1, 0) == "metadata"  # the same values either way
    # An intercept that leaves both readings plausible: refused, never guessed.
    with pytest.raises(preprocess.ScanRejected, match="ambiguous Hounsfield units.*RescaleIntercept -30") as e:
        preprocess.choose_rescale(stored["already_hu"], 1, -30)
    assert e.value.category == "ambiguous HU rescale"
    nib.Nifti1Image(hu, np.eye(4)).to_filename(str(tmp_path / "ambiguous.nii.gz"))
    with pytest.raises(preprocess.ScanRejected, match="ambiguous"):
        preprocess.load_ct(tmp_path / "ambiguous.nii.gz", geometry | {"intercept": -30.0})


def test_looks_like_hu_on_the_real_ct(shared_data):
    hu = nib.load(str(shared_data / "totalseg_example" / "example_ct_sm.nii.gz")).get_fdata(dtype=np.float32)
    assert preprocess.looks_like_hu(hu)
    assert not preprocess.looks_like_hu(hu - 1024)  # rescaled twice: its air lies below -1200 HU
    assert not preprocess.looks_like_hu(hu + 1024)  # stored values never rescaled: no air
    assert preprocess.choose_rescale((hu + 1024).astype(np.uint16), 1, -1024) == "metadata"
    assert preprocess.choose_rescale(hu.astype(np.int16), 1, -1024) == "header"


# -------------------------------------------------------------------------------------------------------------
# configs/ct_rate.py:runlocal, prepare + train + eval + export in one CLI process, then predict
# -------------------------------------------------------------------------------------------------------------
# The smallest sizes that run (as configs/demo.py:tiny shrinks the demo): 2 steps of 4 scans, width 32, short texts,
# 2 record files per split, one worker. model.text.anatomy_len stays "p99", read from records/stats.json.
TINY_CT_RATE = ["--config.train.steps=2", "--config.train.batch_size=4", "--config.train.warmup_steps=1",
                "--config.train.checkpoint_every=2", "--config.train.log_every=1", "--config.train.methods=('fvlm',)",
                "--config.model.vision.width=32", "--config.model.text.width=32", "--config.model.embed_dim=32",
                "--config.model.vision.mlp_dim=64", "--config.model.text.mlp_dim=64",
                "--config.prep.vocab_size=160", "--config.prep.text_len=48", "--config.prep.report_len=96",
                "--config.model.text.max_len=96", "--config.data.num_shards=2", "--config.data.workers=1",
                "--config.data.shuffle_buffer=16", "--config.eval.batch_size=4"]


@pytest.mark.slow
def test_ct_rate_runlocal_end_to_end(tmp_path):
    raw = tmp_path / "CT-RATE"
    # train: originals (raw values, metadata rescale) with two reconstructions per scan; valid: corrected copies.
    write_ct_rate_copy(raw, {"train": [f"train_{p}_a_{r}" for p in range(1, 5) for r in (1, 2)],
                             "valid": [f"valid_{p}_a_1" for p in range(1, 5)]}, fixed_splits=("valid",))
    workdir = tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "run.py"), f"--config={ROOT / 'configs' / 'ct_rate.py'}:runlocal",
           f"--workdir={workdir}", "--mode=all", f"--config.data.root={raw}", *TINY_CT_RATE]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    manifest = json.loads((workdir / "records" / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 8, "valid": 4} and manifest["rejected"] == 0
    assert manifest["anatomies"] == ["lung", "heart", "esophagus", "aorta"]  # the config's order
    assert manifest["label_columns"] == LABEL_COLUMNS
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == {"fvlm"} and len(summary["fvlm"]["per_task"]) == 16
    assert (workdir / "export" / "fvlm" / "model.json").exists(), sorted(p.name for p in workdir.iterdir())
    assert "tokens per anatomy text (model.text.anatomy_len='p99'" in res.stderr

    # predict (in-process: the same code as --mode=predict) on the valid scans as a user has them (the corrected
    # volumes and TotalSegmentator's files), listed in a manifest: each task's probability is the score evaluation
    # gave the same scan from its record (the export is the step evaluation scored: eval.checkpoints="latest").
    from fvlm_jax import predict

    rows = [{"id": p.name.removesuffix(".nii.gz"), "image": str(p),
             "segmentation": str(raw / "segmentations" / "valid" / p.name)}
            for p in sorted((raw / "dataset" / "valid_fixed").glob("*/*/*.nii.gz"))]
    (tmp_path / "scans.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = predict.predict(str(workdir / "export" / "fvlm"), str(tmp_path / "scans.jsonl"), None,
                          str(tmp_path / "pred"), batch_size=2, workers=1, progress=False)
    assert out["errors"] == [] and sorted(out["written"]) == [r["id"] for r in rows]
    with open(workdir / "eval" / "scores_fvlm_valid.csv") as f:
        scores = {r["id"]: r for r in csv.DictReader(f)}
    compared = 0
    for r in rows:
        result = json.loads((tmp_path / "pred" / f"{r['id']}.json").read_text())
        # The phantom's lungs, esophagus and aorta run through its first and last slice: only the heart is whole.
        assert {a: v["status"] for a, v in result["anatomies"].items()} == {
            "lung": predict.CUT_BY_SCAN, "heart": predict.SCORED, "esophagus": predict.CUT_BY_SCAN,
            "aorta": predict.CUT_BY_SCAN}
        for task, prob in result["tasks"].items():
            assert prob == pytest.approx(float(scores[r["id"]][f"score:{task}"]), abs=1e-4), (r["id"], task)
            compared += 1
    assert compared == 4 * 3, compared  # the heart's 3 tasks in each of the 4 scans
