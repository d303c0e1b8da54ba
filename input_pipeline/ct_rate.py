"""Scans of a CT-RATE-style data set: volumes, TotalSegmentator outputs, report, label and metadata tables.

The download's layout is read as it is: the tables inside dataset/ beside the volume folders
(dataset/radiology_text_reports/, dataset/metadata/, dataset/multi_abnormality_labels/); tables beside dataset/
are accepted too. Volumes come from dataset/<split>_fixed/ (the geometry- and HU-corrected copies of current
releases) when that folder exists, else from dataset/<split>/ with the metadata table's geometry and rescale.

Tables are read as UTF-8 (a BOM is allowed). A row holding bytes that are not UTF-8 is not guessed at: it is
returned as a reject (its id and the column) and the other rows are kept.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import re

import numpy as np

from input_pipeline import preprocess, report_split

log = logging.getLogger(__name__)

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
    """dataset/<split_dir>/<patient>/<scan>/<volume>: train_1_a_1.nii.gz lies in train_1/train_1_a/ (split_dir:
    "train", or "train_fixed" for the corrected copies)."""
    parts = volume.split("_")
    return os.path.join(root, "dataset", split_dir, "_".join(parts[:2]), "_".join(parts[:3]), volume)


def table_candidates(root: str, folder: str, name: str) -> list[str]:
    """Where a table may lie: inside dataset/ (the download's layout), then beside it."""
    return [os.path.join(root, "dataset", folder, name), os.path.join(root, folder, name)]


def find_table(root: str, folder: str, name: str) -> str | None:
    """The first of `table_candidates` that exists, or None."""
    return next((p for p in table_candidates(root, folder, name) if os.path.exists(p)), None)


def volume_folder(root: str, split_dir: str) -> tuple[str, bool]:
    """(folder name under dataset/, corrected): "<split>_fixed" when it exists (its volumes are geometry- and
    HU-corrected, their headers are trusted), else "<split>"."""
    fixed = f"{split_dir}_fixed"
    return (fixed, True) if os.path.isdir(os.path.join(root, "dataset", fixed)) else (split_dir, False)


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
    ({"id", "split", "reason"}: undecodable text, malformed or missing metadata).

    Volumes of dataset/<split>_fixed/ keep their headers (the corrected copies). Volumes of dataset/<split>/ with
    ``use_metadata`` get their geometry and rescale from metadata/<table>_metadata.csv: without that table this
    raises FileNotFoundError naming where it was looked for (their stored headers have the wrong spacing and raw
    values), and a volume without a row is rejected. Report placeholders ("Not given.") count as empty.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; CT-RATE-style splits are {sorted(SPLITS)}")
    split_dir, table, label_csv = SPLITS[split]
    seg_root = seg_root or os.path.join(root, "segmentations")
    report_path = find_table(root, "radiology_text_reports", f"{table}_reports.csv")
    if report_path is None:
        raise FileNotFoundError(f"report table for split {split!r} not found: looked for " + " and ".join(
            table_candidates(root, "radiology_text_reports", f"{table}_reports.csv")))
    folder, corrected = volume_folder(root, split_dir)
    log.info("split %s: reports %s, volumes %s", split, report_path, os.path.join(root, "dataset", folder) +
             (" (corrected copies: their headers are used)" if corrected else ""))
    rejects = []
    label_path = find_table(root, "multi_abnormality_labels", label_csv)
    label_rows, bad = read_table(label_path) if label_path else ([], [])
    rejects += bad
    columns = [c for c in (label_rows[0] if label_rows else {}) if c != "VolumeName"]
    labels = {}
    for r in label_rows:
        try:
            labels[r["VolumeName"]] = {c: int(float(r[c])) for c in columns}
        except (TypeError, ValueError):
            rejects.append({"id": r["VolumeName"], "reason": f"{label_csv}: a label is not a number"})
    meta_name = f"{table}_metadata.csv"
    meta_path = find_table(root, "metadata", meta_name) if use_metadata and not corrected else None
    if use_metadata and not corrected and meta_path is None:
        raise FileNotFoundError(
            f"data.use_metadata: no metadata table for split {split!r} (looked for " + " and ".join(
                table_candidates(root, "metadata", meta_name)) + f"). The volumes of dataset/{split_dir}/ need it: "
            "their headers have the wrong spacing and unscaled values. Add the table, use the corrected volumes "
            f"(dataset/{split_dir}_fixed/), or set data.use_metadata=false if the headers are right")
    meta_rows, bad = read_table(meta_path) if meta_path else ([], [])
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
        if meta_path and name not in metadata:
            rejects.append({"id": name, "reason": f"no row in the metadata table {meta_name}: the stored header's "
                                                  "spacing and values are not HU-corrected"})
            continue
        if meta_path:
            try:
                geometry = geometry_from_metadata(metadata[name])
            except ValueError as e:
                rejects.append({"id": name, "reason": f"metadata row unusable: {e}"})
                continue
        scans.append(Scan(id=sid, split=split, image=volume_path(root, folder, name),
                          segmentation=segmentation_path(seg_root, split_dir, name),
                          findings=report_split.report_text(r.get("Findings_EN")),
                          impression=report_split.report_text(r.get("Impressions_EN")),
                          labels=labels.get(name, {}), geometry=geometry))
    rejects = [{"id": r["id"].removesuffix(".gz").removesuffix(".nii"), "split": split, "reason": r["reason"]}
               for r in rejects]
    return scans, columns, rejects
