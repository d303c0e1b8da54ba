"""The CLI on two processes on localhost (CPU, gloo collectives) trains, evaluates (as one process does) and
exports. (Two processes with every weight split across them train as one device does: tests/test_preemption.py.)"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses or training: not in the fast lane

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_cli_on_two_processes(prepared_demo, tmp_path):
    """The real command line with --distributed on 2 processes (the README's multi-node form): `--mode=all` skips
    prepare (done once, on one machine), then each process trains on its own record file, evaluates and exports."""
    import json
    import shutil

    from conftest import TINY_CONFIG

    workdir = tmp_path / "run"
    shutil.copytree(prepared_demo / "records", workdir / "records")  # the prepared records alone (other tests train
    # in the shared workdir)
    port = str(_free_port())
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), TINY_CONFIG,
           f"--workdir={workdir}", "--config.train.methods=('fvlm',)", "--distributed",
           f"--coordinator=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen([*cmd, f"--process_id={i}"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, (out + err)[-4000:]
        assert "prepare skipped" in err and f"process {i} of 2" in err, err[-4000:]
    with open(workdir / "train" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert (workdir / "export" / "fvlm" / "model.json").exists()
    # The two processes' evaluation against the same evaluation of their checkpoint on one process.
    import pytest
    from conftest import tiny_config

    from fvlm_jax import stages

    two = json.loads((workdir / "eval" / "fvlm.json").read_text())
    cfg = tiny_config()
    cfg.train.methods = ("fvlm",)
    stages.run_eval(cfg, str(workdir))  # in this process (one device), as `run.py --mode=eval` runs it
    one = json.loads((workdir / "eval" / "fvlm.json").read_text())
    assert any(v is not None for v in one["per_task"].values())
    assert two["per_task"] == pytest.approx(one["per_task"]) and two["mean_auc"] == pytest.approx(one["mean_auc"])
    assert two["macro"] == pytest.approx(one["macro"])
    for task, metrics in one["thresholded"].items():
        assert two["thresholded"][task] == pytest.approx(metrics), task
