"""Preemption and crashes during training, then the same command again: the log continues exactly as an
uninterrupted single-process run's. SIGKILL resumes from the last regular checkpoint; SIGTERM (a scheduler's
preemption notice) to one process of a two-process job makes both save the same checkpoint at the same step and
stop, so no step is lost.

The two-process job is also the multi-host check of training: 2 processes of 2 CPU devices each (gloo collectives),
FSDP over all 4 devices, so every weight is split across the hosts (no process holds it whole) and its checkpoint is
written and read by both; every logged value equals the one-device run's."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

# Slow (subprocesses), and on one pytest-xdist worker: the module's reference run is made once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("preemption")]

SCRIPT = textwrap.dedent("""
    import itertools, os, sys, time
    import jax
    workdir, n_proc, proc_id, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if n_proc > 1:
        jax.config.update("jax_num_cpu_devices", 2)  # 4 devices in all, 2 x 2
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=n_proc, process_id=proc_id)
    from configs import demo
    from fvlm_jax import sharding, synthetic, train, train_state

    cfg = demo.get_config("tiny")
    cfg.train.update(batch_size=8, steps=12, warmup_steps=2, log_every=5,
                     checkpoint_every=int(os.environ["CHECKPOINT_EVERY"]))
    # FSDP over all devices: with 2 processes, every weight is split across the hosts.
    cfg.mesh.data, cfg.mesh.fsdp = 1, jax.device_count()
    if n_proc > 1:
        mesh = sharding.make_mesh(cfg)
        _, state_sh = train_state.state_shardings(cfg, "fvlm", train_state.make_optimizer(cfg), mesh)
        kernel = state_sh["params"]["vision"]["blocks"][0]["fc1"]["kernel"]
        assert not kernel.is_fully_addressable and len(kernel.device_set) == jax.device_count() == 4
        bad = demo.get_config("tiny")  # a mesh that leaves a host without devices is refused
        bad.mesh.data = 2
        try:
            sharding.make_mesh(bad)
            raise AssertionError("a 2-device mesh in a 4-device, 2-process job was accepted")
        except ValueError as e:
            assert "must use every device" in str(e), e
    pause = float(os.environ["STEP_PAUSE"])  # seconds per step: room to land a signal mid-run
    local = cfg.train.batch_size // n_proc

    def batches(start):
        for i in itertools.count(start):
            time.sleep(pause)
            b = synthetic.random_batch(cfg, cfg.train.batch_size, seed=i)
            yield {k: v[proc_id * local:(proc_id + 1) * local] for k, v in b.items()}  # this host's slice

    try:
        train.train(cfg, "fvlm", workdir, batches, progress=False)
    except train.Preempted:
        sys.exit(143)
""")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, n_proc=1, checkpoint_every=3, pause=0.0):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CHECKPOINT_EVERY=str(checkpoint_every), STEP_PAUSE=str(pause))
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, "-c", SCRIPT, str(workdir), str(n_proc), str(i), port], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            for i in range(n_proc)]


def _finish(procs):
    errs = [p.communicate(timeout=600)[1] for p in procs]
    return [p.returncode for p in procs], errs


def _run(workdir, n_proc=1):
    codes, errs = _finish(_start(workdir, n_proc))
    assert codes == [0] * n_proc, "\n".join(e[-3000:] for e in errs)


def _steps(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_for_rows(workdir, procs, n_rows):
    deadline = time.time() + 300
    while len(_steps(workdir)) < n_rows and time.time() < deadline:
        time.sleep(0.05)
    if any(p.poll() is not None for p in procs):
        pytest.fail("training ended before the signal could be sent: " + procs[0].stderr.read()[-2000:])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir)
    return _steps(workdir)


def _assert_continues_reference(got, reference):
    """Every logged value (loss, per-anatomy losses, norms, temperature, learning rate) of each step: a two-process
    run sums its gradients in another order than one device does, so equal to 2e-5."""
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(got, reference):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(a)], rtol=2e-5, atol=2e-5)


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path, reference):
    killed = tmp_path / "killed"
    # A quarter second per step: the signal lands well before the run's end, however loaded the machine.
    procs = _start(killed, pause=0.25)
    _wait_for_rows(killed, procs, 7)  # past the step-6 checkpoint, mid-way to step 9
    os.kill(procs[0].pid, signal.SIGKILL)
    _finish(procs)
    _run(killed)  # the same command again
    got = _steps(killed)
    for a, b in zip(got, reference):  # one process, as the reference: the same numbers to the last bit
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    _assert_continues_reference(got, reference)


def test_sigterm_to_one_process_stops_both_at_one_checkpoint_then_resumes(tmp_path, reference):
    import orbax.checkpoint as ocp

    run = tmp_path / "two"
    procs = _start(run, 2, checkpoint_every=100, pause=0.25)  # no regular checkpoint before the last step
    _wait_for_rows(run, procs, 3)
    os.kill(procs[1].pid, signal.SIGTERM)  # only the non-writing process gets the notice
    codes, errs = _finish(procs)
    assert codes == [143, 143], "\n".join(e[-2000:] for e in errs)
    assert "preemption notice (SIGTERM)" in errs[1], errs[1][-2000:]
    logged = [r["step"] for r in _steps(run)]
    assert logged[-1] < 12
    with ocp.CheckpointManager(str(run / "checkpoints")) as mngr:
        assert mngr.latest_step() == logged[-1]  # saved exactly where it stopped: no step is lost

    _run(run, 2)  # the same commands again
    _assert_continues_reference(_steps(run), reference)
