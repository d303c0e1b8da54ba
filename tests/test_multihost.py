"""Two processes on localhost (CPU, gloo collectives) each feed half of the global batch and get the losses of
the single-process run; the CLI on two processes trains, evaluates (as one process does) and exports."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses or training: not in the fast lane

# The body runs in each of 2 processes (2 CPU devices each) and, as the reference, in the test's own process (one
# device): the values must not depend on the layout.
BODY = textwrap.dedent("""
    import jax
    from configs import demo
    from fvlm_jax import sharding, synthetic, train

    cfg = demo.get_config("tiny")
    # FSDP over all devices: with 2 processes, every weight is split across the hosts (no process holds it whole).
    cfg.mesh.data, cfg.mesh.fsdp = 1, jax.device_count()
    trainer = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg))
    kernel = trainer.state["params"]["vision"]["blocks"][0]["fc1"]["kernel"]
    assert kernel.is_fully_addressable == (n_proc == 1)
    assert len(kernel.sharding.device_set) == jax.device_count() == 4 ** (n_proc > 1)
    if n_proc > 1:  # a mesh that leaves a host without devices is refused
        bad = demo.get_config()
        bad.mesh.data, bad.train.batch_size = 2, 8
        try:
            sharding.make_mesh(bad)
            raise AssertionError("a 2-device mesh in a 4-device, 2-process job was accepted")
        except ValueError as e:
            assert "must use every device" in str(e), e
    local = cfg.train.batch_size // jax.process_count()
    losses = []
    for step in range(2):
        batch = synthetic.random_batch(cfg, cfg.train.batch_size, seed=step)
        mine = {k: v[proc_id * local:(proc_id + 1) * local] for k, v in batch.items()}  # this host's slice
        losses.append(float(trainer.train_step(mine)["loss"]))
    # (Evaluation on a two-process mesh: test_cli_on_two_processes against one process.) The temperature, read
    # back on every process from the split weights.
    losses.append(float(trainer.model().temp()))
""")
SCRIPT = textwrap.dedent("""
    import sys
    import jax
    n_proc, proc_id, port = 2, int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_num_cpu_devices", 2)  # 4 devices in all, 2 x 2
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=n_proc, process_id=proc_id)
""") + BODY + 'print("LOSSES", losses)\n'

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(stdout):
    return eval(stdout.split("LOSSES", 1)[1])  # noqa: S307 - our own printed list


def test_two_processes_match_one():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    reference = {"n_proc": 1, "proc_id": 0}  # meanwhile, the same body on this process's one device
    exec(BODY, reference)  # noqa: S102 - our own code above
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outs:
        np.testing.assert_allclose(_losses(out), reference["losses"], rtol=2e-5, atol=2e-5)


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
    from conftest import run_cli

    two = json.loads((workdir / "eval" / "fvlm.json").read_text())
    run_cli(workdir, "--mode=eval", "--config.train.methods=('fvlm',)")
    one = json.loads((workdir / "eval" / "fvlm.json").read_text())
    assert any(v is not None for v in one["per_task"].values())
    assert two["per_task"] == pytest.approx(one["per_task"]) and two["mean_auc"] == pytest.approx(one["mean_auc"])
    assert two["macro"] == pytest.approx(one["macro"])
    for task, metrics in one["thresholded"].items():
        assert two["thresholded"][task] == pytest.approx(metrics), task
