"""SIGKILL during training, then the same command again: the log continues exactly as an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import itertools, sys
    from configs import demo
    from fvlm_jax import synthetic, train

    cfg = demo.get_config()
    cfg.model.vision.width = cfg.model.text.width = cfg.model.embed_dim = 32
    cfg.train.update(batch_size=4, steps=12, warmup_steps=2, checkpoint_every=3, log_every=5)
    batches = lambda start: (synthetic.random_batch(cfg, 4, seed=i) for i in itertools.count(start))
    train.train(cfg, "fvlm", sys.argv[1], batches, progress=False)
""")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, wait=True):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(workdir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return proc


def _steps(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    _run(reference)
    killed = tmp_path / "killed"
    proc = _run(killed, wait=False)
    deadline = time.time() + 300
    while len(_steps(killed)) < 7 and time.time() < deadline:  # past the step-6 checkpoint, mid-way to step 9
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("training finished before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _run(killed)  # the same command again
    got, want = _steps(killed), _steps(reference)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
