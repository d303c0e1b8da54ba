"""The text encoder, chosen by `model.text.arch`: "pre_ln" (this project's pre-LayerNorm BERT-style encoder over
sentencepiece ids) or "bert" (`bert.BertEncoder`, the architecture of a pretrained BERT; model.text.init). The first
token is [CLS]; every text ends in its end token ([EOS] or [SEP]) and is padded with PAD_ID after it."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from fvlm_jax.models.bert import BertEncoder
from fvlm_jax.models.transformer import Block, block_runner, layer_norm
from fvlm_jax.sharding import constrain, logical

PAD_ID = 0  # input_pipeline.tokenizer's padding id, sentencepiece's and WordPiece's ([PAD] of a BERT vocabulary)
ARCHS = ("pre_ln", "bert")


def truncate_tokens(tokens, length: int):
    """Token ids [..., T] cut to their first `length` (<= T), as the tokenizer would have written them at that
    length: a text that continues past the cut ends at position length - 1 in its own end token (its last
    non-padding token: [EOS] of sentencepiece, [SEP] of WordPiece)."""
    t = tokens.shape[-1]
    if length >= t:
        return tokens
    out = tokens[..., :length]
    cut = tokens[..., length] != PAD_ID
    last = jnp.maximum(jnp.sum(tokens != PAD_ID, axis=-1, keepdims=True) - 1, 0)
    end = jnp.take_along_axis(tokens, last, axis=-1)[..., 0]
    return out.at[..., length - 1].set(jnp.where(cut, end, out[..., length - 1]))


def text_encoder(t: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=jnp.float32, **kw) -> nnx.Module:
    """The text encoder of cfg.model.text (`t`); kw: remat, remat_policy, attention_impl. Maps ids [..., T] to the
    [CLS] output [..., t.width]."""
    sizes = dict(vocab_size=t.vocab_size, max_len=t.max_len, width=t.width, depth=t.depth, heads=t.heads,
                 mlp_dim=t.mlp_dim)
    if t.arch == "bert":
        return BertEncoder(**sizes, type_vocab_size=t.bert.type_vocab_size, layer_norm_eps=t.bert.layer_norm_eps,
                           hidden_act=t.bert.hidden_act, pad_id=PAD_ID, rngs=rngs, dtype=dtype, **kw)
    if t.arch != "pre_ln":
        raise ValueError(f"model.text.arch={t.arch!r}: choose one of {ARCHS}")
    return TextEncoder(**sizes, rngs=rngs, dtype=dtype, **kw)


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
