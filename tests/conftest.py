import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import demo

ROOT = Path(__file__).resolve().parents[1]
# The real CTs live in ../shared/data beside the checkout; FVLM_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("FVLM_SHARED_DATA", ROOT.parent / "shared" / "data"))

# A tiny demo configuration: seconds per stage on a 2-core CPU.
TINY = [
    "--config.data.num_train=32", "--config.data.num_valid=12", "--config.data.num_test=12",
    "--config.data.num_shards=2", "--config.train.batch_size=8", "--config.train.steps=4",
    "--config.train.warmup_steps=1", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
    "--config.model.vision.width=32", "--config.model.text.width=32", "--config.model.embed_dim=32",
]


def run_cli(workdir, *args, timeout=900):
    """Runs the real CLI on the demo config; returns the CompletedProcess (asserting success)."""
    cmd = [sys.executable, str(ROOT / "run.py"), f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={workdir}",
           *TINY, *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory):
    """A workdir with the tiny demo data set generated and prepared (records, tokenizer, manifest)."""
    workdir = tmp_path_factory.mktemp("demo")
    run_cli(workdir, "--mode=prepare")
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
