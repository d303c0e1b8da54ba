"""Prediction on new scans (fvlm_jax.predict, run.py --mode=predict) with a randomly initialised tiny export: every
result against the Predictor's own encode/score, anatomy statuses against NumPy on the raw segmentation files, and
the error paths (per scan, and one-line CLI errors)."""

import json
import os
import shutil
import subprocess
import sys

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, SHARED_DATA, write_demo_case

from fvlm_jax import config_checks, layout, predict
from fvlm_jax.export import FORMAT_VERSION, Predictor
from input_pipeline.totalseg_classes import CLASS_TABLES

EXAMPLE = SHARED_DATA / "totalseg_example"


def reference_status(pred, seg_path, in_input, intact_in_input):
    """Each anatomy's status from the raw segmentation file: its class ids present, on a face of the array."""
    raw = np.asarray(nib.load(str(seg_path)).dataobj)
    by_name = {n: i for i, n in CLASS_TABLES["total"].items()}
    faces = [raw[0], raw[-1], raw[:, 0], raw[:, -1], raw[:, :, 0], raw[:, :, -1]]
    out = {}
    for name, classes in pred.anatomies.items():
        ids = [by_name[c] for c in classes]
        present = bool(np.isin(raw, ids).any())
        edge = any(np.isin(f, ids).any() for f in faces)
        out[name] = predict.anatomy_status(present, edge, in_input[name], intact_in_input[name])
    return out


def test_anatomy_status_rules():
    s = predict.anatomy_status
    assert s(False, False, False, False) == predict.ABSENT
    assert s(True, True, True, True) == predict.CUT_BY_SCAN  # intact in the padded input, but the scan cuts it
    assert s(True, False, False, False) == predict.OUTSIDE_INPUT
    assert s(True, False, True, False) == predict.CUT_BY_INPUT
    assert s(True, False, True, True) == predict.SCORED


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tiny_export):
    """A manifest of good and bad scans, predicted once in-process."""
    if not EXAMPLE.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (the real CTs live beside the checkout)")
    d = tmp_path_factory.mktemp("predict_cases")
    rows = []
    for i in (1, 2):
        ct, seg, _ = write_demo_case(d, f"demo{i}", i)
        rows.append({"id": f"demo{i}", "image": ct.name, "segmentation": seg.name})
    ct = EXAMPLE / "example_ct_sm.nii.gz"
    rows.append({"id": "real", "image": str(ct), "segmentation": str(EXAMPLE / "example_seg.nii.gz")})
    rows.append({"id": "real_parts", "image": str(ct), "segmentation": str(EXAMPLE / "example_seg_parts")})
    # The DICOM series of the same data set, with TotalSegmentator's output for it.
    rows.append({"id": "dicom", "image": str(EXAMPLE / "ct_dicom"),
                 "segmentation": str(EXAMPLE / "example_seg_dicom.nii.gz")})
    # "Head CT": the real CT with a segmentation that keeps only classes of no configured anatomy (vertebrae, ribs,
    # stomach, colon...): no anatomy of this chest-and-abdomen model is there.
    seg = nib.load(str(EXAMPLE / "example_seg.nii.gz"))
    raw = np.asarray(seg.dataobj).copy()
    wanted = {c for classes in Predictor(str(tiny_export)).anatomies.values() for c in classes}
    raw[np.isin(raw, [i for i, n in CLASS_TABLES["total"].items() if n in wanted])] = 0
    assert raw.any()
    nib.save(nib.Nifti1Image(raw, seg.affine), d / "head_seg.nii.gz")
    rows.append({"id": "head", "image": str(ct), "segmentation": "head_seg.nii.gz"})
    # Bad scans: segmentation missing, on another grid, an image that is not CT in HU; a duplicate id.
    rows.append({"id": "no_seg", "image": str(ct), "segmentation": "missing_seg.nii.gz"})
    rows.append({"id": "off_grid", "image": str(ct), "segmentation": str(EXAMPLE / "example_seg_dicom.nii.gz")})
    img = nib.load(str(d / "demo1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1200, img.affine), d / "mr_like.nii.gz")
    rows.append({"id": "not_ct", "image": "mr_like.nii.gz", "segmentation": "demo1_seg.nii.gz"})
    rows.append({"id": "demo1", "image": "demo2.nii.gz", "segmentation": "demo2_seg.nii.gz"})
    manifest = d / "scans.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    out = d / "out"
    out.mkdir()
    (out / "not_ct.json").write_text("{}")  # an earlier run's result: removed, the folder shows this run's
    res = predict.predict(str(tiny_export), str(manifest), None, str(out), batch_size=3, progress=False)
    return {"dir": d, "out": out, "res": res, "pred": Predictor(str(tiny_export))}


@pytest.mark.slow  # the tiny export and the predicted manifest: ~20 s of setup
def test_good_scans_are_written_and_bad_ones_listed(cases):
    out, res = cases["out"], cases["res"]
    assert res["written"] == ["demo1", "demo2", "real", "real_parts", "dicom", "head"]
    errors = {e["id"]: e["error"] for e in res["errors"]}
    assert json.loads((out / "errors.json").read_text()) == res["errors"]
    assert set(errors) == {"scans.jsonl line 11", "no_seg", "off_grid", "not_ct", "demo1"}
    assert "not valid JSON" in errors["scans.jsonl line 11"]
    assert errors["no_seg"].startswith("segmentation not found")
    assert "is not on the grid of image" in errors["off_grid"]
    assert "does not look like CT in Hounsfield units" in errors["not_ct"]
    assert errors["demo1"] == "duplicate scan id 'demo1'"
    names = sorted(os.listdir(out))
    assert names == sorted(["errors.json"] + [f"{i}.{e}" for i in res["written"] for e in ("json", "npz", "png")])


@pytest.mark.slow  # the tiny export and the predicted manifest: ~20 s of setup
def test_results_match_the_predictor(cases):
    """Embeddings, statuses and task probabilities against Predictor.encode/score and the raw segmentation."""
    pred, out, d = cases["pred"], cases["out"], cases["dir"]
    scored_somewhere = 0
    for sid, ct, seg in (("demo1", d / "demo1.nii.gz", d / "demo1_seg.nii.gz"),
                         ("demo2", d / "demo2.nii.gz", d / "demo2_seg.nii.gz"),
                         ("real", EXAMPLE / "example_ct_sm.nii.gz", EXAMPLE / "example_seg.nii.gz"),
                         ("dicom", EXAMPLE / "ct_dicom", EXAMPLE / "example_seg_dicom.nii.gz")):
        result = json.loads((out / f"{sid}.json").read_text())
        enc = pred.encode(str(ct), str(seg))
        want = reference_status(pred, seg, enc["present"], enc["intact"])
        assert {n: v["status"] for n, v in result["anatomies"].items()} == want, sid
        assert all(v["intact"] == (v["status"] == "scored") for v in result["anatomies"].values())
        scored = {n for n, s in want.items() if s == "scored"}
        scores = pred.score(str(ct), str(seg))
        want_tasks = {k: v for k, v in scores.items() if k.split("/")[0] in scored}
        assert set(result["tasks"]) == set(want_tasks)
        assert result["tasks"] == pytest.approx(want_tasks, abs=1e-5)
        emb = np.load(out / f"{sid}.npz")
        assert set(emb.files) == {n for n, p in enc["present"].items() if p}
        for name in emb.files:
            np.testing.assert_allclose(emb[name], enc["embeddings"][name], atol=1e-5)
        scored_somewhere += len(scored)
        png = matplotlib.image.imread(out / f"{sid}.png")
        assert png.shape[:2] == (520, 1300) and png.std() > 0.05
    assert scored_somewhere >= 5  # the demo phantoms hold whole anatomies: tasks are scored there
    # The real CT is 90 mm tall: every organ in it runs out of the scan, and the multi-label file and the folder of
    # parts (TotalSegmentator's --fast result) agree.
    real = json.loads((out / "real.json").read_text())
    parts = json.loads((out / "real_parts.json").read_text())
    assert real["summary"] == "no scored anatomy" and real["tasks"] == {}
    assert {n: v["status"] for n, v in real["anatomies"].items()} == {
        n: v["status"] for n, v in parts["anatomies"].items()}
    assert real["anatomies"]["heart"] == {"present": False, "intact": False, "status": "absent"}
    assert real["anatomies"]["liver"]["status"] == "cut by the scan's field of view"


@pytest.mark.slow  # the tiny export and the predicted manifest: ~20 s of setup
def test_a_scan_without_any_model_anatomy_scores_nothing(cases):
    result = json.loads((cases["out"] / "head.json").read_text())
    assert result["summary"] == "no scored anatomy" and result["tasks"] == {}
    assert all(v == {"present": False, "intact": False, "status": "absent"} for v in result["anatomies"].values())
    assert np.load(cases["out"] / "head.npz").files == []


def test_list_scans_kinds_and_argument_errors(tmp_path):
    scans, segs = tmp_path / "scans", tmp_path / "segs"
    scans.mkdir()
    (segs / "b").mkdir(parents=True)
    for name in ("a.nii.gz", "b.nii", "notes.txt"):
        (scans / name).write_bytes(b"x")
    (segs / "a.nii.gz").write_bytes(b"x")
    jobs, errors = predict.list_scans(str(scans), str(segs))
    assert errors == [] and [(j.id, os.path.basename(j.segmentation)) for j in jobs] == [("a", "a.nii.gz"), ("b", "b")]
    dicom = tmp_path / "series1"
    dicom.mkdir()
    (dicom / "CT.1").write_bytes(b"x")
    jobs, _ = predict.list_scans(str(dicom), str(segs / "a.nii.gz"))
    assert [(j.id, j.image) for j in jobs] == [("series1", str(dicom))]
    with pytest.raises(ValueError, match="--segmentation is needed"):
        predict.list_scans(str(scans / "a.nii.gz"), None)
    with pytest.raises(FileNotFoundError, match="input not found"):
        predict.list_scans(str(tmp_path / "nope.nii.gz"), str(segs))
    with pytest.raises(FileNotFoundError, match="segmentation not found"):
        predict.list_scans(str(scans / "a.nii.gz"), str(tmp_path / "nope"))
    (tmp_path / "m.jsonl").write_text("")
    with pytest.raises(ValueError, match="not used with a manifest"):
        predict.list_scans(str(tmp_path / "m.jsonl"), str(segs))
    assert predict.check_id("../x", set()) and predict.check_id("a", {"a"}) and predict.check_id("a", set()) is None


@pytest.mark.slow  # the tiny export and the predicted manifest: ~20 s of setup
def test_export_format_version_is_checked(tiny_export, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_export, old)
    meta = json.loads((old / "model.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    meta["format_version"] = FORMAT_VERSION - 1
    (old / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"has format version {FORMAT_VERSION - 1}; this fvlm-jax reads format"):
        Predictor(str(old))
    del meta["format_version"]
    (old / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no format_version"):
        Predictor(str(old))
    (old / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json is missing"):
        Predictor(str(old))


def test_user_errors_are_ours_with_a_message(tmp_path):
    from configs import demo

    cfg = demo.get_config()
    cfg.model.input_zyx = (30, 48, 64)
    no_export = lambda: predict.predict(str(tmp_path / "x"), str(tmp_path), str(tmp_path), str(tmp_path))  # noqa: E731
    for fn in (lambda: config_checks.validate(cfg), lambda: layout.load_manifest(str(tmp_path)), no_export):
        with pytest.raises(Exception) as info:
            fn()
        assert config_checks.user_error(info.value) == str(info.value) and str(info.value)
    assert str(info.value) == f"export folder not found: {tmp_path / 'x'}"
    with pytest.raises(ValueError) as info:  # raised inside NumPy: may be a bug of ours, keeps its traceback
        np.zeros(-1)
    assert config_checks.user_error(info.value) is None
    with pytest.raises(IndexError) as info:
        [][0]
    assert config_checks.user_error(info.value) is None


# run.py with TensorFlow made unimportable: prediction must not need it.
NO_TF_RUN = ("import runpy, sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None; "
             "sys.argv = ['run.py'] + sys.argv[1:]; runpy.run_path('run.py', run_name='__main__')")


def _run(*args):
    return subprocess.run([sys.executable, "-c", NO_TF_RUN, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.slow
def test_cli_errors_are_one_line(cases, tiny_export, tmp_path):
    d = cases["dir"]
    res = _run("--mode=predict", f"--export={tiny_export}", f"--input={d / 'mr_like.nii.gz'}",
               f"--segmentation={d / 'demo1_seg.nii.gz'}", f"--output={tmp_path / 'out'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "mr_like: image does not look like CT" in lines[0], res.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["errors.json"]
    res = _run("--mode=predict", f"--export={tiny_export}", f"--input={d / 'demo2.nii.gz'}",
               f"--segmentation={d / 'demo2_seg.nii.gz'}", f"--output={tmp_path / 'ok'}")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "ok" / "demo2.json").read_text())["tasks"] == json.loads(
        (cases["out"] / "demo2.json").read_text())["tasks"]
