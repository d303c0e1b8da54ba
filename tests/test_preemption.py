"""SIGKILL or SIGTERM during training, then the same command again: the log continues exactly as an uninterrupted
run's. SIGTERM (a scheduler's preemption notice) also saves a checkpoint at the step it arrives, so no step is lost."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# Slow (subprocesses), and on one pytest-xdist worker: the module's reference run is made once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("preemption")]

SCRIPT = textwrap.dedent("""
    import itertools, os, sys, time
    from configs import demo
    from fvlm_jax import synthetic, train

    cfg = demo.get_config("tiny")
    cfg.train.update(batch_size=4, steps=12, warmup_steps=2, log_every=5,
                     checkpoint_every=int(os.environ.get("CHECKPOINT_EVERY", "3")))
    pause = float(os.environ.get("STEP_PAUSE", "0"))  # seconds per step: room to land a signal mid-run


    def batches(start):
        for i in itertools.count(start):
            time.sleep(pause)
            yield synthetic.random_batch(cfg, 4, seed=i)

    try:
        train.train(cfg, "fvlm", sys.argv[1], batches, progress=False)
    except train.Preempted:
        sys.exit(143)
""")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, wait=True, checkpoint_every=3, pause=0.0):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CHECKPOINT_EVERY=str(checkpoint_every), STEP_PAUSE=str(pause))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(workdir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir)
    return _steps(workdir)


def _signal_after(workdir, sig, n_steps, checkpoint_every=3):
    """Starts training and sends `sig` once `n_steps` rows are logged; returns the finished process."""
    # A quarter second per step: the signal lands well before the run's end, however loaded the machine.
    proc = _run(workdir, wait=False, checkpoint_every=checkpoint_every, pause=0.25)
    deadline = time.time() + 300
    while len(_steps(workdir)) < n_steps and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail("training finished before the signal could be sent")
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    return proc, err


def _steps(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path, reference):
    killed = tmp_path / "killed"
    _signal_after(killed, signal.SIGKILL, 7)  # past the step-6 checkpoint, mid-way to step 9
    _run(killed)  # the same command again
    got = _steps(killed)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(got, reference):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)


def test_sigterm_saves_where_it_stops_then_rerun_matches_uninterrupted(tmp_path, reference):
    import orbax.checkpoint as ocp

    stopped = tmp_path / "stopped"
    # No regular checkpoint before the last step: whatever is saved before it comes from the notice.
    proc, err = _signal_after(stopped, signal.SIGTERM, 4, checkpoint_every=100)
    assert proc.returncode == 143, err[-3000:]
    assert "preemption notice (SIGTERM)" in err
    logged = [r["step"] for r in _steps(stopped)]
    assert logged[-1] < 12
    with ocp.CheckpointManager(str(stopped / "checkpoints")) as mngr:
        assert mngr.latest_step() == logged[-1]  # saved exactly where it stopped: no step is lost
    _run(stopped)  # the same command again
    got = _steps(stopped)
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(got, reference):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
