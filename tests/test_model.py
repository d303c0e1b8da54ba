"""Anatomy token membership, intact filter, pooling and encoder shapes against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from fvlm_jax import anatomy, train_step
from fvlm_jax.models.fvlm import FVLM, AnatomyPool
from fvlm_jax.models.vit3d import ConvStem, patchify_channels


def random_labels(seed, shape=(2, 8, 12, 16), a=3):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    for b in range(shape[0]):
        for i in range(a):
            lo = [rng.integers(0, s - 2) for s in shape[1:]]
            hi = [lo_ + rng.integers(1, 5) for lo_ in lo]
            labels[b, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = i + 1
    labels[1][labels[1] == 3] = 0  # anatomy 3 absent in sample 1
    return labels


@pytest.mark.parametrize("seed", range(3))
def test_token_membership_is_max_pool(seed):
    labels = random_labels(seed)
    patch = (2, 4, 4)
    got = np.asarray(anatomy.token_membership(jnp.asarray(labels), 3, patch))
    b_n, z, y, x = labels.shape
    want = np.zeros((b_n, 3, (z // 2) * (y // 4) * (x // 4)), bool)
    for b in range(b_n):
        n = 0
        for gz in range(z // 2):
            for gy in range(y // 4):
                for gx in range(x // 4):
                    block = labels[b, gz * 2:(gz + 1) * 2, gy * 4:(gy + 1) * 4, gx * 4:(gx + 1) * 4]
                    for a in range(3):
                        want[b, a, n] = (block == a + 1).any()
                    n += 1
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", range(3))
def test_presence_and_intact(seed):
    labels = random_labels(seed)
    present, intact = (np.asarray(v) for v in anatomy.presence_and_intact(jnp.asarray(labels), 3))
    for b in range(labels.shape[0]):
        for a in range(3):
            m = labels[b] == a + 1
            touches = m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() or m[:, :, 0].any() or \
                m[:, :, -1].any()
            assert present[b, a] == m.any()
            assert intact[b, a] == (m.any() and not touches)


def test_patchify_raster_order():
    v = np.arange(4 * 4 * 8).reshape(1, 4, 4, 8)
    p = np.asarray(patchify_channels(jnp.asarray(v)[..., None], (2, 2, 4))).reshape(1, -1, 16)
    np.testing.assert_array_equal(p[0, 1], v[0, 0:2, 0:2, 4:8].ravel())
    np.testing.assert_array_equal(p[0, 2], v[0, 0:2, 2:4, 0:4].ravel())


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.slow
@pytest.mark.parametrize("channels", [(), (3,), (3, 5)])
def test_conv_stem_matches_loop_reference(channels):
    stem = ConvStem((4, 4, 8), channels, 6, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    vol = rng.random((2, 8, 4, 16)).astype(np.float32)
    got = np.asarray(stem(jnp.asarray(vol)))
    x = vol[..., None]
    for i, (layer, s) in enumerate(zip(stem.layers, stem.strides)):
        w, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
        b_, z, y, xx, c = x.shape
        out = np.zeros((b_, z // s[0], y // s[1], xx // s[2], w.shape[1]), np.float32)
        for idx in np.ndindex(*out.shape[:4]):
            bb, k, j, m = idx
            block = x[bb, k * s[0]:(k + 1) * s[0], j * s[1]:(j + 1) * s[1], m * s[2]:(m + 1) * s[2]]
            out[idx] = block.reshape(-1) @ w + bias
        x = gelu(out) if i + 1 < len(stem.layers) else out
    np.testing.assert_allclose(got, x.reshape(2, -1, 6), rtol=1e-4, atol=1e-5)


def test_zero_query_pooling_starts_as_mean_over_anatomy_tokens():
    pool = AnatomyPool(2, 8, 2, rngs=nnx.Rngs(0))
    pool.q.bias[...] = jnp.zeros_like(pool.q.bias[...])
    rng = np.random.default_rng(0)
    levels = jnp.asarray(rng.normal(size=(2, 1, 5, 8)), jnp.float32)  # [L, B, N, D]
    member = np.array([[[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]]], bool)
    got = np.asarray(pool(levels, jnp.asarray(member)))
    tokens = np.asarray(pool.ln(jnp.moveaxis(levels, 0, 1).reshape(1, 10, 8)))
    kv = tokens @ np.asarray(pool.kv.kernel[...]) + np.asarray(pool.kv.bias[...])
    v = kv.reshape(1, 10, 2, 2, 4)[:, :, :, 1].reshape(1, 10, 8)  # columns are [head][k|v][channel]
    for a in range(2):
        mask = np.tile(member[0, a], 2)
        want = v[0, mask].mean(0) @ np.asarray(pool.out.kernel[...]) + np.asarray(pool.out.bias[...])
        np.testing.assert_allclose(got[0, a], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("global_pool", [False, True])
def test_fvlm_shapes_and_normalisation(global_pool):
    cfg = demo.get_config("tiny")
    a = len(cfg.prep.anatomies)
    model = FVLM(cfg.model, a, global_pool=global_pool, rngs=nnx.Rngs(0))
    z, y, x = cfg.model.input_zyx
    image = jax.random.uniform(jax.random.key(0), (2, z, y, x))
    labels = jnp.zeros((2, z, y, x), jnp.uint8).at[:, 4:10, 4:20, 4:20].set(1)
    # Compiled: op by op, the encoders cost 5x the CPU time.
    emb, present, intact = nnx.jit(lambda m, x, lab: m.encode_image(x, lab))(model, image, labels)
    assert emb.shape == (2, 1 if global_pool else a, cfg.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, rtol=1e-4)
    assert present.shape == intact.shape == (2, a) and bool(intact[0, 0]) and not bool(present[0, 1])
    txt = nnx.jit(lambda m, t: m.encode_text(t))(model, jnp.ones((2, 3, 16), jnp.int32))
    assert txt.shape == (2, 3, cfg.model.embed_dim)
    # The temperature starts at its init and is the learnable value clamped to [min, max].
    t = cfg.model.temperature
    assert float(model.temp()) == pytest.approx(t.init)
    for raw, want in (((t.min + t.max) / 2, (t.min + t.max) / 2), (2 * t.max, t.max), (t.min / 10, t.min),
                      (-1.0, t.min)):
        model.temperature[...] = jnp.asarray(raw, jnp.float32)
        assert float(model.temp()) == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_and_remat():
    cfg = demo.get_config("tiny")
    a = len(cfg.prep.anatomies)
    from fvlm_jax import synthetic

    batch = synthetic.random_batch(cfg, 4)
    results = {}
    for dtype, remat in (("float32", False), ("float32", True), ("bfloat16", False)):
        cfg.model.dtype, cfg.model.remat = dtype, remat
        model = FVLM(cfg.model, a, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
        loss_fn = jax.jit(jax.value_and_grad(
            lambda p, g=graphdef: train_step.batch_loss(nnx.merge(g, p), batch, "fvlm", cfg.loss)[0]))
        results[(dtype, remat)] = loss_fn(params)
        # Block-level remat carries the config's policy; the blocks' GELU is always rematerialised, policy=None.
        assert (cfg.model.remat_policy in str(jax.make_jaxpr(loss_fn)(params))) == remat
    (l32, g32), (lre, gre), (l16, g16) = results.values()
    assert float(lre) == pytest.approx(float(l32), rel=1e-5)
    for x, y in zip(jax.tree.leaves(g32), jax.tree.leaves(gre)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5)
    assert float(l16) == pytest.approx(float(l32), rel=2e-2)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))


@pytest.mark.slow
def test_cpu_attention_matches_numpy_and_the_library():
    """transformer.attention (the XLA:CPU path) against a NumPy softmax attention and jax.nn.dot_product_attention,
    with and without a key mask, values and gradients; and its head groups against one group."""
    from fvlm_jax.models import transformer

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 5, 3, 16)).astype(np.float32) for _ in range(3))
    mask = np.ones((2, 5), bool)
    mask[1, 3:] = False
    for m in (None, mask):
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        if m is not None:
            logits = np.where(m[:, None, None, :], logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
        got = transformer.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None if m is None else m)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
        lib_mask = None if m is None else m[:, None, None]

        def ours(a, b, c, m=m):
            return (transformer.attention(a, b, c, m) ** 2).sum()

        def lib(a, b, c, m=lib_mask):
            return (jax.nn.dot_product_attention(a, b, c, mask=m) ** 2).sum()

        g1 = jax.grad(ours, argnums=(0, 1, 2))(q, k, v)
        g2 = jax.grad(lib, argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g1, g2):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        # The hand-written backward against central differences of the forward, in float64 NumPy.
        eps, i = 1e-3, (1, 2, 0, 5)
        for arg in range(3):
            up, down = [np.array(t, np.float64) for t in (q, k, v)], [np.array(t, np.float64) for t in (q, k, v)]
            up[arg][i] += eps
            down[arg][i] -= eps

            def np_loss(a, b, c, m=m):
                lg = np.einsum("bqhd,bkhd->bhqk", a, b) / 4.0
                if m is not None:
                    lg = np.where(m[:, None, None, :], lg, -np.inf)
                e = np.exp(lg - lg.max(-1, keepdims=True))
                return (np.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), c) ** 2).sum()

            fd = (np_loss(*up) - np_loss(*down)) / (2 * eps)
            assert float(g1[arg][i]) == pytest.approx(fd, rel=1e-3, abs=1e-4)
    # Heads split into 1, 2 (the default: 1 + 2 heads) or 3 independent groups: the same values and gradients.
    for m in (None, mask):
        def grouped(a, b, c, groups, m=m):
            return (transformer.cpu_attention(a, b, c, m, groups=groups) ** 2).sum()

        outs = [jax.value_and_grad(grouped, argnums=(0, 1, 2))(q, k, v, g) for g in (1, 2, 3)]
        for loss, grads in outs[1:]:
            assert float(loss) == pytest.approx(float(outs[0][0]), rel=1e-6)
            for a, b in zip(grads, outs[0][1]):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    np.testing.assert_allclose(np.asarray(transformer.attention(*bf), np.float32),
                               np.asarray(jax.nn.dot_product_attention(*bf), np.float32), atol=2e-2)
    gb1 = jax.grad(lambda a, b, c: (transformer.attention(a, b, c, mask).astype(jnp.float32) ** 2).sum(),
                   argnums=(0, 1, 2))(*bf)
    gb2 = jax.grad(lambda a, b, c: (jax.nn.dot_product_attention(a, b, c, mask=mask[:, None, None])
                                    .astype(jnp.float32) ** 2).sum(), argnums=(0, 1, 2))(*bf)
    for a, b in zip(gb1, gb2):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=5e-2, atol=5e-2)


@pytest.mark.slow
def test_block_with_cpu_attention_matches_the_library_attention(monkeypatch):
    """A transformer block's loss and every gradient, under jit and remat, with the hand-written CPU attention
    against the same block on jax.nn.dot_product_attention (autodiff)."""
    from fvlm_jax.models import transformer

    block = transformer.Block(32, 2, 64, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 32)), jnp.float32)
    mask = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [4]]))

    def loss(state, x):
        run = transformer.block_runner(remat=True)
        return (run(nnx.merge(graphdef, state), x, mask) ** 2).sum()

    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
    monkeypatch.setattr(transformer, "attention", lambda q, k, v, m=None, impl=None: jax.nn.dot_product_attention(
        q, k, v, mask=None if m is None else m[:, None, None, :]))
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_block_gelu_is_jax_gelu_values_and_gradient():
    """The block's GELU (recomputed in the backward pass) against jax.nn.gelu and a NumPy tanh-GELU: values and
    first derivative; and it keeps one residual, its input, where autodiff of jax.nn.gelu keeps more."""
    from fvlm_jax.models import transformer

    x = np.random.default_rng(2).normal(scale=3.0, size=(3, 5, 7)).astype(np.float32)
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    np.testing.assert_allclose(np.asarray(transformer.gelu(x)), 0.5 * x * (1 + t), rtol=1e-5, atol=1e-6)
    dgelu = 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)
    got = jax.grad(lambda a: transformer.gelu(a).sum())(x)
    np.testing.assert_allclose(np.asarray(got), dgelu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(lambda a: jax.nn.gelu(a).sum())(x)),
                               rtol=1e-6, atol=1e-7)
    _, vjp = jax.vjp(transformer.gelu, jnp.asarray(x))
    _, vjp_lib = jax.vjp(jax.nn.gelu, jnp.asarray(x))
    n_res = len([r for r in jax.tree.leaves(vjp) if getattr(r, "shape", None) == x.shape])
    n_res_lib = len([r for r in jax.tree.leaves(vjp_lib) if getattr(r, "shape", None) == x.shape])
    assert n_res == 1 < n_res_lib


def test_flattened_dense_is_the_same_product():
    from fvlm_jax.models import transformer

    layer = transformer.dense(8, 6, ("embed", "mlp"), rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 8)).astype(np.float32)
    want = x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-6)
    gw = jax.grad(lambda m: (m(x) ** 2).sum())(layer).kernel[...]
    np.testing.assert_allclose(np.asarray(gw), x.reshape(-1, 8).T @ (2 * want).reshape(-1, 6), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the refusal of cuDNN on a host without it")
def test_attention_implementations_and_the_cudnn_fallback(monkeypatch, caplog):
    """model.attention: "xla" is the library's XLA attention, "cpu" the hand-written one (same values), "cudnn"
    without cuDNN is refused, and "auto" on a GPU backend falls back to XLA (with a warning) when cuDNN refuses."""
    from fvlm_jax.models import transformer

    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 16)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(6)[None, :] < np.array([[6], [3]]))
    want = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
    for impl in ("xla", "cpu", "auto"):
        got = transformer.attention(q, k, v, mask, impl=impl)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not one of"):
        transformer.attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="not one of"):
        transformer.Block(32, 2, 64, rngs=nnx.Rngs(0), attention_impl="flash")
    bf = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    with pytest.raises(Exception, match="cuDNN"):  # this machine has no cuDNN
        transformer.attention(*bf, impl="cudnn")
    monkeypatch.setattr(transformer, "_warned", set())
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with caplog.at_level("WARNING"):
        got = transformer.attention(*bf)  # image-encoder case: bf16, Dh 16, no mask -> tries cuDNN
    assert "cuDNN fused attention refused" in caplog.text
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(jax.nn.dot_product_attention(*bf), np.float32), atol=1e-2)


def test_config_rejects_an_unknown_attention_implementation():
    from configs import demo
    from fvlm_jax import config_checks

    cfg = demo.get_config()
    config_checks.validate(cfg)
    cfg.model.attention = "flash"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        config_checks.validate(cfg)
