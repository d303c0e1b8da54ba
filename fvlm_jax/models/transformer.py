"""Pre-LayerNorm transformer block shared by the vision and text encoders."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
    """x + MHSA(LN(x)), then x + MLP(LN(x)). qkv with bias, as ViT-B / BERT."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.ln1 = nnx.LayerNorm(width, rngs=rngs, dtype=dtype)
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs, dtype=dtype)
        self.out = nnx.Linear(width, width, rngs=rngs, dtype=dtype)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs, dtype=dtype)
        self.fc1 = nnx.Linear(width, mlp_dim, rngs=rngs, dtype=dtype)
        self.fc2 = nnx.Linear(mlp_dim, width, rngs=rngs, dtype=dtype)

    def __call__(self, x, mask=None):
        """x: [B, N, D]; mask: optional [B, N] bool of real (non-padding) tokens. Returns [B, N, D]."""
        b, n, d = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = jax.nn.dot_product_attention(q, k, v, mask=attn_mask)
        x = x + self.out(y.reshape(b, n, d))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


def apply_block(block, x, *args):
    """block(x, *args) as a function of the module, so that nnx.remat can wrap it (rematerialisation)."""
    return block(x, *args)
