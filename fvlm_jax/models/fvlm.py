"""fVLM: anatomy-level image embeddings from a 3D ViT, text embeddings from a BERT-style encoder.

The same class is the whole-volume CLIP baseline when built with `global_pool=True`: one pooled embedding over all
tokens, same encoders, same pooling layer, same projection size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fvlm_jax import anatomy, text_lengths
from fvlm_jax.models.text import text_encoder, truncate_tokens
from fvlm_jax.models.transformer import configure_blocks, dense, layer_norm
from fvlm_jax.models.vit3d import ViT3D
from fvlm_jax.sharding import constrain, logical

# "fvlm": one embedding per anatomy; "clip": the whole-volume baseline (global_pool=True).
METHODS = ("fvlm", "clip")


def l2_normalize(x, eps=1e-6):
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class AnatomyPool(nnx.Module):
    """One learned query per anatomy attends over that anatomy's tokens from all levels (shared attention layer).

    Queries start at zero and the query projection has zero bias, so pooling starts as a mean over the tokens.
    """

    def __init__(self, num_queries: int, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.heads = heads
        self.queries = nnx.Param(jnp.zeros((num_queries, width)), **logical("anatomy", "embed"))
        self.ln = layer_norm(width, rngs=rngs, dtype=dtype)
        self.q = dense(width, width, ("embed", "heads"), rngs=rngs, dtype=dtype)
        # kv columns are head-major ([head][k|v][channel]) like the blocks' qkv.
        self.kv = dense(width, 2 * width, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.out = dense(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype)
        # On the attention weights, as torch's nn.MultiheadAttention(dropout=...) of the public code.
        self.drop = nnx.Dropout(0.0, deterministic=True)

    def __call__(self, levels, member):
        """levels: [L, B, N, D] tokens; member: [B, A, N] bool. Returns [B, A, D].

        An anatomy with no token attends over all tokens (its sample is masked out of the loss anyway).
        """
        nl, b, n, d = levels.shape
        h = self.heads
        tokens = self.ln(jnp.moveaxis(levels, 0, 1).reshape(b, nl * n, d))
        kv = constrain(self.kv(tokens).reshape(b, nl * n, h, 2, d // h), "batch", "length", "heads", None, None)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]
        q = self.q(self.queries[...]).reshape(-1, h, d // h)
        mask = jnp.tile(member, (1, 1, nl))  # [B, A, L*N], level-major like tokens
        mask = mask | ~mask.any(-1, keepdims=True)
        logits = jnp.einsum("ahc,bnhc->bahn", q, k) / jnp.sqrt(d // h).astype(q.dtype)
        logits = jnp.where(mask[:, :, None, :], logits, -1e9)
        att = self.drop(jax.nn.softmax(logits.astype(jnp.float32), axis=-1)).astype(v.dtype)
        pooled = jnp.einsum("bahn,bnhc->bahc", att, v).reshape(b, -1, d)
        return self.out(pooled)


def clamp_temperature(params: dict, temperature_cfg) -> dict:
    """The plain parameter dict with its temperature put back into [min, max] (model.temperature.mode "clamp",
    after each update: the public code's `temp.clamp_(0.001, 0.5)`)."""
    return {**params, "temperature": jnp.clip(params["temperature"], temperature_cfg.min, temperature_cfg.max)}


class FVLM(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, num_anatomies: int, *, global_pool: bool = False,
                 rngs: nnx.Rngs):
        v, t = cfg.vision, cfg.text
        # Parameters stay float32; `dtype` is the compute dtype (bfloat16 on accelerators). Embeddings, similarities
        # and the loss are float32.
        dtype = jnp.dtype(cfg.dtype)
        remat = dict(remat=bool(cfg.remat), remat_policy=cfg.remat_policy,
                     attention_impl=cfg.attention)
        self.global_pool = global_pool
        self.num_anatomies = num_anatomies
        self.patch_zyx = tuple(v.patch_zyx)
        self.vision = ViT3D(input_zyx=cfg.input_zyx, patch_zyx=v.patch_zyx, width=v.width, depth=v.depth,
                            heads=v.heads, mlp_dim=v.mlp_dim, feature_blocks=v.feature_blocks,
                            stem_channels=v.stem_channels, rngs=rngs, dtype=dtype, **remat)
        nq = 1 if global_pool else num_anatomies
        self.pool = AnatomyPool(nq, v.width, cfg.pool_heads, rngs=rngs, dtype=dtype)
        self.img_proj = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (nq, v.width, cfg.embed_dim)),
                                  **logical("anatomy", "embed", "proj"))
        self.text = text_encoder(t, rngs=rngs, dtype=dtype, **remat)
        self.txt_proj = dense(t.width, cfg.embed_dim, ("embed", "proj"), rngs=rngs)
        self.temperature = nnx.Param(jnp.asarray(cfg.temperature.init, jnp.float32), **logical())
        self.temp_range = (cfg.temperature.min, cfg.temperature.max)
        self.temp_mode = cfg.temperature.mode
        # Static switches of the blocks and dropout layers (model.gelu, model.dropout): the GELU form everywhere,
        # dropout in the image encoder and the pooling only.
        configure_blocks(self, gelu=cfg.gelu)
        configure_blocks(self.vision, dropout=cfg.dropout)
        configure_blocks(self.pool, dropout=cfg.dropout)

    def temp(self):
        """The temperature of the logits. mode "clip": the parameter clipped to its range here (zero gradient past a
        bound); "clamp": the parameter itself, kept in range by the train step (`clamp_temperature`)."""
        if self.temp_mode == "clamp":
            return self.temperature[...]
        return jnp.clip(self.temperature[...], *self.temp_range)

    def encode_image(self, image, labels):
        """image: [B, Z, Y, X] float in [0, 1]; labels: [B, Z, Y, X] anatomy index map.

        Returns (emb [B, A, E] L2-normalised; A = 1 for the global-pool baseline, present [B, A], intact [B, A]).
        """
        # Named scopes label the ops in profiles (bench/trace_summary.py --hlo sums the step's time per scope).
        with jax.named_scope("vision"):
            levels = self.vision(image)
        with jax.named_scope("anatomy_pool"):
            present, intact = anatomy.presence_and_intact(labels, self.num_anatomies)
            if self.global_pool:
                member = jnp.ones((image.shape[0], 1, levels.shape[2]), bool)
            else:
                member = anatomy.token_membership(labels, self.num_anatomies, self.patch_zyx)
            pooled = self.pool(levels, member)
            emb = jnp.einsum("bad,ade->bae", pooled.astype(jnp.float32), self.img_proj[...])
            return l2_normalize(emb), present, intact

    def encode_text(self, tokens):
        """tokens: [..., T] ids with [CLS] first. Returns [..., E] L2-normalised."""
        with jax.named_scope("text"):
            return l2_normalize(self.txt_proj(self.text(tokens).astype(jnp.float32)))

    def encode_anatomy_texts(self, tokens, lengths=None):
        """tokens: [B, A, T], one text per anatomy. lengths: None (all at T) or one length per anatomy
        (`text_lengths.parse`): each anatomy's tokens are cut to its length (`truncate_tokens`) and the anatomies
        of one length go through the text encoder together, one call per distinct length. Returns [B, A, E]."""
        if lengths is None:
            return self.encode_text(tokens)
        if len(lengths) != tokens.shape[1]:
            raise ValueError(f"{len(lengths)} text lengths for {tokens.shape[1]} anatomies")
        emb = [None] * tokens.shape[1]
        for length, idx in text_lengths.groups(lengths):
            part = jnp.stack([tokens[:, a] for a in idx], axis=1)  # static slices, no gather
            out = self.encode_text(truncate_tokens(part, length))
            for j, a in enumerate(idx):
                emb[a] = out[:, j]
        return jnp.stack(emb, axis=1)
