"""The fVLM image encoder's train step in JAX/Flax NNX against MONAI's ViT in PyTorch, same size, same precision.

The public fVLM code builds its 3D image encoder on MONAI's `ViT`. Both sides here run the same step: a
single-channel volume through a linear (strided conv) patch embedding and a pre-LN transformer, mean over tokens,
a linear head, a squared-error loss, backward, AdamW update. The two are timed in alternating rounds in one process,
so machine noise hits both alike; the ratio is JAX step time / PyTorch step time (below 1 = JAX is faster).

  python bench/vs_pytorch.py          # CPU, the small size: width 256, 4 layers, 256 tokens, batch 4
  python bench/vs_pytorch.py --size=paper --batch=14 --jax_dtype=bfloat16 --torch_device=cuda
      # on a GPU host: JAX bf16 against the PyTorch fp32 recipe, ViT-B on 112x256x352 with 16x16x32 patches

Needs `torch` and `monai` (not dependencies of fvlm-jax: `pip install torch monai`).
"""

from __future__ import annotations

import argparse
import os
import time

# On a GPU, JAX would otherwise reserve 75 % of the card before PyTorch allocates anything.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from fvlm_jax.models import transformer  # noqa: E402
from fvlm_jax.models.vit3d import ViT3D  # noqa: E402

SIZES = {  # input_zyx, patch_zyx, width, depth, heads, mlp
    "small": ((32, 64, 64), (8, 8, 8), 256, 4, 4, 1024),
    "paper": ((112, 256, 352), (16, 16, 32), 768, 12, 12, 3072),
}


class JaxEncoder(nnx.Module):
    def __init__(self, input_zyx, patch_zyx, width, depth, heads, mlp, dtype, remat, rngs):
        self.vit = ViT3D(input_zyx=input_zyx, patch_zyx=patch_zyx, width=width, depth=depth, heads=heads,
                         mlp_dim=mlp, feature_blocks=(), rngs=rngs, dtype=dtype, remat=remat)
        self.head = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, volume):
        tokens = self.vit(volume)[-1]  # final LayerNorm output [B, N, D]
        return self.head(tokens.mean(axis=1).astype(jnp.float32))[:, 0]


def autodiff_attention(q, k, v, mask=None, impl=None):
    """fvlm_jax's CPU attention forward with JAX's autodiff gradient instead of its hand-written one (for A/B), in
    the same head groups."""
    return transformer.in_head_groups(_autodiff_attention_group, q, k, v, mask)


def _autodiff_attention_group(q, k, v, mask):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k,
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, -0.7 * float(jnp.finfo(jnp.float32).max))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def unsplit_attention(q, k, v, mask=None, impl=None):
    """fvlm_jax's CPU attention with all heads in one group (for A/B of `transformer.CPU_HEAD_GROUPS`)."""
    return transformer.cpu_attention(q, k, v, mask, groups=1)


def jax_step_fn(args, size, attention=None, devices=1):
    if attention is not None:  # traced below, at the first call, with this attention
        saved, transformer.attention = transformer.attention, attention
        try:
            run, sync = jax_step_fn(args, size, devices=devices)
            sync(run())
        finally:
            transformer.attention = saved
        return run, sync
    model = JaxEncoder(*size, dtype=jnp.dtype(args.jax_dtype), remat=args.remat, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)  # plain arrays, as the trainer's state holds them
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((args.batch, *size[0]), np.float32))
    y = jnp.asarray(rng.random((args.batch,), np.float32))
    if devices > 1:  # data parallel: the batch split over the first `devices` devices, parameters replicated
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:devices])
        split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        x, y = jax.device_put(x, split), jax.device_put(y, split)
        params, opt = jax.device_put(params, whole), jax.device_put(opt, whole)
    state = [params, opt]

    def run():
        state[0], state[1], loss = step(state[0], state[1], x, y)
        return loss

    return run, lambda loss: float(jax.block_until_ready(loss))


def torch_step_fn(args, size, gelu="exact"):
    """MONAI's ViT as shipped (`gelu="exact"`: erf GELU), or with its MLP activation swapped for the tanh
    approximation (`gelu="tanh"`), the function the JAX model computes (jax.nn.gelu's default)."""
    import torch
    from monai.networks.nets import ViT

    dev = torch.device(args.torch_device)
    input_zyx, patch_zyx, width, depth, heads, mlp = size
    vit = ViT(in_channels=1, img_size=input_zyx, patch_size=patch_zyx, hidden_size=width, mlp_dim=mlp,
              num_layers=depth, num_heads=heads, proj_type="conv", classification=False, qkv_bias=True).to(dev)
    if gelu == "tanh":
        for block in vit.blocks:
            block.mlp.fn = torch.nn.GELU(approximate="tanh")
    head = torch.nn.Linear(width, 1).to(dev)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((args.batch, 1, *input_zyx), np.float32)).to(dev)
    y = torch.from_numpy(rng.random((args.batch,), np.float32)).to(dev)

    def run():
        opt.zero_grad(set_to_none=True)
        tokens, _ = vit(x)
        loss = torch.mean((head(tokens.mean(dim=1))[:, 0] - y) ** 2)
        loss.backward()
        opt.step()
        return loss

    def sync(loss):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach().cpu())

    return run, sync


def timed(run, sync, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        out = run()
    sync(out)
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating JAX / PyTorch rounds")
    ap.add_argument("--jax_dtype", default="float32")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--torch_device", default="cpu")
    ap.add_argument("--jax_autodiff_attention", action="store_true",
                    help="also time the JAX step with autodiff through the attention (A/B of the hand-written "
                         "CPU attention gradient)")
    ap.add_argument("--jax_unsplit_attention", action="store_true",
                    help="also time the JAX step with the CPU attention's heads in one group (A/B of "
                         "transformer.CPU_HEAD_GROUPS: XLA:CPU runs each group's batched matmuls on one thread)")
    ap.add_argument("--jax_cpu_devices", type=int, default=1,
                    help="also time the JAX step data parallel over this many XLA:CPU devices (the host's cores "
                         "split into devices; XLA:CPU runs a batched matmul on one thread per device)")
    args = ap.parse_args()
    if args.jax_cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.jax_cpu_devices)
    try:
        import monai
        import torch
    except ImportError as e:
        raise SystemExit(f"this comparison needs PyTorch and MONAI ({e}): pip install torch monai") from e
    torch.set_num_threads(os.cpu_count())
    size = SIZES[args.size]
    n_tokens = int(np.prod([i // p for i, p in zip(size[0], size[1])]))
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({args.jax_dtype}); PyTorch {torch.__version__} "
          f"+ MONAI {monai.__version__} on {args.torch_device} (float32); {os.cpu_count()} CPU threads")
    print(f"size {args.size}: input {size[0]}, patch {size[1]}, {n_tokens} tokens, width {size[2]}, depth {size[3]}, "
          f"heads {size[4]}, mlp {size[5]}, batch {args.batch}")

    sides = {"jax": jax_step_fn(args, size), "pytorch": torch_step_fn(args, size),
             "pytorch_tanh": torch_step_fn(args, size, gelu="tanh")}
    for flag in ("jax_autodiff_attention", "jax_unsplit_attention"):
        if getattr(args, flag) and jax.default_backend() != "cpu":
            raise SystemExit(f"--{flag} compares XLA:CPU attention variants; run it on a CPU host")
    if args.jax_autodiff_attention:
        sides["jax_autodiff"] = jax_step_fn(args, size, attention=autodiff_attention)
    if args.jax_unsplit_attention:
        sides["jax_unsplit"] = jax_step_fn(args, size, attention=unsplit_attention)
    if args.jax_cpu_devices > 1:
        if jax.default_backend() != "cpu":
            raise SystemExit("--jax_cpu_devices splits a CPU host into XLA:CPU devices; run it on a CPU host")
        if args.batch % args.jax_cpu_devices:
            raise SystemExit(f"--batch={args.batch} does not split over --jax_cpu_devices={args.jax_cpu_devices}")
        sides[f"jax_{args.jax_cpu_devices}dev"] = jax_step_fn(args, size, devices=args.jax_cpu_devices)
    for run, sync in sides.values():  # compile / warm up
        sync(run())
        sync(run())
    for run, sync in sides.values():  # one untimed round each: the first timed round used to read 1.3-1.8x high
        timed(run, sync, args.steps)
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (run, sync) in sides.items():
            times[name].append(timed(run, sync, args.steps))
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:12s} step {v * 1e3:8.1f} ms (median of {args.rounds} rounds x {args.steps} steps; "
              f"min {min(times[k]) * 1e3:.1f})   {args.batch / v:7.2f} volumes/s")
    print("(pytorch: MONAI's ViT as shipped, exact erf GELU; pytorch_tanh: the same with tanh-approximate GELU, "
          "the function the JAX model computes)")
    for torch_side in ("pytorch", "pytorch_tanh"):
        ratios = [j / p for j, p in zip(times["jax"], times[torch_side])]
        print(f"ratio JAX / {torch_side} step time: {med['jax'] / med[torch_side]:.2f} (per round: "
              + ", ".join(f"{r:.2f}" for r in ratios) + f"); JAX volumes/s = {med[torch_side] / med['jax']:.2f}x")
    dp = f"jax_{args.jax_cpu_devices}dev"
    if dp in med:
        ratios = [j / p for j, p in zip(times[dp], times["pytorch"])]
        print(f"ratio JAX on {args.jax_cpu_devices} CPU devices / pytorch step time: {med[dp] / med['pytorch']:.2f} "
              f"(per round: " + ", ".join(f"{r:.2f}" for r in ratios) + f"); against JAX on one device: "
              f"{med[dp] / med['jax']:.2f}")
    if "jax_unsplit" in med:
        ratios = [j / u for j, u in zip(times["jax"], times["jax_unsplit"])]
        print(f"JAX step with the CPU attention's heads in {transformer.CPU_HEAD_GROUPS} groups / in one group: "
              f"{med['jax'] / med['jax_unsplit']:.3f} (per round: " + ", ".join(f"{r:.2f}" for r in ratios) + ")")
    if "jax_autodiff" in med:
        print(f"JAX step with the hand-written CPU attention gradient / with autodiff through attention: "
              f"{med['jax'] / med['jax_autodiff']:.2f}")


if __name__ == "__main__":
    main()
