"""Tests of input_pipeline/preprocess.py (NumPy only; real TotalSegmentator example data when available)."""

from __future__ import annotations

import random
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA as DATA  # noqa: E402

from input_pipeline import preprocess as pp

EXAMPLE = DATA / "totalseg_example"
CLASSES_JSON = DATA / "totalsegmentator_classes.json"

needs_data = pytest.mark.skipif(
    not (EXAMPLE.is_dir() and CLASSES_JSON.is_file()),
    reason=f"TotalSegmentator example data not found under {DATA}",
)

ANATOMIES = {
    "lung": [
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
    ],
    "liver": ["liver"],
    "kidney": ["kidney_left", "kidney_right"],
    "aorta": ["aorta"],
    "heart": ["heart"],
}


@pytest.fixture(scope="module")
def class_table():
    if not CLASSES_JSON.is_file():
        pytest.skip(f"class table not found: {CLASSES_JSON}")
    return pp.load_class_table(CLASSES_JSON)


# ------------------------------------------------------------------------------------------------------------------
# class table / segmentation
# ------------------------------------------------------------------------------------------------------------------
@needs_data
def test_class_table_versions(class_table):
    assert len(class_table) == 117 and class_table[1] == "spleen" and class_table[5] == "liver"
    v1 = pp.load_class_table(str(CLASSES_JSON), version="total_v1")
    assert len(v1) == 104
    assert pp.load_class_table({"3": "a", "7": "b"}) == {3: "a", 7: "b"}
    with pytest.raises(ValueError, match="no version"):
        pp.load_class_table(CLASSES_JSON, version="nope")


@needs_data
def test_multilabel_and_parts_identical(class_table):
    multi, aff_m = pp.load_segmentation(EXAMPLE / "example_seg_fast.nii.gz", class_table, ANATOMIES)
    parts, aff_p = pp.load_segmentation(EXAMPLE / "example_seg_parts", class_table, ANATOMIES)
    assert multi.dtype == np.uint8 and multi.shape == (122, 101, 30)
    np.testing.assert_array_equal(multi, parts)
    np.testing.assert_allclose(aff_m, aff_p, atol=1e-6)
    present = {name: bool((multi == a + 1).any()) for a, name in enumerate(ANATOMIES)}
    assert present == {"lung": True, "liver": True, "kidney": True, "aorta": True, "heart": False}
    # cross-check against the raw label ids
    raw = np.asarray(nib.load(EXAMPLE / "example_seg_fast.nii.gz").dataobj)
    np.testing.assert_array_equal(multi == 2, raw == 5)
    np.testing.assert_array_equal(multi == 3, (raw == 2) | (raw == 3))


@needs_data
def test_parts_folder_reads_only_needed_files(class_table, tmp_path):
    for name in ("liver", "aorta"):
        shutil.copy(EXAMPLE / "example_seg_parts" / f"{name}.nii.gz", tmp_path)
    idx, _ = pp.load_segmentation(tmp_path, class_table, {"liver": ["liver"], "aorta": ["aorta"]})
    assert set(np.unique(idx)) == {0, 1, 2}
    with pytest.raises(FileNotFoundError, match="spleen"):
        pp.load_segmentation(tmp_path, class_table, {"spleen": ["spleen"]})


@needs_data
def test_unknown_class_lists_close_names(class_table):
    with pytest.raises(ValueError, match="kidney_left") as err:
        pp.load_segmentation(EXAMPLE / "example_seg_fast.nii.gz", class_table, {"kidney": ["kidney_lft"]})
    assert "kidney_lft" in str(err.value)


# ------------------------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------------------------
@needs_data
def test_dicom_series_matches_nifti_grid(class_table):
    vol, aff = pp.load_ct(EXAMPLE / "ct_dicom")
    ref = nib.load(EXAMPLE / "example_seg_dicom.nii.gz")
    assert vol.dtype == np.float32 and vol.shape == ref.shape == (512, 512, 20)
    np.testing.assert_allclose(aff, ref.affine, atol=1e-3)
    _, _, spacing = pp.to_canonical(vol, aff)
    np.testing.assert_allclose(spacing, (0.9765625, 0.9765625, 2.0), atol=1e-4)
    z = (aff @ np.array([[0, 0, k, 1] for k in range(20)]).T)[2]
    assert np.isclose(z.min(), -804.5) and np.isclose(z.max(), -766.5)
    assert -1100 <= vol.min() < -900 and 1000 < vol.max() < 4000
    # anatomy on the right voxels: liver soft tissue, contrast-filled aorta
    seg, _ = pp.load_segmentation(
        EXAMPLE / "example_seg_dicom.nii.gz", class_table, {"liver": ["liver"], "aorta": ["aorta"]}
    )
    assert 40 < vol[seg == 1].mean() < 150
    assert vol[seg == 2].mean() > 120


@pytest.mark.slow
@needs_data
def test_dicom_shuffled_file_order(tmp_path):
    files = sorted((EXAMPLE / "ct_dicom").iterdir())
    rng = random.Random(0)
    names = list(range(len(files)))
    rng.shuffle(names)
    for f, n in zip(files, names):
        shutil.copy(f, tmp_path / f"img_{n:03d}.dcm")
    (tmp_path / "notes.txt").write_text("not a dicom file")
    a, aff_a = pp.load_dicom_series(EXAMPLE / "ct_dicom")
    b, aff_b = pp.load_dicom_series(tmp_path)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(aff_a, aff_b)


# ------------------------------------------------------------------------------------------------------------------
# load / canonical
# ------------------------------------------------------------------------------------------------------------------
def test_load_ct_rejects_non_3d(tmp_path):
    p = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.int16), np.eye(4)), p)
    with pytest.raises(ValueError, match="3D"):
        pp.load_ct(p)


def test_load_ct_applies_scaling(tmp_path):
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    p = tmp_path / "s.nii.gz"
    nib.save(img, p)
    vol, _ = pp.load_ct(p)
    assert vol.dtype == np.float32
    np.testing.assert_allclose(vol, np.arange(24).reshape(2, 3, 4) * 2.0 - 1024.0)


def test_to_canonical_lps_equals_ras():
    rng = np.random.default_rng(0)
    ras = rng.normal(size=(5, 6, 7)).astype(np.float32)  # (x, y, z) voxel order
    aff_ras = np.diag([0.8, 0.9, 2.5, 1.0])
    aff_ras[:3, 3] = [-10, 20, 30]
    # the same volume stored as LPS: x and y axes flipped
    lps = ras[::-1, ::-1, :].copy()
    aff_lps = aff_ras.copy()
    aff_lps[:3, 0] *= -1
    aff_lps[:3, 1] *= -1
    aff_lps[:3, 3] = aff_ras[:3, :3] @ [4, 5, 0] + aff_ras[:3, 3]
    # a permuted storage too: file axes (z, x, y)
    perm = ras.transpose(2, 0, 1).copy()
    aff_perm = aff_ras[:, [2, 0, 1, 3]]
    out = [pp.to_canonical(v, a) for v, a in ((ras, aff_ras), (lps, aff_lps), (perm, aff_perm))]
    for vol, aff, spacing in out:
        np.testing.assert_array_equal(vol, ras.transpose(2, 1, 0))
        np.testing.assert_allclose(aff, aff_ras, atol=1e-9)
        np.testing.assert_allclose(spacing, (0.8, 0.9, 2.5))
    # agrees with nibabel's as_closest_canonical
    canon = nib.as_closest_canonical(nib.Nifti1Image(lps, aff_lps))
    np.testing.assert_array_equal(out[1][0], np.asarray(canon.dataobj).transpose(2, 1, 0))


# ------------------------------------------------------------------------------------------------------------------
# resample against a slow reference
# ------------------------------------------------------------------------------------------------------------------
def _ref_coords(n_in, s_in, n_out, s_out):
    # the documented convention: centre-aligned, exact output spacing
    return [(o - (n_out - 1) / 2) * s_out / s_in + (n_in - 1) / 2 for o in range(n_out)]


def _ref_resample(vol, spacing_xyz, new_spacing_xyz, out_shape, order):
    s = spacing_xyz[::-1]
    ns = new_spacing_xyz[::-1]
    cz, cy, cx = (_ref_coords(vol.shape[a], s[a], out_shape[a], ns[a]) for a in range(3))
    out = np.zeros(out_shape, np.float64)
    nz, ny, nx = vol.shape
    for i, z in enumerate(cz):
        for j, y in enumerate(cy):
            for k, x in enumerate(cx):
                z_, y_, x_ = min(max(z, 0), nz - 1), min(max(y, 0), ny - 1), min(max(x, 0), nx - 1)
                if order == 0:
                    out[i, j, k] = vol[int(np.floor(z_ + 0.5)), int(np.floor(y_ + 0.5)), int(np.floor(x_ + 0.5))]
                    continue
                z0, y0, x0 = int(np.floor(z_)), int(np.floor(y_)), int(np.floor(x_))
                acc = 0.0
                for dz in (0, 1):
                    for dy in (0, 1):
                        for dx in (0, 1):
                            w = (
                                (z_ - z0 if dz else 1 - (z_ - z0))
                                * (y_ - y0 if dy else 1 - (y_ - y0))
                                * (x_ - x0 if dx else 1 - (x_ - x0))
                            )
                            if w:
                                acc += w * vol[min(z0 + dz, nz - 1), min(y0 + dy, ny - 1), min(x0 + dx, nx - 1)]
                out[i, j, k] = acc
    return out


@pytest.mark.parametrize(
    "shape,spacing,new_spacing",
    [
        ((6, 7, 8), (0.7, 0.8, 2.0), (1.1, 1.3, 2.9)),  # downsample
        ((5, 6, 4), (1.3, 1.7, 3.1), (0.9, 1.1, 1.45)),  # upsample (samples outside the edge centres)
        ((4, 9, 5), (1.0, 0.6, 2.5), (1.0, 1.15, 1.3)),  # mixed, one axis unchanged
    ],
)
def test_resample_matches_reference(shape, spacing, new_spacing):
    rng = np.random.default_rng(1)
    vol = rng.normal(size=shape).astype(np.float32)
    out_shape = pp.resampled_shape(shape, spacing, new_spacing)
    got = pp.resample(vol, spacing, new_spacing, order=1)
    assert got.dtype == np.float32 and got.shape == out_shape
    np.testing.assert_allclose(got, _ref_resample(vol, spacing, new_spacing, out_shape, 1), atol=1e-5)
    labels = rng.integers(0, 6, size=shape).astype(np.uint8)
    got_l = pp.resample(labels, spacing, new_spacing, order=0, out_shape=out_shape)
    assert got_l.dtype == np.uint8 and got_l.shape == out_shape
    np.testing.assert_array_equal(got_l, _ref_resample(labels, spacing, new_spacing, out_shape, 0))


def test_resample_identity_and_extent():
    rng = np.random.default_rng(2)
    vol = rng.normal(size=(10, 12, 14)).astype(np.float32)
    np.testing.assert_allclose(pp.resample(vol, (1, 1, 2), (1, 1, 2), order=1), vol, atol=1e-6)
    for spacing, new in [((0.7, 0.7, 1.25), (1.0, 1.0, 3.0)), ((0.977, 0.977, 2.0), (1.5, 1.5, 3.0))]:
        shape = (83, 301, 257)
        out = pp.resampled_shape(shape, spacing, new)
        for a in range(3):
            ext_in = shape[a] * spacing[::-1][a]
            ext_out = out[a] * new[::-1][a]
            assert abs(ext_in - ext_out) <= new[::-1][a] / 2 + 1e-9
    # a linear ramp stays a linear ramp with the physical coordinate (centre-aligned)
    z = np.arange(20, dtype=np.float32)[:, None, None] * np.ones((1, 3, 3), np.float32)
    out = pp.resample(z, (1, 1, 1.0), (1, 1, 2.5), order=1)
    assert out.shape == (8, 3, 3)
    np.testing.assert_allclose(out[1:-1, 0, 0], (np.arange(1, 7) - 3.5) * 2.5 + 9.5, atol=1e-5)


def test_window_clip():
    v = np.array([-2000, -1150, -400, 350, 3000], np.float32)
    w = pp.window(v, -1150, 350)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, [0, 0, 0.5, 1, 1], atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# crop / pad
# ------------------------------------------------------------------------------------------------------------------
def test_crop_margins_and_padding():
    image = np.full((40, 50, 60), 0.7, np.float32)
    labels = np.zeros((40, 50, 60), np.uint8)
    labels[10:20, 2:30, 30:58] = 1
    labels[15, 25, 40] = 3
    img, lab, info = pp.crop_to_anatomies(image, labels, (5, 20, 20), (8, 10, 12))
    # z: [5, 25); y: [0 (clipped), 50); x: [10, 60 (clipped))
    assert info["crop_start_zyx"] == (5, 0, 10) and info["crop_stop_zyx"] == (25, 50, 60)
    assert img.shape == lab.shape == (20, 50, 50)
    assert info["pad_zyx"] == ((0, 0), (0, 0), (0, 0))
    np.testing.assert_array_equal(lab, labels[5:25, 0:50, 10:60])
    # padding to a larger minimum: symmetric, extra voxel after, zeros
    img, lab, info = pp.crop_to_anatomies(image, labels, (5, 20, 20), (25, 53, 50))
    assert img.shape == (25, 53, 50)
    assert info["pad_zyx"] == ((2, 3), (1, 2), (0, 0))
    assert (img[:2] == 0).all() and (img[-3:] == 0).all() and (img[:, :1] == 0).all() and (img[:, -2:] == 0).all()
    np.testing.assert_allclose(img[2:-3, 1:-2], 0.7)
    assert (lab[:2] == 0).all() and lab.sum() == labels.sum()
    with pytest.raises(ValueError, match="segmentation is empty"):
        pp.crop_to_anatomies(image, np.zeros_like(labels), (1, 1, 1), (1, 1, 1))


# ------------------------------------------------------------------------------------------------------------------
# whole chain
# ------------------------------------------------------------------------------------------------------------------
KW = {
    "anatomies": ANATOMIES,
    "spacing_xyz": (1.5, 1.5, 3.0),
    "hu_window": (-1150, 350),
    "margin_zyx": (5, 20, 20),
    "min_size_zyx": (32, 64, 64),
}


@needs_data
def test_preprocess_scan_example(class_table):
    out = pp.preprocess_scan(
        EXAMPLE / "example_ct_sm.nii.gz", EXAMPLE / "example_seg.nii.gz", class_table=class_table, **KW
    )
    img, lab = out["image"], out["labels"]
    assert img.dtype == np.uint8 and lab.dtype == np.uint8 and img.shape == lab.shape
    assert out["source_shape"] == (30, 101, 122)
    np.testing.assert_allclose(out["source_spacing_xyz"], (3, 3, 3), atol=1e-4)
    assert out["spacing_xyz"] == (1.5, 1.5, 3.0)
    assert all(s >= m for s, m in zip(img.shape, KW["min_size_zyx"]))
    assert img.shape[0] <= 30 + 2 * 5 + 2 and img.shape[1] <= 202 and img.shape[2] <= 244
    assert out["present"].tolist() == [True, True, True, True, False]
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
    # liver is soft tissue, lung is air (window [-1150, 350] -> 0..255)
    liver_hu = img[lab == 2].astype(float).mean() / 255 * 1500 - 1150
    lung_hu = img[lab == 1].astype(float).mean() / 255 * 1500 - 1150
    assert 0 < liver_hu < 200 and lung_hu < -600
    # equals the naive chain (resample everything, window, crop)
    ct, aff = pp.load_ct(EXAMPLE / "example_ct_sm.nii.gz")
    seg, _ = pp.load_segmentation(EXAMPLE / "example_seg.nii.gz", class_table, ANATOMIES)
    ct_zyx, _, sp = pp.to_canonical(ct, aff)
    seg_zyx, _, _ = pp.to_canonical(seg, aff)
    r_img = pp.window(pp.resample(ct_zyx, sp, KW["spacing_xyz"], order=1), -1150, 350)
    r_lab = pp.resample(seg_zyx, sp, KW["spacing_xyz"], order=0, out_shape=r_img.shape)
    c_img, c_lab, info = pp.crop_to_anatomies(r_img, r_lab, KW["margin_zyx"], KW["min_size_zyx"])
    np.testing.assert_array_equal(lab, c_lab)
    np.testing.assert_array_equal(img, np.rint(c_img * 255).astype(np.uint8))
    # output affine: every output voxel is at the world point of the source coordinate it was sampled at (the
    # centre-aligned convention of _ref_coords on nibabel's canonical grid, after the crop and the padding)
    canon = nib.as_closest_canonical(nib.load(EXAMPLE / "example_ct_sm.nii.gz"))
    src_spacing = np.asarray(canon.header.get_zooms()[:3], float)[::-1]  # zyx
    new_spacing = np.asarray(KW["spacing_xyz"], float)[::-1]
    src_shape = canon.shape[::-1]
    for corner in np.ndindex(2, 2, 2):
        idx = [c * (n - 1) for c, n in zip(corner, lab.shape)]  # zyx
        coord = []
        for a in range(3):
            resampled = idx[a] + info["crop_start_zyx"][a] - info["pad_zyx"][a][0]
            n_out = round(src_shape[a] * src_spacing[a] / new_spacing[a])
            coord.append(_ref_coords(src_shape[a], src_spacing[a], n_out, new_spacing[a])[0]
                         + resampled * new_spacing[a] / src_spacing[a])
        want = canon.affine @ [*coord[::-1], 1]
        np.testing.assert_allclose(out["affine"] @ [*idx[::-1], 1], want, atol=1e-4, err_msg=str(corner))


@needs_data
def test_preprocess_scan_grid_mismatch(class_table, tmp_path):
    seg = nib.load(EXAMPLE / "example_seg.nii.gz")
    aff = seg.affine.copy()
    aff[0, 3] += 1.0
    bad = tmp_path / "shifted_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), aff), bad)
    with pytest.raises(ValueError, match="not on the grid") as err:
        pp.preprocess_scan(EXAMPLE / "example_ct_sm.nii.gz", bad, class_table=class_table, **KW)
    assert "shifted_seg" in str(err.value) and "example_ct_sm" in str(err.value)
