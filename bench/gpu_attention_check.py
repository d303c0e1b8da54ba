"""On an NVIDIA GPU: does `model.attention="auto"` really run cuDNN's fused kernel, and does it compute the same thing?

  python bench/gpu_attention_check.py

Checks, at the paper's image-encoder attention size (1232 tokens, 12 heads of 64, bf16):
- the "cudnn" and "xla" implementations against a float32 reference, values and gradients (errors printed; the
  cuDNN error must stay within 1.5x the XLA one plus 1e-3), and their difference from each other;
- which kernel the image encoder's forward + backward lowers to with "auto" (custom calls to `__cudnn$fmha*`),
  with and without rematerialisation, and inside the training context (a mesh and the sharding rules in effect,
  where the first GPU run crashed), and that the masked text-encoder attention stays on XLA.
Then measures, without checking, the text encoder's attention as masked XLA against cuDNN with key lengths.
Exits non-zero if a check fails. Needs no TensorFlow, PyTorch or MONAI.
"""

from __future__ import annotations

import contextlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import demo
from fvlm_jax import sharding
from fvlm_jax.models import transformer
from fvlm_jax.models.vit3d import ViT3D

CUDNN = "__cudnn$fmha"


def fused_calls(lowered) -> int:
    return lowered.as_text().count(CUDNN)


def main():
    dev = jax.devices()[0]
    print(f"JAX {jax.__version__}, {dev.device_kind} ({jax.default_backend()})")
    if jax.default_backend() != "gpu":
        raise SystemExit("this check needs an NVIDIA GPU")
    failures = []

    rng = np.random.default_rng(0)
    b, n, h, dh = 2, 1232, 12, 64
    q32, k32, v32, g32 = (jnp.asarray(rng.normal(size=(b, n, h, dh)), jnp.float32) for _ in range(4))
    bf = [t.astype(jnp.bfloat16) for t in (q32, k32, v32, g32)]

    def value_and_grads(impl, q, k, v, g):
        def f(q, k, v):
            return jnp.sum(transformer.attention(q, k, v, impl=impl).astype(jnp.float32) * g.astype(jnp.float32))

        out = jax.jit(lambda q, k, v: transformer.attention(q, k, v, impl=impl))(q, k, v)
        return [np.asarray(t, np.float32) for t in (out, *jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v))]

    # Reference: the XLA attention in float32 on the bf16-rounded inputs.
    ref = value_and_grads("xla", *(t.astype(jnp.float32) for t in bf))
    errs, outs = {}, {}
    for impl in ("xla", "cudnn"):
        t0 = time.perf_counter()
        got = outs[impl] = value_and_grads(impl, *bf)
        errs[impl] = [float(np.max(np.abs(a - r)) / (np.max(np.abs(r)) + 1e-30)) for a, r in zip(got, ref)]
        e = errs[impl]
        print(f"{impl:6s} bf16 vs float32 reference, max |error| / max |ref|: out {e[0]:.2e}, dq {e[1]:.2e}, "
              f"dk {e[2]:.2e}, dv {e[3]:.2e}  ({time.perf_counter() - t0:.1f} s)")
    diff = [float(np.max(np.abs(a - b)) / (np.max(np.abs(r)) + 1e-30))
            for a, b, r in zip(outs["cudnn"], outs["xla"], ref)]
    print("cudnn vs xla (both bf16), max |difference| / max |ref|: " + ", ".join(
        f"{n} {d:.2e}" for n, d in zip(("out", "dq", "dk", "dv"), diff)))
    for name, ex, ec in zip(("out", "dq", "dk", "dv"), errs["xla"], errs["cudnn"]):
        if not ec <= 1.5 * ex + 1e-3:
            failures.append(f"cuDNN {name} error {ec:.2e} against XLA's {ex:.2e}")

    cfg = demo.get_config()
    cfg.mesh.data = cfg.mesh.fsdp = cfg.mesh.tensor = 1
    mesh = sharding.make_mesh(cfg)  # the trainer's mesh, on one device
    for remat, in_training in ((False, False), (True, False), (False, True)):
        vit = ViT3D(input_zyx=(112, 256, 352), patch_zyx=(16, 16, 32), width=768, depth=2, heads=12, mlp_dim=3072,
                    feature_blocks=(), rngs=nnx.Rngs(0), dtype=jnp.bfloat16, remat=remat)
        graphdef, params = nnx.split(vit)

        def loss(p, x, graphdef=graphdef):
            return jnp.mean(nnx.merge(graphdef, p)(x)[-1].astype(jnp.float32) ** 2)

        x = jnp.zeros((2, 112, 256, 352), jnp.float32)
        where = "under a mesh and the default sharding rules" if in_training else "no mesh"
        try:
            with contextlib.ExitStack() as training_context:
                if in_training:
                    training_context.enter_context(jax.set_mesh(mesh))
                    training_context.enter_context(sharding.axis_rules(cfg.sharding.rules))
                calls = fused_calls(jax.jit(jax.value_and_grad(loss)).lower(params, x))
        except Exception as e:  # noqa: BLE001 (report it as a failed check, and go on)
            failures.append(f"image encoder ({where}) failed to lower: {type(e).__name__}: {e}")
            continue
        print(f"image encoder (2 blocks, remat {remat}, {where}), attention 'auto': {calls} fused cuDNN attention "
              "calls in forward + backward")
        want = 4 + 2 * remat  # forward and backward of each of the two blocks, and the recomputed forwards
        if calls < want:
            failures.append(f"auto attention in the image encoder (remat {remat}, {where}) lowered to {calls} "
                            f"cuDNN calls, not {want}")

    mask = jnp.ones((b, n), bool)
    calls = fused_calls(jax.jit(lambda q, k, v, m: transformer.attention(q, k, v, m)).lower(*bf[:3], mask))
    print(f"masked (text-encoder) attention, 'auto': {calls} cuDNN calls (expected 0: XLA)")
    if calls:
        failures.append("masked attention went to cuDNN")

    text_lengths_experiment()

    for f in failures:
        print("FAIL:", f)
    print("gpu_attention_check:", "FAILED" if failures else "all checks passed")
    sys.exit(1 if failures else 0)


def time_fn(f, *args, reps=20) -> float:
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def text_lengths_experiment(lengths_impl: str = "cudnn", texts: int = 56, tokens: int = 128):
    """Not a check, a measurement for a possible change: the text encoder's attention at the paper step's size (56
    texts of 128 tokens, trailing padding) as the masked XLA attention it runs now, against cuDNN's fused kernel
    given key lengths instead of a mask. Prints the difference on the real tokens (values, and gradients with the
    padded rows' cotangent zero) and the forward + backward time of each."""
    rng = np.random.default_rng(1)
    q, k, v, g = (jnp.asarray(rng.normal(size=(texts, tokens, 12, 64)), jnp.bfloat16) for _ in range(4))
    lengths = jnp.asarray(rng.integers(8, tokens + 1, size=texts), jnp.int32)
    real = jnp.arange(tokens)[None, :] < lengths[:, None]  # [T, N] real tokens, padding at the end
    g = jnp.where(real[:, :, None, None], g, 0)

    def masked(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=real[:, None, None, :], implementation="xla")

    def with_lengths(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=lengths_impl)

    def fwd_bwd(attn):
        def f(q, k, v):
            return jnp.sum(attn(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    print(f"== text-encoder attention ({texts} texts x {tokens} tokens, trailing padding, bf16): masked XLA vs "
          f"{lengths_impl} with key lengths")
    try:
        a = [np.asarray(t, np.float32) for t in (masked(q, k, v), *fwd_bwd(masked)(q, k, v)[1])]
        b = [np.asarray(t, np.float32) for t in (with_lengths(q, k, v), *fwd_bwd(with_lengths)(q, k, v)[1])]
    except Exception as e:  # noqa: BLE001 (a refusal is a result here)
        print(f"{lengths_impl} with key lengths refused: {type(e).__name__}: {str(e)[:300]}")
        return
    keep = np.asarray(real)[:, :, None, None]
    diffs = [float(np.max(np.abs(np.where(keep, x - y, 0))) / (np.max(np.abs(x)) + 1e-30)) for x, y in zip(a, b)]
    nan = [not np.all(np.isfinite(y)) for y in b]
    print("max |difference| / max |masked XLA| on real tokens: " + ", ".join(
        f"{n} {d:.2e}" for n, d in zip(("out", "dq", "dk", "dv"), diffs)) + f"; non-finite values: {any(nan)}")
    t_mask, t_len = time_fn(fwd_bwd(masked), q, k, v), time_fn(fwd_bwd(with_lengths), q, k, v)
    print(f"forward + backward: masked XLA {t_mask * 1e3:.3f} ms, {lengths_impl} with lengths {t_len * 1e3:.3f} ms "
          f"(x12 layers per step)")


if __name__ == "__main__":
    main()
