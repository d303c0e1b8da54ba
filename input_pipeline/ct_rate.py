"""Scans of a CT-RATE-style data set: volumes, TotalSegmentator outputs, report and label tables."""

from __future__ import annotations

import csv
import dataclasses
import os

# split -> (folder under dataset/, report table, label table) as published by CT-RATE ("test" is the demo's own).
SPLITS = {
    "train": ("train", "train_reports.csv", "train_predicted_labels.csv"),
    "valid": ("valid", "validation_reports.csv", "valid_predicted_labels.csv"),
    "test": ("test", "test_reports.csv", "test_predicted_labels.csv"),
}


@dataclasses.dataclass(frozen=True)
class Scan:
    id: str
    split: str
    image: str
    segmentation: str
    findings: str
    impression: str
    labels: dict[str, int]


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def volume_path(root: str, split_dir: str, volume: str) -> str:
    """dataset/<split>/<patient>/<scan>/<volume>: train_1_a_1.nii.gz lies in train_1/train_1_a/."""
    parts = volume.split("_")
    return os.path.join(root, "dataset", split_dir, "_".join(parts[:2]), "_".join(parts[:3]), volume)


def segmentation_path(seg_root: str, split_dir: str, volume: str) -> str:
    """<seg_root>/<split>/<volume> (multi-label file) or the folder of parts <seg_root>/<split>/<volume stem>/."""
    path = os.path.join(seg_root, split_dir, volume)
    folder = path.removesuffix(".gz").removesuffix(".nii")
    return folder if not os.path.exists(path) and os.path.isdir(folder) else path


def list_scans(root: str, split: str, seg_root: str | None = None) -> tuple[list[Scan], list[str]]:
    """Scans of one split and the label table's column names (empty when the split has no label table)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; CT-RATE-style splits are {sorted(SPLITS)}")
    split_dir, report_csv, label_csv = SPLITS[split]
    seg_root = seg_root or os.path.join(root, "segmentations")
    report_path = os.path.join(root, "radiology_text_reports", report_csv)
    if not os.path.exists(report_path):
        raise FileNotFoundError(f"report table {report_path} not found")
    label_path = os.path.join(root, "multi_abnormality_labels", label_csv)
    label_rows = _read_csv(label_path) if os.path.exists(label_path) else []
    columns = [c for c in (label_rows[0] if label_rows else {}) if c != "VolumeName"]
    labels = {r["VolumeName"]: {c: int(float(r[c])) for c in columns} for r in label_rows}
    scans = []
    for r in _read_csv(report_path):
        name = r["VolumeName"]
        scans.append(Scan(id=name.removesuffix(".gz").removesuffix(".nii"), split=split,
                          image=volume_path(root, split_dir, name), segmentation=segmentation_path(seg_root,
                          split_dir, name), findings=r.get("Findings_EN") or "",
                          impression=r.get("Impressions_EN") or "", labels=labels.get(name, {})))
    return scans, columns
