"""Tests for the synthetic CT phantom data set (input_pipeline/demo_data.py)."""

import ast
import csv
import filecmp
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from input_pipeline import demo_data as dd

_COUNTS = {"num_train": 3, "num_valid": 2, "num_test": 2}
_TABLES = [("radiology_text_reports", "{t}_reports.csv"), ("multi_abnormality_labels", "{lab}_predicted_labels.csv"),
           ("metadata", "{t}_metadata.csv")]
_NAMES = {"train": ("train", "train", 0), "valid": ("validation", "valid", 1), "test": ("test", "test", 2)}


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    return dd.generate_demo_dataset(root, seed=3, progress=False, **_COUNTS)


def test_deterministic(dataset, tmp_path):
    again = dd.generate_demo_dataset(str(tmp_path), seed=3, progress=False, **_COUNTS)
    assert again["splits"] == dataset["splits"] == {"train": 3, "valid": 2, "test": 2}
    for split, (t, lab, _) in _NAMES.items():
        for folder, pattern in _TABLES:
            name = os.path.join(folder, pattern.format(t=t, lab=lab))
            assert filecmp.cmp(os.path.join(dataset["root"], name), os.path.join(again["root"], name), shallow=False)
        for i in range(1, _COUNTS[f"num_{split}"] + 1):
            rel = os.path.join("segmentations", split, f"{split}_{i}_a_1.nii.gz")
            a = nib.load(os.path.join(dataset["root"], rel))
            b = nib.load(os.path.join(again["root"], rel))
            np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    other = dd.generate_case(np.random.default_rng([4, 0, 1]))
    same = dd.generate_case(np.random.default_rng([3, 0, 1]))
    assert not np.array_equal(other["image"], same["image"]) or other["image"].shape != same["image"].shape


def test_cases_independent_of_other_split_sizes(dataset, tmp_path):
    small = dd.generate_demo_dataset(str(tmp_path), num_train=1, num_valid=0, num_test=2, seed=3, progress=False)
    a = _read_csv(os.path.join(small["root"], "radiology_text_reports", "test_reports.csv"))
    b = _read_csv(os.path.join(dataset["root"], "radiology_text_reports", "test_reports.csv"))
    assert a == b


def test_files_geometry_and_tables(dataset):
    root = dataset["root"]
    for split, (t, lab, code) in _NAMES.items():
        meta = {r["VolumeName"]: r for r in _read_csv(os.path.join(root, "metadata", f"{t}_metadata.csv"))}
        labels = {r["VolumeName"]: r for r in
                  _read_csv(os.path.join(root, "multi_abnormality_labels", f"{lab}_predicted_labels.csv"))}
        reports = _read_csv(os.path.join(root, "radiology_text_reports", f"{t}_reports.csv"))
        assert list(reports[0]) == ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                    "Impressions_EN"]
        assert list(next(iter(labels.values()))) == ["VolumeName", *dd.CT_RATE_LABELS, *dd.EXTRA_LABELS]
        for i in range(1, _COUNTS[f"num_{split}"] + 1):
            name = f"{split}_{i}_a_1.nii.gz"
            img = nib.load(os.path.join(root, "dataset", split, f"{split}_{i}", f"{split}_{i}_a", name))
            seg = nib.load(os.path.join(root, "segmentations", split, name))
            data = np.asanyarray(img.dataobj)
            assert data.dtype == np.int16 and np.asanyarray(seg.dataobj).dtype == np.uint8
            assert data.min() < -900 and data.max() > 200  # air and bone
            np.testing.assert_allclose(img.affine, seg.affine)
            assert 70 <= data.shape[0] <= 95 and 55 <= data.shape[1] <= 75 and 38 <= data.shape[2] <= 50

            # Metadata (DICOM LPS) describes exactly the stored NIfTI grid.
            row = meta[name]
            xy, z = ast.literal_eval(row["XYSpacing"]), float(row["ZSpacing"])
            np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), [*xy, z], atol=1e-4)
            np.testing.assert_allclose(img.header.get_zooms(), [*xy, z], atol=1e-4)
            assert (float(row["RescaleSlope"]), float(row["RescaleIntercept"])) == (1.0, 0.0)
            iop = np.array(ast.literal_eval(row["ImageOrientationPatient"]))
            direction_lps = np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])], axis=1)
            to_ras = np.diag([-1.0, -1.0, 1.0])
            np.testing.assert_allclose(to_ras @ direction_lps @ np.diag([*xy, z]), img.affine[:3, :3], atol=1e-4)
            np.testing.assert_allclose(to_ras @ np.array(ast.literal_eval(row["ImagePositionPatient"])),
                                       img.affine[:3, 3], atol=1e-3)

            # Stored data, once reoriented to RAS, is exactly the in-memory phantom; the labels are its truth.
            case = dd.generate_case(np.random.default_rng([3, code, i]))
            canonical = nib.as_closest_canonical(img)
            np.testing.assert_array_equal(np.asanyarray(canonical.dataobj), case["image"])
            np.testing.assert_allclose(canonical.affine, case["affine"], atol=1e-4)
            positives = {d for ds in case["truth"].values() for d in ds}
            for column in dd.CT_RATE_LABELS + dd.EXTRA_LABELS:
                assert int(labels[name][column]) == int(column in positives), column
            report = next(r for r in reports if r["VolumeName"] == name)
            assert report["Findings_EN"] == case["findings"]


def test_both_storage_orientations_used():
    orient = {dd.generate_case(np.random.default_rng([0, 0, i]))["orientation"] for i in range(12)}
    assert orient == {"RAS", "LPS"}


@pytest.fixture(scope="module")
def cases():
    return [dd.generate_case(np.random.default_rng([11, 0, i])) for i in range(200)]


@pytest.mark.slow
def test_anatomies_intact_and_prevalence(cases):
    n_normal = 0
    for case in cases:
        seg = case["seg"]
        for anatomy, ids in dd.SEG_IDS.items():
            idx = np.argwhere(np.isin(seg, ids))
            assert len(idx) > 20, anatomy
            assert idx.min() >= 2 and (np.array(seg.shape) - 1 - idx.max(0)).min() >= 2, anatomy
        assert set(case["truth"]) == set(dd.ANATOMIES)
        for anatomy, diseases in case["truth"].items():
            assert set(diseases) <= set(dd.DISEASES[anatomy])
        n_normal += not any(case["truth"].values())
    assert 0.2 <= n_normal / len(cases) <= 0.4
    for anatomy, diseases in dd.DISEASES.items():
        for disease in diseases:
            rate = np.mean([disease in c["truth"][anatomy] for c in cases])
            assert 0.1 <= rate <= 0.3, (disease, rate)


_BINS = (-2000, -950, -700, -300, -50, 20, 100, 300, 4000)


def _features(image, seg, spacing, ids):
    """Simple hand-made features of one anatomy from the image and its mask only."""
    mask = np.isin(seg, ids)
    # Within the mask's bounding box and a 1-voxel margin: the size-3 filters and the labelling see what they would
    # on the whole volume, at a fraction of the cost.
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects(mask.astype(np.int8))[0])
    image, mask = image[box], mask[box]
    hu = image[mask].astype(float)
    voxel_ml = np.prod(spacing) / 1000
    counts = np.histogram(hu, _BINS)[0]
    # Locally averaged HU (normalised convolution inside the mask) shows lesions despite the noise.
    w = ndimage.uniform_filter(mask.astype(float), 3)
    smooth = ndimage.uniform_filter(np.where(mask, image, 0).astype(float), 3) / np.maximum(w, 1e-6)
    sm = smooth[mask]
    med = np.median(sm)
    dense = mask & (image > -300)
    lab, _ = ndimage.label(dense)
    sizes = np.bincount(lab.ravel())[1:] * voxel_ml
    lo, hi = np.argwhere(mask).min(0), np.argwhere(mask).max(0)
    mid = (lo + hi) / 2
    octants = []
    if dense.any():
        pos = np.argwhere(dense)
        code = (pos > mid).astype(int) @ np.array([4, 2, 1])
        octants = np.bincount(code, minlength=8) / mask.sum()
    else:
        octants = np.zeros(8)
    return np.concatenate([
        [np.log(mask.sum() * voxel_ml)], counts / mask.sum(), np.log1p(counts * voxel_ml),
        np.percentile(sm, [1, 5, 25, 50, 75, 95, 99]) / 100,
        [np.mean(sm < med - 12), np.mean(sm > med + 12), np.sum((sizes > 0.3) & (sizes < 25))],
        octants,
    ])


@pytest.mark.slow
def test_each_disease_visible_to_a_simple_supervised_model(cases):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = {a: np.stack([_features(c["image"], c["seg"], np.abs(np.diag(c["affine"])[:3]), dd.SEG_IDS[a])
                          for c in cases]) for a in dd.ANATOMIES}
    n_train = 130
    for anatomy, diseases in dd.DISEASES.items():
        x = feats[anatomy]
        for disease in diseases:
            y = np.array([disease in c["truth"][anatomy] for c in cases])
            model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
            model.fit(x[:n_train], y[:n_train])
            auc = roc_auc_score(y[n_train:], model.predict_proba(x[n_train:])[:, 1])
            assert auc >= 0.9, (anatomy, disease, auc)


def test_template_mode_changes_only_normal_anatomies_texts(dataset, tmp_path):
    """data.demo_templates: every described normal anatomy's text, as the shipped splitter and the public code's
    captions make it from the report, is the one template sentence, flagged normal; labels, metadata, impressions and
    images are those of the default mode."""
    from configs import demo
    from input_pipeline import captions, report_split

    templated = dd.generate_demo_dataset(str(tmp_path), seed=3, templates=True, progress=False, **_COUNTS)
    lexicon, vocabulary = report_split.configured_vocabulary(demo.get_config().prep)
    project, reference = {}, {}  # anatomy -> set of normal texts over the scans
    n_normal = 0
    for t, lab, code in _NAMES.values():
        for folder, pattern in _TABLES[1:]:
            name = os.path.join(folder, pattern.format(t=t, lab=lab))
            assert filecmp.cmp(os.path.join(dataset["root"], name), os.path.join(templated["root"], name),
                               shallow=False)
        default = _read_csv(os.path.join(dataset["root"], "radiology_text_reports", f"{t}_reports.csv"))
        reports = _read_csv(os.path.join(templated["root"], "radiology_text_reports", f"{t}_reports.csv"))
        assert [r["Impressions_EN"] for r in reports] == [r["Impressions_EN"] for r in default]
        for i, report in enumerate(reports, 1):
            case = dd.generate_case(np.random.default_rng([3, code, i]), templates=True)
            assert report["Findings_EN"] == case["findings"]
            split_parts = report_split.split_report(report["Findings_EN"], report["Impressions_EN"], lexicon,
                                                    vocabulary)
            public = captions.anatomy_texts(
                report_split.split_report(report["Findings_EN"], "", lexicon, vocabulary),
                report_split.split_report("", report["Impressions_EN"], lexicon, vocabulary), dd.ANATOMIES,
                template_texts=True, normal_from_impression=True)
            for anatomy, truth in case["truth"].items():
                if truth:  # abnormal: its diseases are still read from its own sentences
                    assert set(truth) <= set(split_parts[anatomy].diseases) and not split_parts[anatomy].normal
                    continue
                if anatomy in split_parts:  # a normal anatomy the report describes (radiologists skip some)
                    n_normal += 1
                    assert split_parts[anatomy].normal and public[anatomy].normal
                    project.setdefault(anatomy, set()).add(split_parts[anatomy].text)
                    reference.setdefault(anatomy, set()).add(captions.encoded_text(anatomy, public[anatomy].text))
    assert n_normal >= 20
    assert project == {a: {dd.template_sentence(a)} for a in project} and len(project) == len(dd.ANATOMIES)
    assert all(len(texts) == 1 for texts in reference.values())
    plain = dd.generate_case(np.random.default_rng([3, 0, 1]))
    same = dd.generate_case(np.random.default_rng([3, 0, 1]), templates=True)
    assert np.array_equal(plain["image"], same["image"]) and plain["orientation"] == same["orientation"]
    assert plain["findings"] != same["findings"]
