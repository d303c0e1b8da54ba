"""BERT-style text encoder over sentencepiece ids; the first token is [CLS]."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fvlm_jax.models.transformer import Block, apply_block

PAD_ID = 0


class TextEncoder(nnx.Module):
    def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int, heads: int, mlp_dim: int,
                 rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False):
        self.remat = remat
        self.tok = nnx.Embed(vocab_size, width, rngs=rngs, dtype=dtype)
        self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_len, width)))
        self.blocks = nnx.List([Block(width, heads, mlp_dim, rngs=rngs, dtype=dtype) for _ in range(depth)])
        self.final_ln = nnx.LayerNorm(width, rngs=rngs, dtype=dtype)

    def __call__(self, tokens):
        """tokens: [..., T] int ids, 0 = padding. Returns the [CLS] output [..., D]."""
        lead, t = tokens.shape[:-1], tokens.shape[-1]
        tokens = tokens.reshape(-1, t)
        x = self.tok(tokens)
        x = x + self.pos[:t].astype(x.dtype)
        mask = tokens != PAD_ID
        run = nnx.remat(apply_block) if self.remat else apply_block
        for block in self.blocks:
            x = run(block, x, mask)
        return self.final_ln(x[:, 0]).reshape(*lead, -1)
