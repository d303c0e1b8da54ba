"""BERT-style text encoder over sentencepiece ids; the first token is [CLS]."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from fvlm_jax.models.transformer import Block, block_runner, layer_norm
from fvlm_jax.sharding import constrain, logical

PAD_ID = 0
EOS_ID = 3  # input_pipeline.tokenizer's ids: [PAD] 0, [UNK] 1, [CLS] 2, [EOS] 3


def truncate_tokens(tokens, length: int):
    """Token ids [..., T] cut to their first `length` (<= T), as the tokenizer would have written them at that
    length: a text that continues past the cut ends in [EOS] at position length - 1."""
    t = tokens.shape[-1]
    if length >= t:
        return tokens
    out = tokens[..., :length]
    cut = tokens[..., length] != PAD_ID
    return out.at[..., length - 1].set(jnp.where(cut, EOS_ID, out[..., length - 1]))


class TextEncoder(nnx.Module):
    def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int, heads: int, mlp_dim: int,
                 rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False,
                 remat_policy: str = "nothing_saveable", attention_impl: str = "auto"):
        self.remat, self.remat_policy = remat, remat_policy
        self.tok = nnx.Embed(vocab_size, width, rngs=rngs, dtype=dtype, embedding_metadata=logical("vocab", "embed"))
        self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_len, width)),
                             **logical("length", "embed"))
        self.blocks = nnx.List([Block(width, heads, mlp_dim, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
                                for _ in range(depth)])
        self.final_ln = layer_norm(width, rngs=rngs, dtype=dtype)

    def __call__(self, tokens):
        """tokens: [..., T] int ids, 0 = padding. Returns the [CLS] output [..., D]."""
        lead, t = tokens.shape[:-1], tokens.shape[-1]
        tokens = constrain(tokens.reshape(-1, t), "batch", None)
        x = self.tok(tokens)
        x = x + self.pos[:t].astype(x.dtype)
        mask = tokens != PAD_ID
        run = block_runner(self.remat, self.remat_policy)
        for block in self.blocks:
            x = run(block, x, mask)
        return self.final_ln(x[:, 0]).reshape(*lead, -1)
