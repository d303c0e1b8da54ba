"""Preparation on a real CT with real TotalSegmentator outputs (../shared/data), through records and tfds."""

import csv
import json
import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import demo
from input_pipeline import label_packing, prepare

pytestmark = pytest.mark.slow  # subprocesses or training: not in the fast lane


def _write_table(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_prepare_real_ct_both_segmentation_layouts(tmp_path, shared_data, caplog):
    ex = shared_data / "totalseg_example"
    raw = tmp_path / "raw"
    # CT-RATE's download layout around the real CT (HU, true geometry: a corrected copy in dataset/train_fixed/,
    # tables inside dataset/, no metadata table needed): train_1 uses the multi-label file, train_2 the folder of
    # parts (same --fast segmentation), train_3 a report of placeholders (must be rejected with a reason).
    for vol, seg in (("train_1_a_1", ex / "example_seg_fast.nii.gz"), ("train_2_a_1", ex / "example_seg_parts"),
                     ("train_3_a_1", ex / "example_seg_fast.nii.gz")):
        d = raw / "dataset" / "train_fixed" / vol[:7] / vol[:9]
        d.mkdir(parents=True)
        os.symlink(ex / "example_ct_sm.nii.gz", d / f"{vol}.nii.gz")
        segdir = raw / "segmentations" / "train"
        segdir.mkdir(parents=True, exist_ok=True)
        os.symlink(seg, segdir / (f"{vol}.nii.gz" if seg.suffix == ".gz" else vol))
    findings = ("Small hypodense lesion in the liver. The spleen is normal in size. Both kidneys are unremarkable. "
                "Mild emphysema in the lower lobes. The abdominal aorta is normal in caliber.")
    _write_table(raw / "dataset" / "radiology_text_reports" / "train_reports.csv", [
        {"VolumeName": f"train_{i}_a_1.nii.gz", "Findings_EN": findings if i < 3 else "Not given.",
         "Impressions_EN": "Hypodense liver lesion." if i < 3 else "not given"} for i in (1, 2, 3)])
    _write_table(raw / "dataset" / "multi_abnormality_labels" / "train_predicted_labels.csv", [
        {"VolumeName": f"train_{i}_a_1.nii.gz", "Emphysema": 1, "Liver lesion": 1} for i in (1, 2, 3)])

    cfg = demo.get_config()
    cfg.data.threshold_split = cfg.data.eval_split = "train"
    cfg.data.workers, cfg.data.num_shards = 1, 1
    cfg.prep.spacing_xyz = (3.0, 3.0, 3.0)
    out = tmp_path / "records"
    with caplog.at_level(logging.INFO, logger="input_pipeline.ct_rate"):
        manifest = prepare.prepare(cfg, str(raw), str(out), progress=False)
    assert f"reports {raw / 'dataset' / 'radiology_text_reports' / 'train_reports.csv'}" in caplog.text
    assert "dataset/train_fixed (corrected copies: their headers are used)" in caplog.text
    assert manifest["splits"] == {"train": 2} and manifest["rejected"] == 1
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"id": "train_3_a_1", "split": "train", "reason": "missing or empty report"}]

    examples = list(tfds.builder_from_directory(str(out)).as_dataset(split="train").as_numpy_iterator())
    assert sorted(e["id"].decode() for e in examples) == ["train_1_a_1", "train_2_a_1"]
    k = label_packing.packing_factor(len(manifest["anatomies"]))
    for e in examples:
        e["labels"] = label_packing.unpack_labels(e["labels_packed"], k, e["image"].shape[2])
    np.testing.assert_array_equal(examples[0]["labels"], examples[1]["labels"])  # file == folder of parts
    np.testing.assert_array_equal(examples[0]["image"], examples[1]["image"])
    anatomies = manifest["anatomies"]
    present = {a: bool((examples[0]["labels"] == i + 1).any()) for i, a in enumerate(anatomies)}
    assert present == {"aorta": True, "esophagus": False, "heart": False, "kidney": True, "liver": True,
                       "lung": True, "spleen": True}
    ex0 = examples[0]
    liver = anatomies.index("liver")
    assert ex0["has_text"][liver] and not ex0["normal"][liver]
    assert ex0["disease"][liver][manifest["diseases"].index("Liver lesion")]
    assert ex0["normal"][anatomies.index("spleen")]
    # The 3 mm grid of a 122 x 101 x 30 scan at 3 mm: anatomy crop is no larger than the scan (z, y, x).
    assert ex0["image"].shape[0] <= 32 or ex0["image"].shape == tuple(cfg.prep.min_size_zyx)
    assert (ex0["image"][examples[0]["labels"] == anatomies.index("lung") + 1] < 100).mean() > 0.8  # air is dark
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["anatomy_present_rate"]["heart"] == 0.0
