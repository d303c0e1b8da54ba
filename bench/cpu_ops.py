"""Where the CPU encoder step's JAX / PyTorch gap is: its pieces timed alone, JAX against PyTorch in one process.

  python bench/cpu_ops.py [--rounds 9] [--calls 20]      # needs torch (not a dependency: pip install torch)

The pieces, at the small size of `bench/vs_pytorch.py` (width 256, MLP 1024, 4 heads of 64, 256 tokens, batch 4:
1024 token rows), all float32:
- each dense layer's three products: forward x W, input gradient dy W^T, weight gradient x^T dy;
- the attention's batched products over batch x heads (16), in the layouts of `transformer.cpu_attention`: the
  logits Q K^T ([16, 256, 64] by [16, 256, 64]), P V, and the transposed-operand form of dK and dV (P^T dO);
- a residual chain of 4 pre-LN MLP halves (x + fc2(gelu(fc1(LN(x))))), forward and backward, built from
  fvlm_jax's own layers (`transformer.layer_norm`, `dense`, `gelu`) against torch.nn's; and the same chain with the
  matmuls alone (x + (x W1) W2), which shows how much of the chain's gap is the matmul library.

Each piece is one jitted JAX function and the same PyTorch call, timed in alternating rounds of `--calls` calls
(medians over `--rounds`); the ratio is JAX time / PyTorch time. A benchmark that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvlm_jax.models import transformer

ROWS, WIDTH, MLP, HEADS, TOKENS = 1024, 256, 1024, 4, 256
BH, DH = ROWS // TOKENS * HEADS, WIDTH // HEADS  # batched attention: batch x heads, head width
DENSE = {"qkv": (WIDTH, 3 * WIDTH), "out": (WIDTH, WIDTH), "fc1": (WIDTH, MLP), "fc2": (MLP, WIDTH)}
PRODUCTS = {  # name: (lhs shape, rhs shape, einsum), the same in both libraries
    **{f"{n} forward x W": ((ROWS, i), (i, o), "ni,io->no") for n, (i, o) in DENSE.items()},
    **{f"{n} input grad dy W^T": ((ROWS, o), (i, o), "no,io->ni") for n, (i, o) in DENSE.items()},
    **{f"{n} weight grad x^T dy": ((ROWS, i), (ROWS, o), "ni,no->io") for n, (i, o) in DENSE.items()},
    "attention logits Q K^T": ((BH, TOKENS, DH), (BH, TOKENS, DH), "bqd,bkd->bqk"),
    "attention P V": ((BH, TOKENS, TOKENS), (BH, TOKENS, DH), "bqk,bkd->bqd"),
    "attention dK, dV: P^T dO": ((BH, TOKENS, TOKENS), (BH, TOKENS, DH), "bqk,bqd->bkd"),
}
CHAIN_DEPTH = 4


class JaxMlpChain(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.List([transformer.layer_norm(WIDTH, rngs=rngs) for _ in range(CHAIN_DEPTH)])
        self.fc1 = nnx.List([transformer.dense(WIDTH, MLP, ("embed", "mlp"), rngs=rngs) for _ in range(CHAIN_DEPTH)])
        self.fc2 = nnx.List([transformer.dense(MLP, WIDTH, ("mlp", "embed"), rngs=rngs) for _ in range(CHAIN_DEPTH)])

    def __call__(self, x):
        for ln, fc1, fc2 in zip(self.ln, self.fc1, self.fc2):
            x = x + fc2(transformer.gelu(fc1(ln(x))))
        return x


def jax_pieces(rng):
    out = {}
    for name, (a, b, eq) in PRODUCTS.items():
        args = (jnp.asarray(rng.standard_normal(a, np.float32)), jnp.asarray(rng.standard_normal(b, np.float32)))
        out[name] = (jax.jit(lambda x, y, eq=eq: jnp.einsum(eq, x, y)), args)
    x = jnp.asarray(rng.standard_normal((ROWS // TOKENS, TOKENS, WIDTH), np.float32))
    graphdef, params = nnx.split(JaxMlpChain(nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)

    @jax.jit
    def chain(params, x):
        return jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2), argnums=(0, 1))(params, x)

    weights = [(jnp.asarray(rng.standard_normal((WIDTH, MLP), np.float32) * 0.05),
                jnp.asarray(rng.standard_normal((MLP, WIDTH), np.float32) * 0.05)) for _ in range(CHAIN_DEPTH)]

    def matmuls_alone(weights, x):
        x = x.reshape(ROWS, WIDTH)
        for w1, w2 in weights:
            x = x + (x @ w1) @ w2
        return jnp.sum(x ** 2)

    out["MLP chain, fvlm_jax layers (fwd + bwd)"] = (chain, (params, x))
    out["MLP chain, matmuls alone (fwd + bwd)"] = (jax.jit(jax.grad(matmuls_alone, argnums=(0, 1))), (weights, x))
    return out, jax.block_until_ready


def torch_pieces(rng):
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    out = {}
    for name, (a, b, eq) in PRODUCTS.items():
        args = tuple(torch.from_numpy(rng.standard_normal(shape, np.float32)) for shape in (a, b))
        out[name] = ((lambda x, y, eq=eq: torch.einsum(eq, x, y)), args)
    x = torch.from_numpy(rng.standard_normal((ROWS // TOKENS, TOKENS, WIDTH), np.float32)).requires_grad_()
    layers = [(torch.nn.LayerNorm(WIDTH, eps=1e-6), torch.nn.Linear(WIDTH, MLP), torch.nn.Linear(MLP, WIDTH))
              for _ in range(CHAIN_DEPTH)]

    chain_params = [x] + [p for layer in layers for m in layer for p in m.parameters()]

    def chain():  # gradients returned, as jax.grad does (not accumulated into .grad)
        h = x
        for ln, fc1, fc2 in layers:
            h = h + fc2(torch.nn.functional.gelu(fc1(ln(h)), approximate="tanh"))
        return torch.autograd.grad(torch.sum(h ** 2), chain_params)

    weights = [(torch.from_numpy(rng.standard_normal((WIDTH, MLP), np.float32) * 0.05).requires_grad_(),
                torch.from_numpy(rng.standard_normal((MLP, WIDTH), np.float32) * 0.05).requires_grad_())
               for _ in range(CHAIN_DEPTH)]

    def matmuls_alone():
        h = x.reshape(ROWS, WIDTH)
        for w1, w2 in weights:
            h = h + (h @ w1) @ w2
        return torch.autograd.grad(torch.sum(h ** 2), [w for pair in weights for w in pair] + [x])

    out["MLP chain, fvlm_jax layers (fwd + bwd)"] = (chain, ())
    out["MLP chain, matmuls alone (fwd + bwd)"] = (matmuls_alone, ())
    return out, lambda o: o


def timed(fn, args, sync, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        o = fn(*args)
    sync(o)
    return (time.perf_counter() - t0) / calls * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9, help="alternating JAX / PyTorch rounds per piece")
    ap.add_argument("--calls", type=int, default=20, help="calls per timed round")
    args = ap.parse_args()
    if jax.default_backend() != "cpu":
        raise SystemExit("this benchmark compares XLA:CPU with PyTorch on the CPU: run it on a CPU host "
                         "(JAX_PLATFORMS=cpu)")
    try:
        import torch
    except ImportError as e:
        raise SystemExit(f"this comparison needs PyTorch ({e}): pip install torch") from e
    rng = np.random.default_rng(0)
    sides = {"jax": jax_pieces(rng), "pytorch": torch_pieces(rng)}
    print(f"JAX {jax.__version__} (XLA:CPU) against PyTorch {torch.__version__}, "
          f"{len(os.sched_getaffinity(0))} CPU threads, "
          f"float32; {args.rounds} alternating rounds of {args.calls} calls, medians")
    print(f"{'piece':<40}{'JAX ms':>9}{'PyTorch ms':>12}{'ratio':>8}")
    for name in sides["jax"][0]:
        times = {side: [] for side in sides}
        for pieces, sync in sides.values():  # compile / warm up, untimed
            timed(*pieces[name], sync, 3)
        for _ in range(args.rounds):
            for side, (pieces, sync) in sides.items():
                times[side].append(timed(*pieces[name], sync, args.calls))
        j, t = np.median(times["jax"]), np.median(times["pytorch"])
        print(f"{name:<40}{j:>9.3f}{t:>12.3f}{j / t:>8.2f}")


if __name__ == "__main__":
    main()
