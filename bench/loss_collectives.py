"""What the anatomy contrastive loss (forward + backward) moves between devices: GSPMD vs shard_map.

Compiles the loss and its gradient with respect to the embeddings on a mesh of fake CPU devices, then sums the
result sizes of the collectives (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute) in the
optimised HLO, and times both on the CPU. The embeddings arrive sharded over the batch, as after the encoders.

  python bench/loss_collectives.py --devices=8 --batch=112 --anatomies=4 --dim=256
"""

from __future__ import annotations

import argparse
import os
import re
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--batch", type=int, default=112, help="global batch (the reference: 8 GPUs x 14)")
    ap.add_argument("--anatomies", type=int, default=4)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--diseases", type=int, default=16)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from fvlm_jax import losses

    rng = np.random.default_rng(0)
    a, b, d, k = args.anatomies, args.batch, args.dim, args.diseases
    img = rng.normal(size=(a, b, d)).astype(np.float32)
    txt = rng.normal(size=(a, b, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    normal = rng.random((a, b)) < 0.5
    meta = dict(valid=rng.random((a, b)) < 0.9, normal=normal, text_id=rng.integers(0, b, (a, b)).astype(np.int32),
                disease=(rng.random((a, b, k)) < 0.2) & ~normal[..., None])
    mesh = jax.make_mesh((args.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    put = {2: NamedSharding(mesh, P(None, "data")), 3: NamedSharding(mesh, P(None, "data", None))}
    img, txt = (jax.device_put(x, put[3]) for x in (img, txt))
    meta = {n: jax.device_put(v, put[v.ndim]) for n, v in meta.items()}

    def gspmd(i, t, m):
        return losses.anatomy_contrastive_loss(i, t, temperature=0.07, **m)

    def sharded(i, t, m):
        return losses.sharded_anatomy_contrastive_loss(i, t, temperature=0.07, mesh=mesh, batch_axes=("data",), **m)

    print(f"{args.devices} CPU devices, global batch {b}, {a} anatomies, embedding {d}: loss + d(loss)/d(embeddings)")
    results = {}
    for name, fn in (("gspmd", gspmd), ("shard_map", sharded)):
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        with jax.set_mesh(mesh):
            hlo = step.lower(img, txt, meta).compile().as_text()
            moved = collective_bytes(hlo)
            value, _ = jax.block_until_ready(step(img, txt, meta))
            t0 = time.perf_counter()
            for _ in range(20):
                out = step(img, txt, meta)
            jax.block_until_ready(out)
        results[name] = float(value)
        ms = (time.perf_counter() - t0) / 20 * 1e3
        detail = ", ".join(f"{op} {n} x, {size / 2**10:.0f} KiB" for op, (n, size) in sorted(moved.items())) or "none"
        total = sum(size for _, size in moved.values())
        print(f"{name:9s} loss {float(value):.5f}  {ms:6.2f} ms/step  collectives: {total / 2**10:.0f} KiB ({detail})")
    assert np.isclose(results["gspmd"], results["shard_map"], rtol=1e-5), results


DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def collective_bytes(hlo: str) -> dict:
    """{op: (count, bytes of its results)} over the collectives of an optimised HLO module."""
    out = {}
    pattern = re.compile(r"= (\(?[^=]*?\)?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")
    for line in hlo.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        size = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            if dtype in DTYPE_BYTES:
                size += DTYPE_BYTES[dtype] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
        n, total = out.get(m.group(2), (0, 0))
        out[m.group(2)] = (n + 1, total + size)
    return out


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
