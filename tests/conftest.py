"""Shared test setup: JAX's persistent compilation cache for every test process, the tiny demo config, the
prepared tiny demo workdir, and the real CTs in ../shared/data.

Markers: `slow` (a test that takes more than a few seconds: subprocesses, CLI runs, training) is left out of the
fast lane, `pytest -m "not slow"`.
"""

import atexit
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# One compilation cache for this pytest run and every process it starts (CLI runs, multi-process tests): they
# compile the same tiny programs many times. Set before JAX is imported. A fresh folder per run, removed at the end,
# so a run's time never depends on an earlier run; FVLM_TEST_JAX_CACHE=<folder> keeps one across runs instead.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _keep = os.environ.get("FVLM_TEST_JAX_CACHE")
    _cache = _keep or tempfile.mkdtemp(prefix="fvlm_jax_test_cache_")
    if not _keep:
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' programs are tiny, so compiling them costs far more than running them: XLA's CPU backend compiles
# without LLVM's costly optimisation passes (the same operations, run more slowly; about 40 % less CPU time per
# compiled test) and with its older fusion code generator (the tiny train step: 5.2-5.9 CPU-s to compile instead of
# 8.5, 0.47-0.52 s per step instead of 0.42-0.49). Processes the tests start inherit it. FVLM_TEST_XLA_OPT=1 keeps
# XLA's defaults.
if os.environ.get("FVLM_TEST_XLA_OPT") != "1":
    _fast = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
             "--xla_cpu_use_fusion_emitters=false")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_fast}".strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The real CTs live in ../shared/data beside the checkout; FVLM_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("FVLM_SHARED_DATA", ROOT.parent / "shared" / "data"))
TINY_CONFIG = f"--config={ROOT / 'configs' / 'demo.py'}:tiny"


def tiny_config():
    """configs/demo.py:tiny, the tests' shared config (what the CLI tests run)."""
    return demo.get_config("tiny")


def run_cli(workdir, *args, timeout=900):
    """Runs the real CLI on the demo config; returns the CompletedProcess (asserting success)."""
    cmd = [sys.executable, str(ROOT / "run.py"), TINY_CONFIG, f"--workdir={workdir}", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory):
    """A workdir with the tiny demo data set generated and prepared (records, tokenizer, manifest), made once per
    run: pytest-xdist workers share it (the first to ask prepares it, under a lock). Tests read its records and
    tokenizer; a test that trains in it, or runs prepare again (--mode=all does), works in a copy: prepare rewrites
    the records that other tests read at the same time."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:  # each worker's base folder sits in the run's common one
        root = root.parent
    workdir = root / "prepared_demo"
    with open(root / "prepared_demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "PREPARED").exists():
            # In this process, as `run.py --mode=prepare` would (the CLI tests run that command themselves).
            from fvlm_jax import stages

            stages.run_prepare(tiny_config(), str(workdir))
            (workdir / "PREPARED").touch()
    return workdir


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (the real CTs live beside the checkout)")
    return SHARED_DATA


def phantom_ct(shape=(16, 14, 10)):
    """Asymmetric HU volume (air, body, lung, liver) and TotalSegmentator v2 labels (10 = lung lobe, 5 = liver)."""
    hu = np.full(shape, -1000, np.int16)
    seg = np.zeros(shape, np.uint8)
    hu[2:-2, 2:-2, 1:-1] = 40
    hu[3:8, 4:10, 2:8] = -850
    seg[3:8, 4:10, 2:8] = 10
    hu[9:13, 4:9, 2:6] = 60
    seg[9:13, 4:9, 2:6] = 5
    hu[10, 5, 3] = 300  # a bright voxel in a corner of the liver: flips show
    return hu, seg


def manifest_config(source="manifest", **data):
    """Demo config for tiny synthetic scans on a 10 mm grid, one split, one worker."""
    cfg = demo.get_config()
    cfg.data.source = source
    cfg.data.threshold_split = cfg.data.eval_split = "train"
    cfg.data.workers, cfg.data.num_shards = 1, 1
    cfg.prep.spacing_xyz = (10.0, 10.0, 10.0)
    cfg.prep.margin_zyx = (0, 0, 0)
    cfg.prep.min_size_zyx = (8, 8, 8)
    cfg.prep.vocab_size = 64
    cfg.data.update(data)
    return cfg


def write_demo_case(folder, name, seed):
    """A synthetic demo CT and its TotalSegmentator v2 labels as <folder>/<name>.nii.gz and <folder>/<name>_seg.nii.gz;
    returns (image path, segmentation path, the case)."""
    import nibabel as nib

    from input_pipeline import demo_data

    case = demo_data.generate_case(np.random.default_rng(seed))
    ct, seg = Path(folder) / f"{name}.nii.gz", Path(folder) / f"{name}_seg.nii.gz"
    nib.save(nib.Nifti1Image(case["image"], case["affine"]), ct)
    nib.save(nib.Nifti1Image(case["seg"], case["affine"]), seg)
    return ct, seg, case


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """An export folder of a randomly initialised fVLM on configs/demo.py:tiny (no training: plumbing and numerics
    against the Predictor, not accuracy), with a tokenizer trained on one demo report."""
    from fvlm_jax import export, train_state
    from input_pipeline.tokenizer import train_tokenizer
    from input_pipeline.totalseg_classes import CLASS_TABLES

    tmp = tmp_path_factory.mktemp("tiny_export")
    _, _, case = write_demo_case(tmp, "tok", 0)
    train_tokenizer([case["findings"], case["impression"]] * 10, str(tmp / "tok.model"), 64)
    cfg = tiny_config()
    return Path(export.export(train_state.create_model(cfg, "fvlm"), "fvlm", cfg, str(tmp / "tok.model"),
                              CLASS_TABLES["total"], str(tmp / "export" / "fvlm")))


def pytest_collection_modifyitems(config, items):
    """Slow tests first (in their files' order): pytest-xdist hands out tests in order, so the long ones start
    early and the short ones fill the workers' last minutes, instead of one worker finishing a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
