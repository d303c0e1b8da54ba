"""CT + TotalSegmentator preprocessing for fVLM (NumPy / SciPy / nibabel / pydicom only; no JAX, no TensorFlow).

Conventions used by every function here and by everything downstream:

* Files are read in their own voxel order ("file order"): for NIfTI the array axes (i, j, k) of the file; for
  DICOM series the NIfTI-conversion order (i = column, j = row flipped like dcm2niix, k = slice).
* After :func:`to_canonical` volumes are numpy arrays in ``(z, y, x)`` order of the closest canonical RAS+
  orientation: canonical voxel axes (i, j, k) point to (R, A, S) and are transposed to (k, j, i) = (z, y, x).
* Spacings are always given and returned as ``spacing_xyz`` (mm along x, y, z), shapes and margins as ``*_zyx``.
* Resampling grid convention ("centre-aligned, exact spacing"): the output grid has exactly the requested
  spacing, ``n_out = max(1, round(n_in * s_in / s_out))`` voxels per axis, and its centre coincides with the
  centre of the input grid. Output voxel ``o`` samples the input at the continuous index
  ``c(o) = (o - (n_out - 1) / 2) * s_out / s_in + (n_in - 1) / 2``. Samples outside ``[0, n_in - 1]`` repeat the
  edge voxel (scipy ``mode="nearest"``). The physical extent ``n * s`` is preserved to within half an output voxel.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage

__all__ = [
    "ScanRejected",
    "anatomy_crop_box",
    "check_ct_values",
    "choose_rescale",
    "crop_to_anatomies",
    "load_class_table",
    "load_ct",
    "load_dicom_series",
    "load_segmentation",
    "looks_like_hu",
    "metadata_affine",
    "pad_to_min_size",
    "preprocess_scan",
    "resample",
    "resampled_shape",
    "to_canonical",
    "window",
]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Plausibility of Hounsfield units (see check_ct_values). A CT of a body always holds some air (outside the
# body, lungs, bowel gas): at least AIR_MIN_FRACTION of its voxels lie below AIR_HU. Dense bone and metal are rare:
# at most DENSE_MAX_FRACTION of the voxels lie above DENSE_HU.
AIR_HU, AIR_MIN_FRACTION = -500.0, 0.001
DENSE_HU, DENSE_MAX_FRACTION = 3000.0, 0.05
# Below real CT's air (-1000 HU and its noise): a CT in HU has almost no voxel there apart from the scanner's padding
# outside the field of view, which is one value, the volume's minimum. Values rescaled twice (HU + intercept) put
# all the air there: 39 % of the voxels of the real CT in ../shared/data, against 0 % once rescaled.
BELOW_AIR_HU, BELOW_AIR_MAX_FRACTION = -1200.0, 0.01


class ScanRejected(ValueError):
    """A scan that cannot be used, with a human-readable reason and a short category for counting."""

    def __init__(self, reason: str, category: str):
        super().__init__(reason)
        self.reason, self.category = reason, category


# ----------------------------------------------------------------------------------------------------------------
# Class table
# ----------------------------------------------------------------------------------------------------------------
def load_class_table(path_or_dict, version: str = "total") -> dict[int, str]:
    """Load a TotalSegmentator class table as ``{label id: class name}``.

    ``path_or_dict`` is a path to a JSON file like ``totalsegmentator_classes.json``
    (``{"total": {"1": "spleen", ...}, "total_v1": {...}}``), the parsed dict of such a file, or an already flat
    ``{id: name}`` mapping (then ``version`` is ignored).
    """
    if isinstance(path_or_dict, (str, os.PathLike)):
        with open(path_or_dict, encoding="utf-8") as f:
            data = json.load(f)
    else:
        data = path_or_dict
    if not isinstance(data, Mapping):
        raise TypeError(f"class table must be a mapping, got {type(data).__name__}")
    if version in data and isinstance(data[version], Mapping):
        table = data[version]
    elif data and all(str(k).strip().isdigit() for k in data):
        table = data
    else:
        raise ValueError(f"class table has no version {version!r}; available: {sorted(map(str, data))}")
    out = {int(k): str(v) for k, v in table.items()}
    if 0 in out:
        raise ValueError("class id 0 is reserved for background")
    names = list(out.values())
    if len(set(names)) != len(names):
        raise ValueError("class table has duplicate class names")
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def _squeeze_3d(shape, what: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise ValueError(f"{what}: expected a 3D volume, got shape {shape}")
    return shape  # type: ignore[return-value]


def metadata_affine(xy_spacing, z_spacing, position_lps, orientation_lps) -> np.ndarray:
    """NIfTI (RAS) affine of a stored volume from DICOM-style geometry (CT-RATE's metadata table).

    ``xy_spacing``: (spacing along the first array axis, along the second) in mm, i.e. CT-RATE's XYSpacing in its
    written order; ``z_spacing``: spacing along the third axis; ``position_lps``: ImagePositionPatient, the LPS
    position of voxel (0, 0, 0); ``orientation_lps``: ImageOrientationPatient, 6 numbers = LPS direction of the
    first array axis (row cosines) then of the second (column cosines). The third axis runs along their cross
    product. LPS -> RAS negates x and y. Raises ``ValueError`` for non-positive spacings or cosines that are not
    two orthogonal (unit after normalisation) vectors.
    """
    sx, sy = (float(v) for v in xy_spacing)
    sz = float(z_spacing)
    if not (sx > 0 and sy > 0 and sz > 0) or not np.all(np.isfinite([sx, sy, sz])):
        raise ValueError(f"spacings must be positive, got XY {list(xy_spacing)} Z {z_spacing}")
    iop = np.asarray(orientation_lps, np.float64).reshape(6)
    row, col = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if not (nr > 0.5 and nc > 0.5) or abs(row @ col) / (nr * nc) > 1e-3:
        raise ValueError(f"ImageOrientationPatient {iop.tolist()} is not two orthogonal direction vectors")
    row, col = row / nr, col / nc
    lps = np.eye(4)
    lps[:3, 0] = row * sx
    lps[:3, 1] = col * sy
    lps[:3, 2] = np.cross(row, col) * sz
    lps[:3, 3] = np.asarray(position_lps, np.float64).reshape(3)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def looks_like_hu(volume) -> bool:
    """Whether values look like a CT in Hounsfield units: the air and dense-voxel rules of
    :func:`check_ct_values`, and at most BELOW_AIR_MAX_FRACTION of the voxels below BELOW_AIR_HU apart from those
    at the minimum value (padding)."""
    v = np.asarray(volume)
    n = max(v.size, 1)
    if not v.size or np.count_nonzero(v < AIR_HU) / n < AIR_MIN_FRACTION or \
            np.count_nonzero(v > DENSE_HU) / n > DENSE_MAX_FRACTION:
        return False
    below = np.count_nonzero((v < BELOW_AIR_HU) & (v != v.min()))
    return below / n <= BELOW_AIR_MAX_FRACTION


def choose_rescale(stored, slope: float, intercept: float, header_slope: float = 1.0,
                   header_intercept: float = 0.0) -> str:
    """Whether a volume with an external rescale (CT-RATE's metadata) still needs it, from its values.

    ``stored``: the raw stored values (a subsample is enough); HU would be ``stored * slope + intercept`` if the
    file holds CT-RATE's original values, or ``stored * header_slope + header_intercept`` (the file's own scaling) if
    it was already rescaled (a corrected copy). Returns "metadata" when only the first looks like HU
    (:func:`looks_like_hu`) or both give the same values, "header" when only the second does, and "metadata" when
    neither does (the CT check then rejects the scan). Raises :class:`ScanRejected` when both look like HU but
    differ: the rescale is never guessed, so it is never applied twice.
    """
    raw = np.asarray(stored, np.float32)
    by_meta = raw * np.float32(slope) + np.float32(intercept)
    by_header = raw * np.float32(header_slope) + np.float32(header_intercept)
    if np.array_equal(by_meta, by_header) or not np.isfinite(raw).all():  # non-finite: the CT check says so
        return "metadata"
    meta_ok, header_ok = looks_like_hu(by_meta), looks_like_hu(by_header)
    if meta_ok and header_ok:
        def span(v):
            return f"{float(v.min()):g}..{float(v.max()):g}"

        raise ScanRejected(
            f"ambiguous Hounsfield units: the stored values ({span(by_header)}) and the stored values x RescaleSlope "
            f"{slope:g} + RescaleIntercept {intercept:g} ({span(by_meta)}) both look like CT in HU, so it cannot be "
            "told whether the volume was already rescaled; check its metadata row, or set data.use_metadata=false "
            "if the volumes are corrected copies", "ambiguous HU rescale")
    return "header" if header_ok and not meta_ok else "metadata"


def _load_ct(path, geometry=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volume in HU, affine to use, the file's own affine). See :func:`load_ct`."""
    path = Path(path)
    if path.is_dir():
        vol, aff = load_dicom_series(path)
        return vol, aff, aff
    img = nib.load(str(path))
    shape = _squeeze_3d(img.shape, f"CT {path}")
    if geometry is None:
        vol = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
        return vol, np.asarray(img.affine, dtype=np.float64), np.asarray(img.affine, dtype=np.float64)
    proxy = img.dataobj
    raw = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
    raw = np.asarray(raw).reshape(shape)
    header = (float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0)))
    # Decided on every 8th voxel: the fractions it looks at do not need more, and the volume is copied once.
    use = choose_rescale(raw[::2, ::2, ::2], geometry["slope"], geometry["intercept"], *header)
    slope, intercept = (geometry["slope"], geometry["intercept"]) if use == "metadata" else header
    vol = raw.astype(np.float32)
    vol *= np.float32(slope)
    vol += np.float32(intercept)
    return vol, np.asarray(geometry["affine"], np.float64), np.asarray(img.affine, dtype=np.float64)


def load_ct(path, geometry=None) -> tuple[np.ndarray, np.ndarray]:
    """Load a CT scan as Hounsfield units.

    ``path`` is a NIfTI file or a directory holding one DICOM series (dispatched to :func:`load_dicom_series`).
    Returns ``(volume, affine)``: ``volume`` float32 ``[I, J, K]`` in the file's voxel order with the NIfTI
    ``scl_slope`` / ``scl_inter`` applied, ``affine`` float64 ``[4, 4]`` voxel -> RAS mm. Trailing singleton
    dimensions are dropped; anything else that is not 3D raises ``ValueError``.

    ``geometry`` (NIfTI only; a DICOM series carries its own): ``{"affine": 4x4 RAS affine (see
    :func:`metadata_affine`), "slope": s, "intercept": b}`` from an external table such as CT-RATE's metadata.
    Then the header's affine is replaced and HU = stored value * s + b, applied to the **raw stored** values
    (the header's scl_slope / scl_inter are ignored, never applied twice). A volume whose values are already HU
    (rescaled in place, or a corrected copy) keeps them: :func:`choose_rescale` decides from the values and
    refuses an ambiguous volume.
    """
    vol, aff, _ = _load_ct(path, geometry)
    return vol, aff


def check_ct_values(volume_hu) -> None:
    """Raise :class:`ScanRejected` unless the values are finite and look like CT in Hounsfield units.

    Rule: at least 0.1 % of the voxels below -500 HU (air: outside the body, lungs, bowel gas) and at most 5 %
    above 3000 HU. Catches MR or other modalities, and CT stored without its rescale intercept (raw 0..4095).
    """
    v = np.asarray(volume_hu)
    bad = int(v.size - np.count_nonzero(np.isfinite(v)))
    if bad:
        raise ScanRejected(f"image has {bad} non-finite voxel values (NaN or infinite)", "non-finite values")
    n = max(v.size, 1)
    air = np.count_nonzero(v < AIR_HU) / n
    dense = np.count_nonzero(v > DENSE_HU) / n
    if air < AIR_MIN_FRACTION or dense > DENSE_MAX_FRACTION:
        raise ScanRejected(
            f"image does not look like CT in Hounsfield units: {100 * air:.3g}% of voxels below {AIR_HU:g} HU "
            f"(air; expected >= {100 * AIR_MIN_FRACTION:g}%), {100 * dense:.3g}% above {DENSE_HU:g} HU (expected <= "
            f"{100 * DENSE_MAX_FRACTION:g}%); value range {float(v.min()):g}..{float(v.max()):g}. "
            "MR, or a CT stored without its rescale slope/intercept?", "not CT (implausible HU)")


def _resolve_classes(class_table: Mapping[int, str], anatomies: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Map every needed class name to the anatomy index + 1; validates names."""
    by_name = {name: cid for cid, name in class_table.items()}
    class_to_anatomy: dict[str, int] = {}
    unknown = []
    for a, (anatomy, classes) in enumerate(anatomies.items()):
        if isinstance(classes, str):
            raise TypeError(f"anatomy {anatomy!r}: expected a list of class names, got the string {classes!r}")
        for name in classes:
            if name not in by_name:
                unknown.append(name)
                continue
            if name in class_to_anatomy and class_to_anatomy[name] != a + 1:
                raise ValueError(f"class {name!r} is assigned to more than one anatomy")
            class_to_anatomy[name] = a + 1
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(by_name), n=4, cutoff=0.5)
            hints.append(f"{name!r} (close: {', '.join(close) if close else 'none'})")
        raise ValueError("unknown TotalSegmentator class name(s): " + "; ".join(hints))
    if len(anatomies) > 254:
        raise ValueError("at most 254 anatomies fit in a uint8 index volume")
    return class_to_anatomy


def _find_part_file(folder: Path, name: str) -> Path | None:
    for suf in _NIFTI_SUFFIXES:
        p = folder / f"{name}{suf}"
        if p.is_file():
            return p
    return None


def load_segmentation(
    path, class_table: Mapping[int, str], anatomies: Mapping[str, Sequence[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Load a TotalSegmentator result and group its classes into anatomies.

    ``path``: a multi-label NIfTI file (one class id per voxel, ids from ``class_table``) or TotalSegmentator's
    default output folder with one binary NIfTI per class named ``<class>.nii.gz``; from a folder only the files
    of the classes named in ``anatomies`` are read (a missing file raises ``FileNotFoundError``).
    ``anatomies``: ordered mapping anatomy name -> list of TotalSegmentator class names.

    Returns ``(index, affine)``: ``index`` uint8 ``[I, J, K]`` in the file's voxel order, 0 = background and
    ``a + 1`` = the a-th anatomy of ``anatomies``; ``affine`` float64 ``[4, 4]``.
    Unknown class names raise ``ValueError`` listing close names.
    """
    path = Path(path)
    class_to_anatomy = _resolve_classes(class_table, anatomies)
    if path.is_dir():
        missing = [n for n in class_to_anatomy if _find_part_file(path, n) is None]
        if missing:
            raise FileNotFoundError(f"segmentation folder {path} lacks the class file(s): {', '.join(missing)}")
        index = None
        affine = None
        # Anatomy order decides overlaps (should not happen with TotalSegmentator): the first anatomy wins.
        for name, a in sorted(class_to_anatomy.items(), key=lambda kv: kv[1]):
            p = _find_part_file(path, name)
            img = nib.load(str(p))
            shape = _squeeze_3d(img.shape, f"segmentation part {p}")
            if index is None:
                index = np.zeros(shape, np.uint8)
                affine = np.asarray(img.affine, dtype=np.float64)
            elif shape != index.shape or not np.allclose(img.affine, affine, atol=1e-3):
                raise ValueError(f"segmentation part {p} is not on the grid of the other parts")
            mask = np.asarray(img.dataobj).reshape(shape) > 0
            index[mask & (index == 0)] = a
        if index is None:
            raise ValueError("anatomies name no classes: cannot read a segmentation folder without any class")
        return index, affine
    img = nib.load(str(path))
    shape = _squeeze_3d(img.shape, f"segmentation {path}")
    raw = np.asarray(img.dataobj).reshape(shape)
    if raw.dtype.kind == "f":
        raw = np.rint(raw)
    if raw.size and (raw.min() < 0):
        raise ValueError(f"segmentation {path} has negative labels")
    max_id = max(int(raw.max()) if raw.size else 0, max(class_table, default=0))
    lut = np.zeros(max_id + 1, np.uint8)
    by_name = {name: cid for cid, name in class_table.items()}
    for name, a in class_to_anatomy.items():
        lut[by_name[name]] = a
    index = lut[raw.astype(np.intp, copy=False)]
    return index, np.asarray(img.affine, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------------------------
def load_dicom_series(folder) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM CT series as a NIfTI-like volume in Hounsfield units.

    Slices are ordered by ``ImagePositionPatient`` projected on the slice normal (row cosines x column cosines),
    the slice step comes from the positions (never ``SliceThickness``), and each slice is rescaled with its own
    ``RescaleSlope`` / ``RescaleIntercept``. The voxel order and affine follow a dcm2niix conversion: ``i`` =
    column, ``j`` = row with the rows flipped (first array row = last DICOM row), ``k`` = slice in ascending
    position along the normal; the affine maps to RAS mm (DICOM's LPS with x and y negated).

    Returns ``(volume, affine)``: float32 ``[columns, rows, slices]`` and float64 ``[4, 4]``.
    Raises ``ValueError`` for no/mixed series, inconsistent orientation or size, duplicate or uneven slices.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    slices = []
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=False)
        except (InvalidDicomError, OSError):
            continue
        if "PixelData" not in ds or "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"{p}: multi-frame DICOM is not supported")
        slices.append(ds)
    if not slices:
        raise ValueError(f"no DICOM image slices with geometry found in {folder}")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in slices} - {""}
    if len(uids) > 1:
        raise ValueError(f"{folder} holds {len(uids)} DICOM series ({', '.join(sorted(uids))}); pass one series")

    iop = np.asarray([float(v) for v in slices[0].ImageOrientationPatient], np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    pixel_spacing = [float(v) for v in slices[0].PixelSpacing]  # [between rows, between columns]
    for ds in slices:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise ValueError(f"{folder}: slices have different ImageOrientationPatient")
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise ValueError(f"{folder}: slices have different sizes")
    ipp = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in slices], np.float64)
    proj = ipp @ normal
    order = np.argsort(proj, kind="stable")
    slices = [slices[i] for i in order]
    ipp, proj = ipp[order], proj[order]
    n = len(slices)
    if n > 1:
        steps = np.diff(proj)
        if np.any(steps < 1e-3):
            raise ValueError(f"{folder}: duplicate slice positions (several series or echoes mixed?)")
        if np.max(np.abs(steps - np.median(steps))) > 0.01 * np.median(steps) + 1e-3:
            raise ValueError(f"{folder}: uneven slice spacing {np.unique(np.round(steps, 3))} (missing slices?)")
        k_vec = (ipp[-1] - ipp[0]) / (n - 1)  # handles gantry tilt (shear) too
    else:
        thickness = float(slices[0].get("SliceThickness", 1.0) or 1.0)
        k_vec = normal * thickness

    vol = np.empty((cols, rows, n), np.float32)
    for k, ds in enumerate(slices):
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        inter = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        px = ds.pixel_array.astype(np.float32)  # (rows, cols)
        vol[:, :, k] = (px * np.float32(slope) + np.float32(inter)).T

    lps = np.eye(4)
    lps[:3, 0] = row_cos * pixel_spacing[1]  # along i (next column)
    lps[:3, 1] = col_cos * pixel_spacing[0]  # along j (next row)
    lps[:3, 2] = k_vec
    lps[:3, 3] = ipp[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    # dcm2niix flips the rows so that the NIfTI j axis runs bottom-up.
    vol = vol[:, ::-1, :]
    affine[:3, 3] += affine[:3, 1] * (rows - 1)
    affine[:3, 1] *= -1
    return np.ascontiguousarray(vol), affine


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------
def to_canonical(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Reorient a file-order volume ``[I, J, K]`` to the closest canonical RAS+ orientation (flips and axis
    permutations only, no resampling; same result as ``nib.as_closest_canonical``).

    Returns ``(volume_zyx, canonical_affine, spacing_xyz)``: the array ``[Z, Y, X]`` (a contiguous copy),
    the affine of the canonical (x, y, z)-indexed array, and voxel sizes in mm along (x, y, z).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nio.io_orientation(affine)
    canon = nio.apply_orientation(volume, ornt)
    canon_affine = affine @ nio.inv_ornt_aff(ornt, volume.shape)
    spacing = np.sqrt((canon_affine[:3, :3] ** 2).sum(axis=0))
    vol_zyx = np.ascontiguousarray(canon.transpose(2, 1, 0))
    return vol_zyx, canon_affine, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def resampled_shape(shape_zyx, spacing_xyz, new_spacing_xyz) -> tuple[int, int, int]:
    """Output shape ``(Z, Y, X)`` of :func:`resample`: ``max(1, round(n * s / s_new))`` per axis."""
    s_zyx = np.asarray(spacing_xyz, np.float64)[::-1]
    ns_zyx = np.asarray(new_spacing_xyz, np.float64)[::-1]
    out = np.maximum(1, np.rint(np.asarray(shape_zyx, np.float64) * s_zyx / ns_zyx)).astype(int)
    return tuple(int(v) for v in out)  # type: ignore[return-value]


def _resample_params(shape_zyx, spacing_xyz, new_spacing_xyz, out_shape_zyx):
    """Per-axis (zyx) scale and offset: input index = scale * output index + offset."""
    s = np.asarray(spacing_xyz, np.float64)[::-1]
    ns = np.asarray(new_spacing_xyz, np.float64)[::-1]
    if np.any(s <= 0) or np.any(ns <= 0):
        raise ValueError(f"spacings must be positive, got {spacing_xyz} -> {new_spacing_xyz}")
    n_in = np.asarray(shape_zyx, np.float64)
    n_out = np.asarray(out_shape_zyx, np.float64)
    scale = ns / s
    offset = (n_in - 1) / 2 - (n_out - 1) / 2 * scale
    return scale, offset


def _resample_block(volume_zyx, scale, offset, start_zyx, shape_zyx, order: int) -> np.ndarray:
    vol = np.asarray(volume_zyx)
    if order == 1:
        if vol.dtype != np.float32:
            vol = vol.astype(np.float32)
        out_dtype = np.float32
    elif order == 0:
        out_dtype = vol.dtype
    else:
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    start = np.asarray(start_zyx, np.float64)
    return ndimage.affine_transform(
        vol,
        scale,  # 1-D matrix: diagonal, SciPy's fast separable path
        offset=offset + scale * start,
        output_shape=tuple(int(v) for v in shape_zyx),
        output=out_dtype,
        order=order,
        mode="nearest",
        prefilter=False,
    )


def resample(volume_zyx, spacing_xyz, new_spacing_xyz, *, order: int, out_shape=None) -> np.ndarray:
    """Resample a ``[Z, Y, X]`` volume from ``spacing_xyz`` to ``new_spacing_xyz`` (mm, x/y/z order).

    ``order=1``: trilinear, float32 output (use for images); ``order=0``: nearest, input dtype kept (use for label
    maps). Grid convention: centre-aligned with exact output spacing (see module docstring); output voxel ``o``
    reads input index ``(o - (n_out - 1) / 2) * s_out / s_in + (n_in - 1) / 2``, edges repeated outside.
    ``out_shape`` (``(Z, Y, X)``) defaults to :func:`resampled_shape`; pass the image's shape for its labels
    (the default gives the same shape for both anyway).
    """
    vol = np.asarray(volume_zyx)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {vol.shape}")
    if out_shape is None:
        out_shape = resampled_shape(vol.shape, spacing_xyz, new_spacing_xyz)
    scale, offset = _resample_params(vol.shape, spacing_xyz, new_spacing_xyz, out_shape)
    return _resample_block(vol, scale, offset, (0, 0, 0), out_shape, order)


def window(volume_hu, hu_min: float, hu_max: float) -> np.ndarray:
    """Map HU ``[hu_min, hu_max]`` linearly to ``[0, 1]`` and clip; float32, same shape."""
    if not hu_max > hu_min:
        raise ValueError(f"empty HU window [{hu_min}, {hu_max}]")
    v = np.asarray(volume_hu, dtype=np.float32)
    out = (v - np.float32(hu_min)) * np.float32(1.0 / (hu_max - hu_min))
    return np.clip(out, 0.0, 1.0, out=out)


def anatomy_crop_box(labels_zyx, margin_zyx) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Bounding box of ``labels_zyx > 0`` grown by ``margin_zyx`` voxels and clipped to the volume.

    Returns ``(start_zyx, stop_zyx)`` (stop exclusive). Raises ``ValueError("segmentation is empty")``.
    """
    labels = np.asarray(labels_zyx)
    start, stop = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        nz = np.flatnonzero(np.any(labels > 0, axis=other))
        if nz.size == 0:
            raise ValueError("segmentation is empty")
        m = int(margin_zyx[ax])
        start.append(max(0, int(nz[0]) - m))
        stop.append(min(labels.shape[ax], int(nz[-1]) + 1 + m))
    return tuple(start), tuple(stop)  # type: ignore[return-value]


def pad_to_min_size(volume_zyx, min_size_zyx, value=0) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """Pad symmetrically (extra voxel after) with ``value`` to at least ``min_size_zyx``; returns (array, pads)."""
    vol = np.asarray(volume_zyx)
    pads = []
    for n, m in zip(vol.shape, min_size_zyx):
        need = max(0, int(m) - n)
        pads.append((need // 2, need - need // 2))
    pads = tuple(pads)
    if any(p for pair in pads for p in pair):
        vol = np.pad(vol, pads, mode="constant", constant_values=value)
    return vol, pads


def crop_to_anatomies(image_zyx, labels_zyx, margin_zyx, min_size_zyx):
    """Crop image and labels ``[Z, Y, X]`` to the anatomy bounding box plus ``margin_zyx`` (clipped at the volume),
    then zero-pad both symmetrically to at least ``min_size_zyx`` (image pad 0 = bottom of the window, labels 0).

    Returns ``(image, labels, info)`` with ``info`` = ``{"crop_start_zyx", "crop_stop_zyx", "pad_zyx"}``
    (``pad_zyx`` = ((before, after),) * 3). Raises ``ValueError("segmentation is empty")`` without labels.
    """
    image = np.asarray(image_zyx)
    labels = np.asarray(labels_zyx)
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
    start, stop = anatomy_crop_box(labels, margin_zyx)
    sl = tuple(slice(a, b) for a, b in zip(start, stop))
    img, pads = pad_to_min_size(image[sl], min_size_zyx, 0)
    lab, _ = pad_to_min_size(labels[sl], min_size_zyx, 0)
    info = {"crop_start_zyx": start, "crop_stop_zyx": stop, "pad_zyx": pads}
    return img, lab, info


# ----------------------------------------------------------------------------------------------------------------
# Whole chain
# ----------------------------------------------------------------------------------------------------------------
def preprocess_scan(
    image_path,
    seg_path,
    *,
    class_table: Mapping[int, str],
    anatomies: Mapping[str, Sequence[str]],
    spacing_xyz,
    hu_window,
    margin_zyx,
    min_size_zyx,
    geometry=None,
    check_ct: bool = False,
    empty_ok: bool = False,
) -> dict:
    """Load a CT and its TotalSegmentator result and produce a training/inference-ready sample.

    Chain: load (NIfTI or DICOM folder; multi-label file or part folder) -> check that the segmentation lies on
    the image grid (same shape, affine within 1e-3 mm) -> canonical RAS (z, y, x) -> resample to ``spacing_xyz``
    (image linear, labels nearest, same grid) -> window ``hu_window = (lo, hi)`` -> crop to anatomies plus
    ``margin_zyx`` and zero-pad to ``min_size_zyx``. The image is only interpolated inside the crop box (same
    values as resampling everything and cropping).

    ``geometry``: optional external geometry and rescale of the image (see :func:`load_ct`); the segmentation may
    then carry either the file's header or that geometry. ``check_ct``: reject values that are not finite or do not
    look like CT (:func:`check_ct_values`). ``empty_ok``: a segmentation without any of the anatomies is cropped to
    the whole volume instead of rejected (prediction reports such a scan; training cannot use it). Every unusable
    input raises :class:`ScanRejected` (a ``ValueError``) with a human-readable reason.

    Returns a dict:
      ``image`` uint8 ``[Z, Y, X]`` = round(windowed * 255); ``labels`` uint8 ``[Z, Y, X]`` anatomy index;
      ``spacing_xyz`` tuple; ``present`` bool ``[A]`` (anatomy has voxels in ``labels``); ``at_scan_edge`` bool
      ``[A]`` (anatomy has voxels on a face of the source volume: the scan's field of view cuts it);
      ``source_shape`` canonical source shape ``(Z, Y, X)``; ``source_spacing_xyz`` tuple;
      ``affine`` float64 ``[4, 4]`` RAS affine of the output indexed (x, y, z), i.e. of ``image.transpose(2,1,0)``;
      ``crop`` the crop/pad info of :func:`crop_to_anatomies`.
    """
    for path, what in ((image_path, "image"), (seg_path, "segmentation")):
        if not os.path.exists(path):
            raise ScanRejected(f"{what} not found: {path}", f"{what} missing")
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise ScanRejected(f"{what} file is empty (0 bytes): {path}", f"{what} unreadable")
    try:
        ct, ct_aff, header_aff = _load_ct(image_path, geometry)
    except ScanRejected:
        raise
    except Exception as e:
        raise ScanRejected(f"image could not be read ({type(e).__name__}: {e})", "image unreadable") from e
    if check_ct:
        check_ct_values(ct)
    try:
        seg, seg_aff = load_segmentation(seg_path, class_table, anatomies)
    except Exception as e:
        raise ScanRejected(f"segmentation could not be read ({type(e).__name__}: {e})",
                           "segmentation unreadable") from e
    # With an external geometry the segmentation may carry either the file's header (TotalSegmentator run on the
    # stored file) or the corrected geometry (run on a fixed copy): same voxel grid, so it takes the image's.
    on_grid = ct.shape == seg.shape and any(np.allclose(a, seg_aff, rtol=0, atol=1e-3) for a in (ct_aff, header_aff))
    if not on_grid:
        raise ScanRejected(
            f"segmentation {seg_path} (shape {seg.shape}, affine {np.round(seg_aff, 4).tolist()}) is not on the grid "
            f"of image {image_path} (shape {ct.shape}, affine {np.round(ct_aff, 4).tolist()})",
            "segmentation grid differs from the image")
    seg_aff = ct_aff
    ct_zyx, canon_aff, src_spacing = to_canonical(ct, ct_aff)
    seg_zyx, _, _ = to_canonical(seg, seg_aff)
    del ct, seg
    at_edge = np.zeros(len(anatomies), bool)
    for face in (seg_zyx[0], seg_zyx[-1], seg_zyx[:, 0], seg_zyx[:, -1], seg_zyx[:, :, 0], seg_zyx[:, :, -1]):
        ids = np.unique(face)
        at_edge[ids[ids > 0].astype(int) - 1] = True
    new_spacing = tuple(float(v) for v in spacing_xyz)
    out_shape = resampled_shape(ct_zyx.shape, src_spacing, new_spacing)
    scale, offset = _resample_params(ct_zyx.shape, src_spacing, new_spacing, out_shape)
    labels = _resample_block(seg_zyx, scale, offset, (0, 0, 0), out_shape, 0)
    try:
        start, stop = anatomy_crop_box(labels, margin_zyx)
    except ValueError as e:
        if not empty_ok:
            raise ScanRejected("segmentation holds none of the configured anatomies", "empty segmentation") from e
        start, stop = (0, 0, 0), labels.shape
    crop_shape = tuple(b - a for a, b in zip(start, stop))
    img = _resample_block(ct_zyx, scale, offset, start, crop_shape, 1)
    img = window(img, float(hu_window[0]), float(hu_window[1]))
    img = np.rint(img * np.float32(255.0), out=img).astype(np.uint8)
    img, pads = pad_to_min_size(img, min_size_zyx, 0)
    labels, _ = pad_to_min_size(labels[tuple(slice(a, b) for a, b in zip(start, stop))], min_size_zyx, 0)
    present = np.zeros(len(anatomies), bool)
    ids = np.unique(labels)
    present[ids[ids > 0].astype(int) - 1] = True

    # Affine of the output grid (indexed x, y, z): canonical affine o resampling o crop/pad offset.
    first_zyx = np.asarray(start, np.float64) - np.asarray([p[0] for p in pads], np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale[::-1])
    step[:3, 3] = offset[::-1] + scale[::-1] * first_zyx[::-1]
    out_affine = canon_aff @ step
    return {
        "image": np.ascontiguousarray(img),
        "labels": np.ascontiguousarray(labels),
        "spacing_xyz": new_spacing,
        "present": present,
        "at_scan_edge": at_edge,
        "source_shape": tuple(int(v) for v in ct_zyx.shape),
        "source_spacing_xyz": src_spacing,
        "affine": out_affine,
        "crop": {"crop_start_zyx": start, "crop_stop_zyx": stop, "pad_zyx": pads},
    }


def fit_to_size(volume_zyx: np.ndarray, size_zyx) -> np.ndarray:
    """Zero-pad to at least ``size_zyx`` (extra voxel after), then take the central ``size_zyx`` block.

    The model's fixed input for evaluation and inference (training takes random crops instead).
    """
    padded, _ = pad_to_min_size(volume_zyx, size_zyx)
    start = [(n - s) // 2 for n, s in zip(padded.shape, size_zyx)]
    return padded[tuple(slice(b, b + s) for b, s in zip(start, size_zyx))]
