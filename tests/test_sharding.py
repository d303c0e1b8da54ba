"""Sharded training and evaluation on 8 fake CPU devices.

The shard_map loss and its gradients on meshes (data, fsdp, tensor) = 8x1x1, 2x4x1 and 2x2x2 equal one device's;
the train step on 2x2x2 (fVLM with the shard_map loss and exact gradient accumulation, CLIP with the GSPMD loss, and
co-teaching) gives one device's losses; the state is born sharded (FSDP and tensor axes split the weights); a
checkpoint saved on one mesh restores on another; evaluation on the mesh embeds as one device does. (The GSPMD fVLM
step with its weights split across two processes: tests/test_preemption.py.)"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import ct_rate, demo
from fvlm_jax import sharding, train_state
from fvlm_jax.models.fvlm import METHODS

SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from configs import demo
    from fvlm_jax import sharding, synthetic, train

    def run(method, mesh, impl="gspmd", accum=1, steps=2, coteach=False):
        cfg = demo.get_config("tiny")  # one block per encoder: sharding is the same in every block
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
        cfg.loss.impl, cfg.train.grad_accum_steps = impl, accum
        # Co-teaching: plain targets in the first step (alpha 0), the peer's similarities mixed in from the second.
        cfg.loss.update(coteach=coteach, coteach_start_step=1, coteach_ramp_steps=0)
        trainer = train.Trainer(cfg, method, sharding.make_mesh(cfg))
        # The training input's form: packed labels and flips, finished on the device inside the sharded step.
        metrics = [jax.device_get(trainer.train_step(synthetic.random_batch(cfg, 8, seed=s, packed=True)))
                   for s in range(steps)]
        losses = [float(m["loss"]) for m in metrics]
        scalars = {k: [float(x[k]) for x in metrics] for k, v in metrics[0].items() if np.ndim(v) == 0}
        return trainer, cfg, losses, scalars

    # The shard_map loss and its gradients equal the pure function's on every mesh (batch over data x fsdp).
    import jax.numpy as jnp
    from fvlm_jax import losses
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2, 3, 16, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    normal = rng.random((3, 16)) < 0.5
    text_id = rng.integers(0, 5, (3, 16))
    normal[2], text_id[2] = False, 7  # every pair positive: the all-positive rule (summed over devices) drops it
    meta = dict(valid=rng.random((3, 16)) < 0.8, normal=normal, text_id=text_id,
                disease=(rng.random((3, 16, 4)) < 0.5) & ~normal[..., None], temperature=0.1, skip_all_positive=True)
    ref = jax.value_and_grad(lambda i, t: losses.anatomy_contrastive_loss(i, t, **meta), argnums=(0, 1))(*emb)
    peer = dict(peer_img=emb[1][:, ::-1], peer_txt=emb[0], peer_temperature=0.2, coteach_alpha=0.5)
    co_ref = jax.value_and_grad(lambda i, t: losses.anatomy_contrastive_loss(i, t, **meta, **peer),
                                argnums=(0, 1))(*emb)
    grad_err = {}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        m = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
        with jax.set_mesh(m):
            got = jax.jit(jax.value_and_grad(lambda i, t, m=m: losses.sharded_anatomy_contrastive_loss(
                i, t, mesh=m, **meta), argnums=(0, 1)))(*emb)
        np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-6)
        grad_err[str(shape)] = max(float(jnp.abs(a - b).max()) for a, b in zip(got[1], ref[1]))
        with jax.set_mesh(m):  # with a co-teaching peer's embeddings (split and gathered like the model's)
            got = jax.jit(jax.value_and_grad(lambda i, t, m=m: losses.sharded_anatomy_contrastive_loss(
                i, t, mesh=m, **meta, **peer), argnums=(0, 1)))(*emb)
        np.testing.assert_allclose(float(got[0]), float(co_ref[0]), rtol=1e-6)
        grad_err[f"coteach {shape}"] = max(float(jnp.abs(a - b).max()) for a, b in zip(got[1], co_ref[1]))
    assert max(grad_err.values()) < 1e-5, grad_err

    # The train step on every axis split, with the shard_map loss and exact gradient accumulation (the shard_map
    # loss alone is checked on all three shapes above; the GSPMD loss with the weights split across hosts in
    # tests/test_preemption.py); the CLIP baseline with the GSPMD loss.
    out, specs, scalars = {}, {}, {}
    for method, mesh, impl, accum in [("fvlm", (1, 1, 1), "gspmd", 1), ("fvlm", (2, 2, 2), "shard_map", 2),
                                      ("clip", (1, 1, 1), "gspmd", 1), ("clip", (2, 2, 2), "gspmd", 1)]:
        trainer, cfg, losses, metrics = run(method, mesh, impl, accum)
        out[f"{method} {mesh} {impl} {accum}"] = losses
        if (method, mesh) == ("fvlm", (1, 1, 1)):
            scalars["plain"] = metrics
        if (method, mesh) == ("fvlm", (2, 2, 2)):
            p = trainer.state["params"]
            fc1, mu = p["vision"]["blocks"][0]["fc1"]["kernel"], trainer.state["opt_state"][1][0].mu
            specs[str(mesh)] = [str(fc1.sharding.spec), list(fc1.addressable_shards[0].data.shape),
                                list(fc1.shape), str(mu["vision"]["blocks"][0]["fc1"]["kernel"].sharding.spec)]
            two = trainer
    # Co-teaching: both models' metrics over two steps (the peer's flips drawn on the device) on one device and on
    # data x fsdp x tensor with the shard_map loss.
    for mesh, impl in [((1, 1, 1), "gspmd"), ((2, 2, 2), "shard_map")]:
        scalars[f"coteach {mesh}"] = run("fvlm", mesh, impl, coteach=True)[3]
    # FSDP over 4 (2 x 4 x 1) and pure data parallel (8 x 1 x 1), laid out without compiling a step: the weight and
    # its Adam moment split along the FSDP axis, or whole on each device.
    from fvlm_jax import train_state
    for shape in [(2, 4, 1), (8, 1, 1)]:
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = shape
        _, state_sh = train_state.state_shardings(cfg, "fvlm", train_state.make_optimizer(cfg),
                                                  sharding.make_mesh(cfg))
        fc1 = state_sh["params"]["vision"]["blocks"][0]["fc1"]["kernel"]
        mu = state_sh["opt_state"][1][0].mu["vision"]["blocks"][0]["fc1"]["kernel"]
        specs[str(shape)] = [str(fc1.spec), list(fc1.shard_shape((32, 256))), [32, 256], str(mu.spec)]
    # Evaluation splits its batch over the same mesh and embeds exactly as one device does.
    from fvlm_jax import evaluate
    b = synthetic.random_batch(cfg, 8, seed=5)
    sharded = evaluate.image_encoder(two.model(), two.mesh, cfg.sharding.rules)(b["image"], b["labels"])[0]
    plain = evaluate.image_encoder(two.model())(b["image"], b["labels"])[0]
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), rtol=1e-5, atol=1e-5)
    # The pipelined evaluation loop on the mesh (copies ahead in a thread), with a short last batch that does not
    # split over the 4 batch shards (replicated) and a padding row: the same embeddings, in order.
    batches = [synthetic.random_batch(cfg, n, seed=10 + n) for n in (8, 8, 3)]
    for b in batches:
        b.update(mask=np.ones(len(b["image"]), bool), targets=np.zeros((len(b["image"]), 2), np.int8),
                 id=np.array([f"s{len(b['image'])}_{i}".encode() for i in range(len(b["image"]))]))
    batches[-1]["mask"][-1] = False
    enc = evaluate.encode_images(two.model(), batches, two.mesh, cfg.sharding.rules, ahead=2)
    one = evaluate.image_encoder(two.model())
    want = np.concatenate([np.asarray(one(b["image"], b["labels"])[0])[b["mask"]] for b in batches])
    np.testing.assert_allclose(enc["emb"], want, rtol=1e-5, atol=1e-5)
    assert len(enc["ids"]) == 18 and enc["ids"][-1] == "s3_1"
    # Saved on a 2x2x2 mesh, restored on a 4x1x1 mesh of 4 devices: same values, new layout.
    ckpt = tempfile.mkdtemp()
    mngr = two.checkpoint_manager(ckpt)
    two.save(mngr)
    mngr.wait_until_finished()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 4, 1, 1
    four = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg), initialize=False)  # restored, never initialised
    assert four.restore(four.checkpoint_manager(ckpt)) and four.step == 2
    for a, b in zip(jax.tree.leaves(two.state), jax.tree.leaves(four.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(four.state["params"]["pool"]["q"]["kernel"].sharding.device_set) == 4
    # Exported from the 2x2x2 mesh (FSDP and tensor axes split the weights); the test loads it on one device.
    from flax import nnx
    from fvlm_jax import export
    from input_pipeline import demo_data
    from input_pipeline.tokenizer import train_tokenizer
    from input_pipeline.totalseg_classes import CLASS_TABLES
    out_dir = sys.argv[1]
    case = demo_data.generate_case(np.random.default_rng(0))
    train_tokenizer([case["findings"], case["impression"]] * 10, out_dir + "/tok.model", 64)
    params = nnx.state(two.model(), nnx.Param)
    assert max(len(x.sharding.device_set) for x in jax.tree.leaves(params)) == 8
    export.export(two.model(), "fvlm", cfg, out_dir + "/tok.model", CLASS_TABLES[cfg.prep.class_table],
                  out_dir + "/export")
    np.savez(out_dir + "/params.npz", *[np.asarray(x) for x in jax.tree.leaves(params)])
    print("RESULT", json.dumps({"losses": out, "specs": specs, "scalars": scalars}))
""")


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path_factory.mktemp("eight_devices")
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return {**json.loads(res.stdout.split("RESULT", 1)[1]), "out": out}


@pytest.mark.slow
@pytest.mark.xdist_group("eight_device_run")  # one worker runs the module fixture once
def test_meshes_give_the_one_device_losses(eight_device_run):
    out = eight_device_run["losses"]
    for method in ("fvlm", "clip"):
        ref = out[f"{method} (1, 1, 1) gspmd 1"]
        assert ref[0] != ref[1]
        for key, got in out.items():
            if key.startswith(method):
                np.testing.assert_allclose(got, ref, rtol=3e-5, atol=3e-5, err_msg=key)
    assert len([k for k in out if k.startswith("fvlm")]) == 2


@pytest.mark.slow
@pytest.mark.xdist_group("eight_device_run")  # one worker runs the module fixture once
def test_coteach_on_a_mesh_gives_the_one_device_step(eight_device_run):
    """Co-teaching (loss.coteach), two steps: in the first (alpha 0) model A's step is the plain step (loss, and
    gradient and parameter norms after the update); both models' metrics on 2 x 2 x 2 with the shard_map loss equal
    one device's (the mixed loss and its gradients alone: the script's loss check on every mesh)."""
    scalars = eight_device_run["scalars"]
    ref, got, plain = scalars["coteach (1, 1, 1)"], scalars["coteach (2, 2, 2)"], scalars["plain"]
    assert ref["coteach_alpha"] == [0.0, 0.5]
    for key in ("loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(ref[key][0], plain[key][0], rtol=1e-6, err_msg=key)
    assert ref["peer_loss"][0] != ref["loss"][0]  # another initialisation and other flips
    assert set(ref) == set(got) and len(ref) == 9  # the 4 of a plain step, 5 of the peer (alpha too)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=3e-5, atol=3e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.xdist_group("eight_device_run")  # one worker runs the module fixture once
def test_state_is_born_sharded(eight_device_run):
    specs = eight_device_run["specs"]
    # fc1 kernel [32, 256] has logical axes (embed, mlp) -> (fsdp, tensor); the Adam moment follows its parameter.
    assert specs["(2, 4, 1)"] == ["P('fsdp', 'tensor')", [8, 256], [32, 256],
                                  "P('fsdp', 'tensor')"]
    assert specs["(2, 2, 2)"] == ["P('fsdp', 'tensor')", [16, 128], [32, 256], "P('fsdp', 'tensor')"]  # trained
    assert specs["(8, 1, 1)"][1] == [32, 256]  # pure data parallel: each device holds the whole weight


def test_every_weight_has_logical_axes():
    for cfg in (demo.get_config(), ct_rate.get_config("runlocal")):
        for method in METHODS:
            params = nnx.state(nnx.eval_shape(lambda c=cfg, m=method: train_state.create_model(c, m)), nnx.Param)
            assert sharding.unnamed_weights(params) == []


def test_logical_to_spec_rules():
    rules = demo.get_config().sharding.rules
    assert sharding.logical_to_spec(("batch", None), rules) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    # One mesh axis is used once per array; a dimension that does not divide stays replicated.
    assert sharding.logical_to_spec(("embed", "embed"), rules) == P("fsdp", None)
    mesh = jax.sharding.AbstractMesh((2, 4, 1), sharding.MESH_AXES)
    assert sharding.logical_to_spec(("embed", "mlp"), rules, (6, 8), mesh) == P(None, "tensor")  # 4 !| 6
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("nonsense",), rules)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.rules_dict([("embed", "model")])


def test_mesh_errors_are_clear():
    cfg = demo.get_config()
    cfg.mesh.fsdp = 3
    with pytest.raises(ValueError, match="does not divide"):
        sharding.make_mesh(cfg)
    cfg.mesh.fsdp, cfg.mesh.data = 1, 2 * jax.device_count()
    with pytest.raises(ValueError, match="devices"):
        sharding.make_mesh(cfg)


def test_active_mesh_axes_reads_the_rules_in_effect():
    """What the model asks while traced (e.g. whether tokens are sharded, which decides cuDNN attention on a GPU).
    It failed on the first GPU run: the active rules are stored as a dict, and were read as a rules table."""
    rules = [*demo.get_config().sharding.rules]
    length_on_tensor = [(n, "tensor" if n == "length" else a) for n, a in rules]
    mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1])
    assert sharding.active_mesh_axes("batch") == ()  # no rules in effect
    with jax.set_mesh(mesh):
        with sharding.axis_rules(rules):
            assert sharding.active_mesh_axes("batch") == ("data", "fsdp")
            assert sharding.active_mesh_axes("embed") == ("fsdp",)
            assert sharding.active_mesh_axes("length") == ()
        with sharding.axis_rules(length_on_tensor):
            assert sharding.active_mesh_axes("length") == ("tensor",)
        assert sharding.active_mesh_axes("batch") == ()
    assert sharding.active_mesh_size("heads") == 1  # no rules in effect
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2, 1, 3), sharding.MESH_AXES)):
        with sharding.axis_rules(rules):
            assert sharding.active_mesh_size("heads") == 3
            assert sharding.active_mesh_size("batch") == 2
            assert sharding.active_mesh_size("length") == 1


def test_cpu_attention_keeps_heads_sharded_over_the_mesh_in_one_group():
    """The CPU attention's head groups (transformer.CPU_HEAD_GROUPS) only where the heads are not split over
    devices: slicing a sharded heads axis would move data between them."""
    import jax.numpy as jnp

    from fvlm_jax.models import transformer

    q = jnp.ones((2, 5, 4, 8))
    rules = [*demo.get_config().sharding.rules]

    def groups():  # one custom_vjp call per group
        jaxpr = jax.make_jaxpr(lambda a: transformer.cpu_attention(a, a, a))(q)
        return sum("custom_vjp" in e.primitive.name for e in jaxpr.eqns)

    assert groups() == transformer.CPU_HEAD_GROUPS == 2
    for shape, want in (((1, 1, 2), 1), ((2, 1, 1), 2)):  # heads on the tensor axis; batch on data
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(shape, sharding.MESH_AXES)):
            with sharding.axis_rules(rules):
                assert groups() == want, shape


@pytest.mark.slow
@pytest.mark.xdist_group("eight_device_run")  # one worker runs the module fixture once
def test_export_from_a_mesh_loads_on_one_device(eight_device_run):
    """A model trained on 8 devices (FSDP and tensor axes split its weights) is exported, then loaded by a
    process with one device, as on a workstation: the same weights, on that device."""
    from fvlm_jax.export import Predictor

    out = eight_device_run["out"]
    assert jax.device_count() == 1
    pred = Predictor(str(out / "export"))
    got = jax.tree.leaves(nnx.state(pred.model, nnx.Param))
    want = np.load(out / "params.npz")
    assert len(got) == len(want.files)
    for i, x in enumerate(got):
        assert x.sharding.device_set == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(x), want[f"arr_{i}"])
