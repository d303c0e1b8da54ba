"""Pre-LayerNorm transformer block shared by the vision and text encoders."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from fvlm_jax.sharding import active_mesh_axes, active_mesh_size, constrain, logical

log = logging.getLogger(__name__)


class Block(nnx.Module):
    """x + MHSA(LN(x)), then x + MLP(LN(x)). qkv with bias, as ViT-B / BERT."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 attention_impl: str = "auto"):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention implementation {attention_impl!r} is not one of {ATTENTION_IMPLS}")
        self.heads = heads
        self.attention_impl = attention_impl
        self.ln1 = layer_norm(width, rngs=rngs, dtype=dtype)
        # qkv columns are head-major ([head][q|k|v][channel]), so splitting them over the tensor axis splits heads.
        self.qkv = dense(width, 3 * width, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.out = dense(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype)
        self.ln2 = layer_norm(width, rngs=rngs, dtype=dtype)
        self.fc1 = dense(width, mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(mlp_dim, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.gelu = "tanh"  # a GELUS name (configure_blocks)
        # MONAI's ViT block drops the attention output, the MLP hidden units and the MLP output. Rate 0 (the default;
        # configure_blocks sets it) returns its input unchanged; training turns them on (train_dropout).
        self.drop_attn, self.drop_hidden, self.drop_mlp = (nnx.Dropout(0.0, deterministic=True) for _ in range(3))

    def __call__(self, x, mask=None):
        """x: [B, N, D]; mask: optional [B, N] bool of real (non-padding) tokens. Returns [B, N, D]."""
        b, n, d = x.shape
        x = constrain(x, "batch", "length", "act_embed")
        qkv = self.qkv(self.ln1(x)).reshape(b, n, self.heads, 3, d // self.heads)
        qkv = constrain(qkv, "batch", "length", "heads", None, None)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        y = attention(q, k, v, mask, impl=self.attention_impl)
        x = x + self.drop_attn(self.out(y.reshape(b, n, d)))
        h = constrain(self.drop_hidden(GELU_FNS[self.gelu](self.fc1(self.ln2(x)))), "batch", "length", "mlp")
        return constrain(x + self.drop_mlp(self.fc2(h)), "batch", "length", "act_embed")


def configure_blocks(module: nnx.Module, *, gelu: str | None = None, dropout: float | None = None) -> None:
    """Sets the GELU form (a GELUS name) of every Block in `module`, and the rate of every nnx.Dropout in it, in
    place, before the module is split: both are static (part of the graph definition). None leaves one as it is."""
    for _, m in module.iter_modules():
        if gelu is not None and isinstance(m, Block):
            m.gelu = gelu
        if dropout is not None and isinstance(m, nnx.Dropout):
            m.rate = float(dropout)


def train_dropout(model: nnx.Module, key) -> None:
    """Turns on, in place, every nnx.Dropout of `model` with a rate > 0, each with its own key folded from `key`
    (jax.random key). For one training call on a model just merged from its parameters: the model built from the
    same parameters for evaluation or export leaves dropout off (deterministic)."""
    for i, (_, m) in enumerate(model.iter_modules()):
        if isinstance(m, nnx.Dropout) and m.rate > 0:
            m.deterministic = False
            m.rngs = nnx.Rngs(dropout=jax.random.fold_in(key, i)).dropout


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "cpu")

# jax.nn.gelu (tanh form), recomputed in the backward pass from its input (the fc1 output) instead of autodiff
# storing the tanh's intermediates: one [B, N, mlp] array per block less written in the forward and read in the
# backward, and the recomputation fuses into the gradient's elementwise pass. Same values and gradients; the encoder
# step of bench/vs_pytorch.py is about 3 % faster on a 2-core CPU (0.97 of the step, alternating rounds), and XLA's
# memory estimate of the paper step (bf16, 14 volumes) drops from 39.0 to 34.6 GiB (31.7 to 28.8 GiB with remat).
gelu = jax.checkpoint(jax.nn.gelu)
# model.gelu: "tanh" (above) or "erf", the exact GELU of torch's nn.GELU and BERT (recomputed the same way).
GELU_FNS = {"tanh": gelu, "erf": jax.checkpoint(functools.partial(jax.nn.gelu, approximate=False))}
GELUS = tuple(GELU_FNS)


def attention(q, k, v, mask=None, impl: str = "auto"):
    """Softmax attention: q, k, v [B, N, H, Dh]; mask optional [B, N] bool of real key tokens. Returns [B, N, H, Dh].

    impl (config `model.attention`):
    - "cpu": `cpu_attention`, the product written out with a hand-written backward pass (fastest on XLA:CPU);
    - "xla": `jax.nn.dot_product_attention`'s XLA version (materialises the [B, H, N, N] logits);
    - "cudnn": `jax.nn.dot_product_attention`'s fused cuDNN kernel (NVIDIA GPUs, bf16/fp16; errors otherwise);
    - "auto": "cpu" on XLA:CPU; on a GPU, "cudnn" where cuDNN's fused kernel applies (bf16/fp16, Dh a multiple of 8
      up to 128, no mask: the image encoder; tokens not sharded, which its partitioner refuses), falling back to
      "xla" if it is refused when traced; else "xla". (The library's own default is XLA.) A refusal at compile
      time (a cuDNN graph that does not build) is not caught: set "xla" then.
    """
    if impl == "auto":
        if jax.default_backend() == "cpu":
            impl = "cpu"
        else:
            if _cudnn_applies(q, mask):
                try:
                    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
                except Exception as e:  # noqa: BLE001 (any refusal: no cuDNN, unsupported shape or version)
                    _warn_once(f"cuDNN fused attention refused ({type(e).__name__}: {e}); using the XLA attention")
            impl = "xla"
    if impl == "cpu":
        return cpu_attention(q, k, v, mask)
    if impl not in ("xla", "cudnn"):
        raise ValueError(f"attention implementation {impl!r} is not one of {ATTENTION_IMPLS}")
    return jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :],
                                        implementation=impl)


def _cudnn_applies(q, mask) -> bool:
    """Whether "auto" tries cuDNN's fused kernel: a CUDA GPU, bf16/fp16, head size a multiple of 8 up to 128, no
    mask, and tokens not sharded."""
    return (jax.default_backend() == "gpu" and mask is None and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and not active_mesh_axes("length"))


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _cpu_attention_fwd(q, k, v, mask):
    # Heads move ahead of tokens ([B, H, N, Dh]) once, so every product below is a plain batched matmul; with the
    # [B, N, H, Dh] operands XLA:CPU inserts the same transposes per product, forward and backward.
    qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16 else None
    f32 = jnp.promote_types(q.dtype, jnp.float32)
    # q is scaled before the logits: exact when Dh is a power of 4 (64 in ViT-B and BERT-base).
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), kh,
                        precision=precision, preferred_element_type=f32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)  # float32
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), vh)
    return jnp.swapaxes(out, 1, 2), (qh, kh, vh, probs, mask)


def _cpu_attention_bwd(res, d_out):
    """The softmax-attention gradient, as autodiff of the forward computes it, in four batched matmuls.

    d_probs = dO V^T; d_logits = P * (d_probs - rowsum(d_probs * P)); dQ = d_logits K * scale;
    dK = d_logits^T Q * scale; dV = P^T dO. Autodiff of the forward gives the same terms but keeps the [B, N, H, Dh]
    operand layouts and the softmax's broadcasts, which XLA:CPU turns into transposes and extra passes over the
    [B, H, N, N] arrays. Masked keys get no gradient, as through autodiff's `where`.
    """
    qh, kh, vh, probs, mask = res
    dt = qh.dtype
    f32 = jnp.promote_types(dt, jnp.float32)
    scale = jnp.asarray(qh.shape[-1] ** -0.5, dt)
    do = jnp.swapaxes(d_out, 1, 2)
    dv = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(dt), do)
    dp = jnp.einsum("bhqd,bhkd->bhqk", do, vh, preferred_element_type=f32)
    ds = probs * (dp - jnp.sum(dp * probs, axis=-1, keepdims=True))
    if mask is not None:
        ds = jnp.where(mask[:, None, None, :], ds, 0.0)
    ds = ds.astype(dt)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kh) * scale
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qh * scale)
    return tuple(jnp.swapaxes(t, 1, 2) for t in (dq, dk, dv)) + (None,)


# XLA:CPU runs a batched matmul on one thread when each product is small (a [256, 64] x [64, 256] per head takes
# the same time on one core as on two), but runs independent ops concurrently. `cpu_attention` therefore splits the
# heads into this many groups, each its own chain of products forward and backward. Measured on 2-core machines
# only (bench/vs_pytorch.py --jax_unsplit_attention); 4 groups there were slower than 2. Heads already split over
# mesh devices (the `heads` rule on a mesh axis larger than 1) stay in one group: slicing them would move data.
CPU_HEAD_GROUPS = 2


def cpu_attention(q, k, v, mask=None, groups: int | None = None):
    """`attention` on XLA:CPU: q scaled before the logits, float32 logits and softmax, and a hand-written backward
    (`_cpu_attention_bwd`), computed for independent groups of heads (`in_head_groups`: by default
    `CPU_HEAD_GROUPS`), so that XLA:CPU can run the groups' batched matmuls on different cores. The result is the
    same attention: heads do not interact.

    Against autodiff of the same forward, the hand-written backward takes the encoder step of
    `bench/vs_pytorch.py --jax_autodiff_attention` from 156 to 141 ms on a 2-core CPU."""
    return in_head_groups(_cpu_attention_group, q, k, v, mask, groups)


def in_head_groups(fn, q, k, v, mask=None, groups: int | None = None):
    """fn(q, k, v, mask) applied to `groups` (default `CPU_HEAD_GROUPS`, or 1 where the heads are sharded over a
    mesh axis; at most the number of heads) contiguous groups of heads of q, k, v [B, N, H, Dh], as independent ops;
    the outputs concatenated over heads."""
    heads = q.shape[2]
    if groups is None:
        groups = CPU_HEAD_GROUPS if active_mesh_size("heads") == 1 else 1
    groups = min(heads, groups)
    if groups <= 1:
        return fn(q, k, v, mask)
    bounds = [heads * i // groups for i in range(1, groups)]
    parts = zip(*(jnp.split(t, bounds, axis=2) for t in (q, k, v)))
    return jnp.concatenate([fn(a, b, c, mask) for a, b, c in parts], axis=2)


@jax.custom_vjp
def _cpu_attention_group(q, k, v, mask=None):
    return _cpu_attention_fwd(q, k, v, mask)[0]


_cpu_attention_group.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


def matmul_2d(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """nnx.Linear's dot_general with the input flattened to [-1, n_in]: the same product.

    With a [B, N, n_in] input the kernel gradient contracts two axes; XLA:CPU then transposes the output cotangent
    and runs that product outside its fast matmul path (about 3x slower). On [B * N, n_in] it is a plain x^T @ dy.
    Falls back to lax.dot_general for anything but a plain dense layer.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    if (lhs.ndim <= 2 or rhs.ndim != 2 or lb or rb or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,)
            or out_sharding is not None):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    y = lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
    return y.reshape(*lhs.shape[:-1], rhs.shape[-1])


def dense(n_in: int, n_out: int, axes: tuple, *, rngs: nnx.Rngs, dtype=jnp.float32, **kw) -> nnx.Linear:
    """nnx.Linear whose kernel has logical axes `axes` and whose bias has the output axis."""
    kw.setdefault("dot_general", matmul_2d)
    return nnx.Linear(n_in, n_out, rngs=rngs, dtype=dtype, kernel_metadata=logical(*axes),
                      bias_metadata=logical(axes[1]), **kw)


def layer_norm(width: int, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, rngs=rngs, dtype=dtype, scale_metadata=logical("norm"),
                         bias_metadata=logical("norm"))


def apply_block(block, x, *args):
    return block(x, *args)


def block_runner(remat: bool, policy: str = "nothing_saveable"):
    """fn(block, x, *args) -> block(x, *args), recomputed in the backward pass when `remat`, keeping only what the
    jax.checkpoint_policies `policy` allows.

    The block goes through jax.checkpoint as a pure function of its split state (blocks hold no mutable state), so
    it composes with jax.vjp / lax.scan (gradient accumulation) without Flax trace-level bookkeeping.
    """
    if not remat:
        return apply_block
    if not hasattr(jax.checkpoint_policies, policy):
        raise ValueError(f"model.remat_policy={policy!r} is not a jax.checkpoint_policies name")

    def run(block, x, *args):
        graphdef, state = nnx.split(block)

        def pure(state, x, *args):
            return nnx.merge(graphdef, state)(x, *args)

        return jax.checkpoint(pure, policy=getattr(jax.checkpoint_policies, policy))(state, x, *args)

    return run
