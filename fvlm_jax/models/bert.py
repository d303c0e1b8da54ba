"""BERT's encoder (Hugging Face `BertModel` without the pooler), so a pretrained BERT can be loaded as it is.

It differs from `transformer.Block`'s pre-LayerNorm encoder where BERT's weights depend on it: LayerNorm after each
residual sum (post-LN), learned position and token-type embeddings summed with the word embeddings and normalised,
BERT's LayerNorm epsilon and activation. The attention itself is `transformer.attention` (same kernels, same mask
convention). q, k and v are one head-major matmul as in `transformer.Block`, so the `heads` sharding rule splits
heads here too (`fvlm_jax.pretrained` rearranges BERT's separate query/key/value weights into it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fvlm_jax.models.transformer import ATTENTION_IMPLS, attention, block_runner, dense
from fvlm_jax.sharding import constrain, logical

# config.json's hidden_act -> the activation. "gelu" is the exact (erf) GELU; the others are its tanh form.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def bert_layer_norm(width: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=eps, rngs=rngs, dtype=dtype, scale_metadata=logical("norm"),
                         bias_metadata=logical("norm"))


class BertLayer(nnx.Module):
    """a = LN1(x + Out(MHSA(x))), then LN2(a + FC2(act(FC1(a)))): one BertLayer."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, eps: float, act: str, rngs: nnx.Rngs,
                 dtype=jnp.float32, attention_impl: str = "auto"):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention implementation {attention_impl!r} is not one of {ATTENTION_IMPLS}")
        self.heads, self.act, self.attention_impl = heads, act, attention_impl
        self.qkv = dense(width, 3 * width, ("embed", "heads"), rngs=rngs, dtype=dtype)  # [head][q|k|v][channel]
        self.out = dense(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype)
        self.ln1 = bert_layer_norm(width, eps, rngs=rngs, dtype=dtype)
        self.fc1 = dense(width, mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = dense(mlp_dim, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        self.ln2 = bert_layer_norm(width, eps, rngs=rngs, dtype=dtype)

    def __call__(self, x, mask=None):
        """x: [B, N, D]; mask: optional [B, N] bool of real tokens. Returns [B, N, D]."""
        b, n, d = x.shape
        x = constrain(x, "batch", "length", "act_embed")
        qkv = constrain(self.qkv(x).reshape(b, n, self.heads, 3, d // self.heads),
                        "batch", "length", "heads", None, None)
        y = attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], mask, impl=self.attention_impl)
        x = self.ln1(x + self.out(y.reshape(b, n, d)))
        h = constrain(ACTIVATIONS[self.act](self.fc1(x)), "batch", "length", "mlp")
        return constrain(self.ln2(x + self.fc2(h)), "batch", "length", "act_embed")


class BertEncoder(nnx.Module):
    """BERT over token ids [..., T] ([CLS] first, `pad_id` = padding); the text encoder's [CLS] output is its last
    hidden state at position 0, as fVLM takes it (no pooler). Every text has token type 0."""

    def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int, heads: int, mlp_dim: int,
                 type_vocab_size: int, layer_norm_eps: float, hidden_act: str, pad_id: int, rngs: nnx.Rngs,
                 dtype=jnp.float32, remat: bool = False, remat_policy: str = "nothing_saveable",
                 attention_impl: str = "auto"):
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"BERT hidden_act {hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        self.remat, self.remat_policy, self.pad_id = remat, remat_policy, pad_id
        init = nnx.initializers.normal(0.02)
        self.tok = nnx.Embed(vocab_size, width, rngs=rngs, dtype=dtype, embedding_init=init,
                             embedding_metadata=logical("vocab", "embed"))
        self.pos = nnx.Param(init(rngs.params(), (max_len, width)), **logical("length", "embed"))
        self.token_type = nnx.Param(init(rngs.params(), (type_vocab_size, width)), **logical(None, "embed"))
        self.emb_ln = bert_layer_norm(width, layer_norm_eps, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([BertLayer(width, heads, mlp_dim, eps=layer_norm_eps, act=hidden_act, rngs=rngs,
                                          dtype=dtype, attention_impl=attention_impl) for _ in range(depth)])

    def hidden_states(self, tokens):
        """tokens: [B, T] int ids. Returns the last hidden states [B, T, D]."""
        t = tokens.shape[-1]
        tokens = constrain(tokens, "batch", None)
        x = self.tok(tokens)
        x = x + (self.pos[:t] + self.token_type[0]).astype(x.dtype)
        x = self.emb_ln(x)
        mask = tokens != self.pad_id
        run = block_runner(self.remat, self.remat_policy)
        for layer in self.layers:
            x = run(layer, x, mask)
        return x

    def __call__(self, tokens):
        """tokens: [..., T] int ids. Returns the [CLS] output [..., D]."""
        lead, t = tokens.shape[:-1], tokens.shape[-1]
        return self.hidden_states(tokens.reshape(-1, t))[:, 0].reshape(*lead, -1)
