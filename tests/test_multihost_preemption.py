"""Two processes on localhost train with `train.train`; a SIGTERM to one of them (a preemption notice) makes both
save the same checkpoint at the same step and stop; the same commands again finish the run with the losses of an
uninterrupted single-process run."""

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

pytestmark = pytest.mark.slow  # subprocesses or training: not in the fast lane

SCRIPT = textwrap.dedent("""
    import itertools, sys, time
    import jax
    n_proc, proc_id, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    every = int(sys.argv[5])
    if n_proc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=n_proc, process_id=proc_id)
    from configs import demo
    from fvlm_jax import synthetic, train

    cfg = demo.get_config("tiny")
    cfg.train.update(batch_size=8, steps=16, warmup_steps=2, log_every=5, checkpoint_every=every)
    local = cfg.train.batch_size // n_proc

    def batches(start):
        for i in itertools.count(start):
            # A quarter second per step: the notice needs a moment to reach the other process, and the run must
            # not end before.
            time.sleep(0.25)
            b = synthetic.random_batch(cfg, cfg.train.batch_size, seed=i)
            yield {k: v[proc_id * local:(proc_id + 1) * local] for k, v in b.items()}  # this host's slice

    try:
        train.train(cfg, "fvlm", workdir, batches, progress=False)
    except train.Preempted:
        sys.exit(143)
""")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, n_proc, every):
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, "-c", SCRIPT, str(n_proc), str(i), port, str(workdir), str(every)],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(n_proc)]


def _finish(procs):
    errs = [p.communicate(timeout=600)[1] for p in procs]
    return [p.returncode for p in procs], errs


def _losses(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_to_one_process_stops_both_at_one_checkpoint_then_resumes(tmp_path):
    import orbax.checkpoint as ocp

    single = tmp_path / "single"
    codes, errs = _finish(_start(single, 1, 100))
    assert codes == [0], errs[0][-3000:]

    run = tmp_path / "two"
    procs = _start(run, 2, 100)  # no regular checkpoint before the last step
    deadline = time.time() + 300
    while len(_losses(run)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    if any(p.poll() is not None for p in procs):
        pytest.fail("training ended before the notice: " + procs[0].stderr.read()[-2000:])
    os.kill(procs[1].pid, signal.SIGTERM)  # only the non-writing process gets the notice
    codes, errs = _finish(procs)
    assert codes == [143, 143], "\n".join(e[-2000:] for e in errs)
    logged = [r["step"] for r in _losses(run)]
    assert logged[-1] < 16
    with ocp.CheckpointManager(str(run / "checkpoints")) as mngr:
        assert mngr.latest_step() == logged[-1]

    codes, errs = _finish(_start(run, 2, 100))  # the same commands again
    assert codes == [0, 0], "\n".join(e[-2000:] for e in errs)
    got, want = _losses(run), _losses(single)
    assert [r["step"] for r in got] == list(range(1, 17))
    for a, b in zip(got, want):
        np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=2e-5, atol=2e-5)
