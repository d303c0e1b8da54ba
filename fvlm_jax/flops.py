"""Analytic model FLOPs of a training step (for MFU), counted from the config, not from XLA.

FLOPs = 2 x multiply-adds. Per transformer layer and token: 4 D^2 (qkv and output projections) + 2 D M (MLP)
weight multiply-adds, plus 2 N D for attention over N tokens. A training step costs 3x the forward pass.
"""

from __future__ import annotations

import math

import ml_collections

from fvlm_jax import text_lengths


def transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> dict:
    """Forward FLOPs of one sequence: {"weights": ..., "attention": ...}."""
    weights = 2 * depth * tokens * (4 * width * width + 2 * width * mlp_dim)
    attention = 2 * depth * tokens * 2 * tokens * width
    return {"weights": weights, "attention": attention}


def stem_flops(input_zyx, patch_zyx, channels, width: int) -> int:
    """Forward FLOPs of the patch embedding (linear, or the strided conv stem) for one volume."""
    from fvlm_jax.models.vit3d import stem_strides

    voxels = math.prod(input_zyx)
    dims = [1, *channels, width]
    total = 0
    for i, s in enumerate(stem_strides(patch_zyx, len(channels))):
        voxels //= math.prod(s)  # outputs of this stage
        total += 2 * voxels * math.prod(s) * dims[i] * dims[i + 1]
    return total


def train_step_flops(cfg: ml_collections.ConfigDict, batch_size: int, method: str = "fvlm",
                     text_tokens: int | None = None) -> dict:
    """Model FLOPs of one training step (forward + backward = 3 x forward) of the global batch.

    text_tokens: tokens per text actually encoded (default: for fVLM each anatomy's model.text.anatomy_len when
    explicit, else prep.text_len; prep.report_len for CLIP). Returns the parts and "total".
    """
    m, v, t = cfg.model, cfg.model.vision, cfg.model.text
    n_img = math.prod(i // p for i, p in zip(m.input_zyx, v.patch_zyx))
    vis = transformer_flops(n_img, v.width, v.depth, v.mlp_dim)
    stem = stem_flops(m.input_zyx, v.patch_zyx, tuple(v.stem_channels), v.width)
    n_anat = len(cfg.prep.anatomies)
    if method == "clip":
        lengths = [text_tokens or cfg.prep.report_len]
    else:
        spec = str(t.anatomy_len or "")
        per_anatomy = None if text_tokens or text_lengths.is_percentile(spec) else text_lengths.parse(
            spec, cfg.prep.anatomies, cfg.prep.text_len)
        lengths = per_anatomy or [text_tokens or cfg.prep.text_len] * n_anat
    txt = [transformer_flops(n, t.width, t.depth, t.mlp_dim) for n in lengths]
    levels = len(v.feature_blocks) + 1
    queries = 1 if method == "clip" else n_anat
    pool = 2 * (levels * n_img * 2 * v.width * v.width + queries * levels * n_img * 2 * v.width)
    fwd = {"vision": vis["weights"] + vis["attention"] + stem, "vision_attention": vis["attention"],
           "patch_embedding": stem, "text": sum(x["weights"] + x["attention"] for x in txt), "pooling": pool}
    per_volume = fwd["vision"] + fwd["text"] + fwd["pooling"]
    return {**{k: 3 * batch_size * x for k, x in fwd.items()}, "forward_per_volume": per_volume,
            "total": 3 * batch_size * per_volume}
