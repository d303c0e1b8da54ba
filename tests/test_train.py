"""Training loop behaviour without TensorFlow: schedule, non-finite stop with the last good checkpoint kept."""

import itertools
import json
import shutil

import conftest
import numpy as np
import pytest

from fvlm_jax import checkpoint, sharding, synthetic, train, train_state, train_step
from input_pipeline import label_packing


def tiny_config():
    return conftest.tiny_config()  # the CLI tests' config: their compiled steps come from the shared cache


def synthetic_batches(cfg):
    return lambda start: (synthetic.random_batch(cfg, cfg.train.batch_size, seed=i) for i in itertools.count(start))


def test_schedule_warms_up_then_decays():
    cfg = tiny_config()
    cfg.train.steps, cfg.train.warmup_steps = 100, 10
    lr = train_state.learning_rate_schedule(cfg)
    assert float(lr(0)) == pytest.approx(cfg.train.init_learning_rate, rel=1e-5)
    assert float(lr(10)) == pytest.approx(cfg.train.learning_rate, rel=1e-5)
    assert float(lr(100)) == pytest.approx(cfg.train.end_learning_rate, rel=1e-5)
    # Linear warm-up, then a half cosine from the peak at step 10 to the end value at step 100.
    init, peak, end = cfg.train.init_learning_rate, cfg.train.learning_rate, cfg.train.end_learning_rate
    for step in (3, 5, 8):
        assert float(lr(step)) == pytest.approx(init + (peak - init) * step / 10, rel=1e-5)
    for step in (20, 50, 90):
        assert float(lr(step)) == pytest.approx(end + (peak - end) * (1 + np.cos(np.pi * (step - 10) / 90)) / 2,
                                                rel=1e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    import jax
    from flax import nnx

    cfg = tiny_config()
    # Step 1 updates with learning rate 0 (the warm-up's start), step 2 with 5e29: its update makes the parameters
    # inf. A checkpoint every step, so the one of step 2 would be saved if the check let it through.
    cfg.train.init_learning_rate, cfg.train.learning_rate = 0.0, 1e30
    cfg.train.grad_clip_norm, cfg.train.checkpoint_every = 0.0, 1
    with pytest.raises(FloatingPointError, match=r"non-finite loss, gradients or parameters at step \d+") as err:
        train.train(cfg, "fvlm", str(tmp_path), synthetic_batches(cfg), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert all(np.isfinite([r["loss"], r["grad_norm"], r["param_norm"]]).all() for r in rows)
    assert "at step 2;" in str(err.value)  # the first bad step, never logged
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1]  # the last good state is kept, no checkpoint of the non-finite one
    model = checkpoint.restore_model(cfg, "fvlm", str(tmp_path / "checkpoints"), sharding.make_mesh(cfg))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(np.isfinite(np.asarray(x)).all() for x in params)


@pytest.mark.slow
def test_console_lines_and_tensorboard_events(tmp_path, capsys):
    import tensorflow as tf  # only to read the event files back (training itself writes them without TF)

    cfg = tiny_config()
    cfg.train.steps, cfg.train.log_every = 4, 2
    train.train(cfg, "fvlm", str(tmp_path), synthetic_batches(cfg), progress=False)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fvlm step")]
    assert [ln.split()[2] for ln in lines] == ["2/4", "4/4"]
    for a in cfg.prep.anatomies:
        assert f"{a} " in lines[0]
    assert "vol/s" in lines[0] and "ETA" in lines[0] and "lr " in lines[0]

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scalars = {}
    for f in (tmp_path / "tensorboard").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    assert set(scalars["loss"]) == {2, 4}
    assert scalars["loss"][4] == pytest.approx(rows[3]["loss"], rel=1e-6)
    assert scalars["loss/lung"][2] == pytest.approx(rows[1]["loss/lung"], rel=1e-6)
    assert {"learning_rate", "grad_norm", "temperature", "volumes_per_s"} <= set(scalars)

    # Killed after step 4 was logged but before its checkpoint: the rerun resumes at step 2 and logs 3-4 again.
    # TensorBoard (its own event reader) shows each step once, with the rerun's values.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.rmtree(tmp_path / "checkpoints" / "4")
    train.train(cfg, "fvlm", str(tmp_path), synthetic_batches(cfg), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("loss")] == [
        (2, rows[1]["loss"]), (4, rows[3]["loss"])]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # both runs' event files are there


@pytest.mark.slow
def test_exact_gradient_accumulation_with_remat():
    """Micro-batched accumulation (with and without rematerialisation) gives the full-batch loss and gradients."""
    import jax
    from flax import nnx

    cfg = tiny_config()
    batch = jax.tree.map(np.asarray, synthetic.random_batch(cfg, 4, seed=0))
    model = train_state.create_model(cfg, "fvlm")
    graphdef, params = nnx.split(model, nnx.Param)

    def full(p):
        return train_step.batch_loss(nnx.merge(graphdef, p), batch, "fvlm", cfg.loss)

    (ref_loss, ref_aux), ref_grads = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    for micro, remat in ((2, True), (4, False)):
        cfg.model.remat = remat
        gd = nnx.graphdef(train_state.create_model(cfg, "fvlm"))
        (loss, aux), grads = jax.jit(lambda p, m=micro, g=gd: train_step.accumulated_value_and_grad(
            g, p, batch, "fvlm", cfg.loss, None, m))(params)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        np.testing.assert_allclose(aux["per_anatomy"], ref_aux["per_anatomy"], rtol=1e-5, atol=1e-6)
        scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5 * scale)


@pytest.mark.slow
def test_packed_batch_trains_like_the_unpacked_one():
    """The train step finishes tf.data's packed labels and flips on the device: with a flip on one sample it gives
    the loss of the same batch unpacked and flipped on the host."""
    cfg = tiny_config()
    n = cfg.train.batch_size  # the CLI runs' batch: their compiled steps come from the persistent cache
    packed = synthetic.random_batch(cfg, n, seed=1, packed=True)
    packed["flip"] = np.zeros((n, 3), bool)
    packed["flip"][1], packed["flip"][3] = [True, False, True], [False, True, False]
    plain = synthetic.random_batch(cfg, n, seed=1)
    for i, f in enumerate(packed["flip"]):
        axes = [a for a in range(3) if f[a]]
        if axes:
            plain["image"][i], plain["labels"][i] = np.flip(plain["image"][i], axes), np.flip(plain["labels"][i], axes)
    np.testing.assert_array_equal(label_packing.unpack_labels(packed["labels_packed"], 2, cfg.model.input_zyx[2]),
                                  synthetic.random_batch(cfg, n, seed=1)["labels"])
    a = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg)).train_step(packed)
    b = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg)).train_step(plain)
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(a["per_anatomy"]), np.asarray(b["per_anatomy"]), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_bad_remat_policy_is_named():
    cfg = tiny_config()
    cfg.model.remat, cfg.model.remat_policy = True, "save_everything_please"
    trainer = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg))
    with pytest.raises(ValueError, match="remat_policy"):
        trainer.train_step(synthetic.random_batch(cfg, 4, seed=0))


def test_tensorboard_writer_loads_without_torch_and_leaves_it_importable(tmp_path):
    """tensorboardX would import torch (2 CPU-s) when it is installed; train_log keeps it out, in a fresh process,
    and `import torch` still works afterwards where torch is installed."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import importlib.util, sys
        from fvlm_jax import train_log
        w = train_log.tensorboard_writer({str(tmp_path)!r}, 0)
        w.add_scalar("loss", 1.5, 1)
        w.close()
        assert "torch" not in sys.modules, "torch was imported"
        if importlib.util.find_spec("torch"):
            import torch
            print(torch.ones(1))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_prefetch_keeps_order_bounds_its_lead_and_stops_when_closed():
    import threading
    import time

    made = []

    def items():
        for i in range(100):
            made.append(i)
            yield i

    gen = train.prefetch(items(), lambda x: x * 10, ahead=2)
    assert [next(gen) for _ in range(3)] == [0, 10, 20]
    time.sleep(0.3)  # the thread fills the queue and waits
    assert len(made) <= 3 + 2 + 1  # consumed + queued + the one waiting to be put
    gen.close()
    time.sleep(0.3)
    assert not any(t.name == "prefetch_to_device" and t.is_alive() for t in threading.enumerate())
    assert len(made) < 100


def test_prefetch_raises_the_producers_error_in_order():
    def items():
        yield 1
        yield 2
        raise ValueError("bad record")

    gen = train.prefetch(items(), lambda x: x, ahead=4)
    assert next(gen) == 1 and next(gen) == 2
    with pytest.raises(ValueError, match="bad record"):
        next(gen)


@pytest.mark.slow
def test_device_prefetch_and_lagged_metrics_log_what_the_plain_loop_logs(tmp_path):
    rows = {}
    for ahead in (0, 2):
        cfg = tiny_config()
        # A saved step inside and the last one (not a multiple of checkpoint_every); train.steps as in the tiny
        # config, so the compiled step is the other tests' (the persistent cache)
        cfg.train.checkpoint_every = 3
        cfg.data.prefetch_to_device = ahead
        train.train(cfg, "fvlm", str(tmp_path / str(ahead)), synthetic_batches(cfg), progress=False)
        rows[ahead] = [json.loads(line) for line in (tmp_path / str(ahead) / "metrics.jsonl").read_text().splitlines()]
        saved = sorted(int(p.name) for p in (tmp_path / str(ahead) / "checkpoints").iterdir() if p.name.isdigit())
        assert saved == [3, 4]
    assert [r["step"] for r in rows[2]] == [1, 2, 3, 4]
    assert rows[0] == rows[2]


@pytest.mark.slow
def test_a_failing_data_source_still_logs_the_step_before_it(tmp_path):
    cfg = tiny_config()

    def batches(start):
        for i in itertools.count(start):
            if i == 3:
                raise ValueError("corrupt record")
            yield synthetic.random_batch(cfg, cfg.train.batch_size, seed=i)

    with pytest.raises(ValueError, match="corrupt record"):
        train.train(cfg, "fvlm", str(tmp_path), batches, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 3 was dispatched but unchecked when the source failed


@pytest.mark.slow
def test_batches_ending_early_are_reported(tmp_path, caplog):
    cfg = tiny_config()
    few = lambda start: (synthetic.random_batch(cfg, cfg.train.batch_size, seed=i) for i in range(start, 3))  # noqa: E731
    with caplog.at_level("WARNING", logger="fvlm_jax.train"):
        train.train(cfg, "fvlm", str(tmp_path), few, progress=False)
    assert "the batches ended at step 3, before train.steps=4; the last checkpoint is step 2" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


@pytest.mark.slow
def test_train_step_is_a_pure_module_level_function():
    """train_step.train_step jitted on its own (no Trainer) gives the Trainer's step: same loss, same new state."""
    import functools

    import jax

    cfg = tiny_config()
    batch = synthetic.random_batch(cfg, cfg.train.batch_size, seed=3)
    trainer = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg))
    tx = train_state.make_optimizer(cfg)
    state = train_state.init_state(cfg, "fvlm", tx, None)
    step = jax.jit(functools.partial(train_step.train_step, graphdef=trainer.graphdef, tx=tx, method="fvlm",
                                     loss_cfg=cfg.loss, rules=tuple(cfg.sharding.rules),
                                     width=cfg.model.input_zyx[2], lengths=trainer.text_lengths))
    new_state, metrics = step(state, batch)
    want = trainer.train_step(batch)
    assert int(new_state["step"]) == 1 and trainer.step == 1
    np.testing.assert_allclose(float(metrics["loss"]), float(want["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(trainer.state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_state_holds_plain_arrays_and_params_only_restore_reads_the_saved_params(tmp_path):
    """The train state has no nnx.Variable objects (each step's call would rebuild them on the host); a checkpoint
    restores whole for training and params-only for eval/export, with the saved values; another tree is an error."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    cfg = tiny_config()
    trainer = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg))
    nodes = jax.tree.leaves(trainer.state, is_leaf=lambda x: isinstance(x, (nnx.Variable, nnx.State)))
    assert nodes and all(isinstance(x, jax.Array) for x in nodes)
    assert trainer.state["params"]["vision"]["blocks"][0]["fc1"]["kernel"].ndim == 2

    for _ in range(2):  # Adam moments that differ from each other and from zero
        trainer.train_step(synthetic.random_batch(cfg, cfg.train.batch_size, seed=0))
    saved = jax.device_get(trainer.state)
    mngr = trainer.checkpoint_manager(str(tmp_path / "checkpoints"))
    trainer.save(mngr)
    mngr.wait_until_finished()

    fresh = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg), initialize=False)  # as a resumed run: no init
    assert fresh.state is None
    assert fresh.restore(fresh.checkpoint_manager(str(tmp_path / "checkpoints")))
    assert fresh.step == 2
    adam = fresh.state["opt_state"][1][0]
    assert float(jnp.abs(adam.mu["pool"]["q"]["kernel"] - adam.nu["pool"]["q"]["kernel"]).max()) > 0
    for a, b in zip(jax.tree.leaves(fresh.state), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    model = checkpoint.restore_model(cfg, "fvlm", str(tmp_path / "checkpoints"), sharding.make_mesh(cfg))
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert jax.tree.structure(got) == jax.tree.structure(saved["params"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore_model(cfg, "fvlm", str(tmp_path / "empty"), sharding.make_mesh(cfg))

    # Any other tree is an error, not a silent fresh start.
    other = tmp_path / "other"
    m2 = trainer.checkpoint_manager(str(other))
    m2.save(1, args=ocp.args.StandardSave({"params": {"w": jnp.zeros(3)}, "step": jnp.asarray(1, jnp.int32)}))
    m2.wait_until_finished()
    with pytest.raises(ValueError):
        trainer.restore(trainer.checkpoint_manager(str(other)))
