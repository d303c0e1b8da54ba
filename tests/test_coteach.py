"""Co-teaching (loss.coteach): the mixed-target loss against a slow NumPy loop, its schedule, the two-model train
step, and checkpoints of the other kind refused. The 8-device check is in tests/test_sharding.py's script."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_losses import random_inputs, reference_anatomy_loss

from fvlm_jax import losses, sharding, train, train_log, train_state
from fvlm_jax.train_step import coteach_alpha


def reference_coteach_loss(img, txt, peer_img, peer_txt, valid, normal, text_id, disease, temperature, peer_temp,
                           alpha, normal_pairs=True, same_text_pairs=True, disease_pairs=True):
    """Per anatomy over its valid samples: targets as the paper's (row-normalised positives), and on each abnormal
    sample's row the mix (1 - alpha) targets + alpha softmax(peer similarities), in both directions."""
    a_n, b_n, _ = img.shape
    total = 0.0
    for a in range(a_n):
        idx = [i for i in range(b_n) if valid[a, i]]
        if all(normal[a, i] for i in idx):
            continue
        n = len(idx)
        s, ps, pos = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))
        for r, i in enumerate(idx):
            for c, j in enumerate(idx):
                s[r, c] = float(np.dot(img[a, i], txt[a, j])) / temperature
                ps[r, c] = float(np.dot(peer_img[a, i], peer_txt[a, j])) / peer_temp
                pos[r, c] = (i == j or (normal_pairs and normal[a, i] and normal[a, j])
                             or (same_text_pairs and text_id[a, i] == text_id[a, j])
                             or (disease_pairs and not normal[a, i] and not normal[a, j] and disease[a, i].any()
                                 and disease[a, j].any() and (disease[a, i] == disease[a, j]).all()))

        def xent(logits, peer_logits, positives, a=a, idx=idx, n=n):
            out = 0.0
            for r, i in enumerate(idx):
                target = positives[r] / positives[r].sum()
                if not normal[a, i]:
                    p = np.exp(peer_logits[r] - peer_logits[r].max())
                    target = (1 - alpha) * target + alpha * p / p.sum()
                lse = logits[r].max() + np.log(np.exp(logits[r] - logits[r].max()).sum())
                out -= sum(target[c] * (logits[r, c] - lse) for c in range(n))
            return out / n

        total += 0.5 * (xent(s, ps, pos) + xent(s.T, ps.T, pos.T))
    return total


def peer_inputs(seed):
    img, txt, valid, normal, text_id, disease = random_inputs(seed)
    rng = np.random.default_rng(100 + seed)
    peer = rng.normal(size=(2, *img.shape)).astype(np.float32)
    peer /= np.linalg.norm(peer, axis=-1, keepdims=True)
    return img, txt, peer[0], peer[1], dict(valid=valid, normal=normal, text_id=text_id, disease=disease)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha,switches", [(0.5, (True, True, True)), (0.5, (False, False, False)),
                                            (1.0, (True, False, True)), (0.25, (False, True, False))])
def test_coteach_loss_matches_reference(seed, alpha, switches):
    img, txt, peer_img, peer_txt, meta = peer_inputs(seed)
    kw = dict(normal_pairs=switches[0], same_text_pairs=switches[1], disease_pairs=switches[2])
    got = losses.anatomy_contrastive_loss(img, txt, temperature=0.1, peer_img=peer_img, peer_txt=peer_txt,
                                          peer_temperature=0.2, coteach_alpha=alpha, **meta, **kw)
    want = reference_coteach_loss(img, txt, peer_img, peer_txt, *meta.values(), 0.1, 0.2, alpha, **kw)
    np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)
    assert abs(want - reference_anatomy_loss(img, txt, *meta.values(), 0.1, **kw)) > 1e-3  # the mix matters


def test_alpha_zero_is_the_plain_loss_and_the_peer_gets_no_gradient():
    img, txt, peer_img, peer_txt, meta = peer_inputs(0)
    plain = losses.anatomy_contrastive_loss(img, txt, temperature=0.1, **meta)

    def mixed(img, peer_img, alpha):
        return losses.anatomy_contrastive_loss(img, txt, temperature=0.1, peer_img=peer_img, peer_txt=peer_txt,
                                               peer_temperature=0.1, coteach_alpha=alpha, **meta)

    assert float(mixed(img, peer_img, 0.0)) == float(plain)
    g_img, g_peer = jax.grad(mixed, argnums=(0, 1))(img, peer_img, 0.5)
    assert float(jnp.abs(g_img).max()) > 0 and float(jnp.abs(g_peer).max()) == 0.0


def test_sharded_coteach_loss_on_one_device_equals_the_pure_one():
    """The shard_map form's co-teaching arguments (the 8-device meshes: tests/test_sharding.py)."""
    img, txt, peer_img, peer_txt, meta = peer_inputs(1)
    kw = dict(temperature=0.1, peer_img=peer_img, peer_txt=peer_txt, peer_temperature=0.3, coteach_alpha=0.5, **meta)
    mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda i, t: losses.sharded_anatomy_contrastive_loss(i, t, mesh=mesh, **kw))(img, txt)
    np.testing.assert_allclose(float(got), float(losses.anatomy_contrastive_loss(img, txt, **kw)), rtol=1e-6)


def test_schedule_waits_then_ramps():
    cfg = tiny_config().loss
    cfg.coteach_alpha, cfg.coteach_start_step, cfg.coteach_ramp_steps = 0.5, 3, 4
    got = [float(coteach_alpha(cfg, s)) for s in range(9)]
    np.testing.assert_allclose(got, [0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    cfg.coteach_ramp_steps = 0  # at once
    assert [float(coteach_alpha(cfg, s)) for s in (2, 3)] == [0.0, 0.5]


def coteach_config(start_step):
    cfg = tiny_config()
    cfg.loss.update(coteach=True, coteach_start_step=start_step, coteach_ramp_steps=0)
    return cfg


@pytest.mark.slow
def test_the_peer_starts_elsewhere_and_checkpoints_of_the_other_kind_are_refused(tmp_path):
    """The two-model step itself (alpha 0 gives the plain step; 8 devices equal 1) is checked in
    tests/test_sharding.py's 8-device script, which compiles it once for both."""
    cfg = coteach_config(start_step=0)
    mesh = sharding.make_mesh(cfg)
    co = train.Trainer(cfg, "fvlm", mesh)
    plain_cfg = coteach_config(start_step=0)
    plain_cfg.loss.coteach = False
    plain = train.Trainer(plain_cfg, "fvlm", mesh)
    assert set(plain.state) == {"params", "opt_state", "step"} and set(co.state["peer"]) == {"params", "opt_state"}
    # Model A is the plain run's model; the peer has another initialisation (biases and norms start equal).
    for a, b in zip(jax.tree.leaves(co.state["params"]), jax.tree.leaves(plain.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fc1 = [p["vision"]["blocks"][0]["fc1"]["kernel"] for p in (co.state["params"], co.state["peer"]["params"])]
    assert not np.array_equal(*fc1)
    for saver, loader, saved in ((plain, co, "a run without co-teaching"), (co, plain, "a co-teaching run")):
        mngr = saver.checkpoint_manager(tmp_path / repr(saver.coteach))
        saver.save(mngr)
        mngr.wait_until_finished()
        with pytest.raises(ValueError, match=f"checkpoint of step 0 in .* is of {saved} .* set loss.coteach"):
            loader.restore(loader.checkpoint_manager(mngr.directory))
    assert co.restore(co.checkpoint_manager(tmp_path / "True")) and "peer" in co.state


def test_coteach_is_fvlm_only_and_refuses_accumulation():
    cfg = coteach_config(start_step=0)
    _, shardings = train_state.state_shardings(cfg, "clip", train_state.make_optimizer(cfg),
                                               sharding.make_mesh(cfg))
    assert "peer" not in shardings
    assert train.Trainer(cfg, "clip", sharding.make_mesh(cfg)).coteach is False
    cfg.train.grad_accum_steps = 2
    with pytest.raises(ValueError, match="grad_accum_steps"):
        train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg))


def test_metrics_row_logs_the_peer_when_there_is_one():
    """metrics.jsonl and the console carry the peer's loss, norms, temperature and the step's alpha; a plain step's
    row has none of them."""
    plain = {"loss": np.float32(2.5), "grad_norm": 1.0, "param_norm": 9.0, "temperature": 0.07,
             "per_anatomy": np.array([1.0, 1.5], np.float32)}
    co = {**plain, "peer_loss": np.float32(2.75), "peer_grad_norm": 1.25, "peer_param_norm": 9.5,
          "peer_temperature": 0.0625, "coteach_alpha": np.float32(0.25)}
    row = train_log.metrics_row(7, plain, 1e-4, ("lung", "heart"))
    assert row == {"step": 7, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 1.0, "param_norm": 9.0,
                   "temperature": pytest.approx(0.07), "loss/lung": 1.0, "loss/heart": 1.5}
    co_row = train_log.metrics_row(7, co, 1e-4, ("lung", "heart"))
    assert {k: co_row[k] for k in train_log.PEER_METRICS} == {
        "peer_loss": 2.75, "peer_grad_norm": 1.25, "peer_param_norm": 9.5, "peer_temperature": 0.0625,
        "coteach_alpha": 0.25}
    assert all(type(v) in (int, float) for v in co_row.values())  # JSON-ready
    assert "peer loss 2.7500 (alpha 0.25)" in train_log.console_line("fvlm", co_row, 10, 1.0, 2, ("lung", "heart"))
    assert "peer" not in train_log.console_line("fvlm", row, 10, 1.0, 2, ("lung", "heart"))
