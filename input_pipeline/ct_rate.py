"""Scans of a CT-RATE-style data set: volumes, TotalSegmentator outputs, report, label and metadata tables.

Tables are read as UTF-8 (a BOM is allowed). A row holding bytes that are not UTF-8 is not guessed at: it is
returned as a reject (its id and the column) and the other rows are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re

import numpy as np

from input_pipeline import preprocess

# split -> (folder under dataset/, report/metadata table prefix, label table) as published by CT-RATE ("test" is
# the demo's own).
SPLITS = {
    "train": ("train", "train", "train_predicted_labels.csv"),
    "valid": ("valid", "validation", "valid_predicted_labels.csv"),
    "test": ("test", "test", "test_predicted_labels.csv"),
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
    # External geometry and rescale of the image ({"affine", "slope", "intercept"}, see preprocess.load_ct);
    # None = the file's header is trusted.
    geometry: dict | None = None


def _undecodable(value: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in value)


def read_table(path: str, key: str = "VolumeName") -> tuple[list[dict[str, str]], list[dict]]:
    """Rows of a UTF-8 CSV table and the rows that are not valid UTF-8 ({"id", "reason"}; id = the key column
    with undecodable bytes replaced, or "<path> row N")."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8-sig", errors="surrogateescape")
    rows, bad = [], []
    for n, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2):
        cols = [c for c, v in row.items() if isinstance(v, str) and _undecodable(v)]
        if cols or (row.get(None)):
            name = (row.get(key) or "").encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            why = (f"column(s) {', '.join(cols)} hold bytes that are not UTF-8" if cols
                   else "the row has more fields than the header")
            bad.append({"id": name or f"{os.path.basename(path)} row {n}",
                        "reason": f"{os.path.basename(path)} row {n}: {why}"})
            continue
        rows.append(row)
    return rows, bad


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _numbers(text: str, n: int, what: str) -> list[float]:
    vals = [float(v) for v in _NUMBER.findall(text or "")]
    if len(vals) != n:
        raise ValueError(f"{what} {text!r}: expected {n} numbers")
    return vals


def geometry_from_metadata(row: dict[str, str]) -> dict:
    """{"affine", "slope", "intercept"} of one CT-RATE metadata row (see preprocess.metadata_affine).

    XYSpacing "[sx, sy]" gives the spacing along the first and second array axes, ZSpacing along the third,
    ImagePositionPatient the LPS origin, ImageOrientationPatient the LPS row then column cosines; HU = stored *
    RescaleSlope + RescaleIntercept. The affine is rounded to float32 like a NIfTI header's. Raises ValueError
    for a missing or malformed value.
    """
    xy = _numbers(row.get("XYSpacing", ""), 2, "XYSpacing")
    (z,) = _numbers(row.get("ZSpacing", ""), 1, "ZSpacing")
    ipp = _numbers(row.get("ImagePositionPatient", ""), 3, "ImagePositionPatient")
    iop = _numbers(row.get("ImageOrientationPatient", ""), 6, "ImageOrientationPatient")
    (slope,) = _numbers(row.get("RescaleSlope", ""), 1, "RescaleSlope")
    (intercept,) = _numbers(row.get("RescaleIntercept", ""), 1, "RescaleIntercept")
    if slope == 0:
        raise ValueError("RescaleSlope is 0")
    # Rounded to float32, the precision of a NIfTI header: the same numbers as in a fixed copy of the file.
    affine = preprocess.metadata_affine(xy, z, ipp, iop).astype(np.float32).astype(np.float64)
    return {"affine": tuple(tuple(float(v) for v in r) for r in affine), "slope": slope, "intercept": intercept}


def volume_path(root: str, split_dir: str, volume: str) -> str:
    """dataset/<split>/<patient>/<scan>/<volume>: train_1_a_1.nii.gz lies in train_1/train_1_a/."""
    parts = volume.split("_")
    return os.path.join(root, "dataset", split_dir, "_".join(parts[:2]), "_".join(parts[:3]), volume)


def segmentation_path(seg_root: str, split_dir: str, volume: str) -> str:
    """<seg_root>/<split>/<volume> (multi-label file) or the folder of parts <seg_root>/<split>/<volume stem>/."""
    path = os.path.join(seg_root, split_dir, volume)
    folder = path.removesuffix(".gz").removesuffix(".nii")
    return folder if not os.path.exists(path) and os.path.isdir(folder) else path


def scan_key(volume_id: str) -> str:
    """CT-RATE scan of a reconstruction: "train_1_a_1" -> "train_1_a" (other ids are returned unchanged)."""
    m = re.fullmatch(r"((?:train|valid|test)_\d+_[a-z]+)_\d+", volume_id)
    return m.group(1) if m else volume_id


def list_split(root: str, split: str, seg_root: str | None = None, use_metadata: bool = True,
               ) -> tuple[list[Scan], list[str], list[dict]]:
    """Scans of one split, the label table's column names (empty without a label table) and the rejected rows
    ({"id", "split", "reason"}: undecodable text, malformed metadata).

    With ``use_metadata`` and a ``metadata/<split>_metadata.csv`` table, each scan with a row gets its geometry and
    rescale from it; scans without a row keep their file header.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; CT-RATE-style splits are {sorted(SPLITS)}")
    split_dir, table, label_csv = SPLITS[split]
    seg_root = seg_root or os.path.join(root, "segmentations")
    report_path = os.path.join(root, "radiology_text_reports", f"{table}_reports.csv")
    if not os.path.exists(report_path):
        raise FileNotFoundError(f"report table {report_path} not found")
    rejects = []
    label_path = os.path.join(root, "multi_abnormality_labels", label_csv)
    label_rows, bad = read_table(label_path) if os.path.exists(label_path) else ([], [])
    rejects += bad
    columns = [c for c in (label_rows[0] if label_rows else {}) if c != "VolumeName"]
    labels = {}
    for r in label_rows:
        try:
            labels[r["VolumeName"]] = {c: int(float(r[c])) for c in columns}
        except (TypeError, ValueError):
            rejects.append({"id": r["VolumeName"], "reason": f"{label_csv}: a label is not a number"})
    meta_path = os.path.join(root, "metadata", f"{table}_metadata.csv")
    meta_rows, bad = read_table(meta_path) if use_metadata and os.path.exists(meta_path) else ([], [])
    rejects += bad
    metadata = {r["VolumeName"]: r for r in meta_rows}
    report_rows, bad = read_table(report_path)
    rejects += bad
    scans = []
    bad_ids = {r["id"] for r in rejects}
    for r in report_rows:
        name = r["VolumeName"]
        sid = name.removesuffix(".gz").removesuffix(".nii")
        if name in bad_ids:
            continue
        geometry = None
        if name in metadata:
            try:
                geometry = geometry_from_metadata(metadata[name])
            except ValueError as e:
                rejects.append({"id": name, "reason": f"metadata row unusable: {e}"})
                continue
        scans.append(Scan(id=sid, split=split, image=volume_path(root, split_dir, name),
                          segmentation=segmentation_path(seg_root, split_dir, name),
                          findings=r.get("Findings_EN") or "", impression=r.get("Impressions_EN") or "",
                          labels=labels.get(name, {}), geometry=geometry))
    rejects = [{"id": r["id"].removesuffix(".gz").removesuffix(".nii"), "split": split, "reason": r["reason"]}
               for r in rejects]
    return scans, columns, rejects

