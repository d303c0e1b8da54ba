"""3D Vision Transformer with multi-level token outputs (fVLM's image encoder)."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from fvlm_jax.models.transformer import Block


def patchify(volume, patch_zyx):
    """[B, Z, Y, X] -> [B, gz*gy*gx, pz*py*px] non-overlapping patches, raster order (z, y, x)."""
    b, z, y, x = volume.shape
    pz, py, px = patch_zyx
    if z % pz or y % py or x % px:
        raise ValueError(f"volume {volume.shape[1:]} is not divisible by the patch {tuple(patch_zyx)}")
    v = volume.reshape(b, z // pz, pz, y // py, py, x // px, px)
    v = v.transpose(0, 1, 3, 5, 2, 4, 6)
    return v.reshape(b, (z // pz) * (y // py) * (x // px), pz * py * px)


class ViT3D(nnx.Module):
    """Single-channel 3D ViT without CLS token.

    Returns the token outputs of the blocks listed in `feature_blocks` (1-based) plus the final LayerNorm output,
    stacked as [L, B, N, D]: fVLM pools anatomies over all these levels together.
    """

    def __init__(self, *, input_zyx: Sequence[int], patch_zyx: Sequence[int], width: int, depth: int, heads: int,
                 mlp_dim: int, feature_blocks: Sequence[int], rngs: nnx.Rngs, dtype=jnp.float32):
        if any(not 1 <= i <= depth for i in feature_blocks):
            raise ValueError(f"feature_blocks {tuple(feature_blocks)} must lie in [1, depth={depth}]")
        self.patch_zyx = tuple(patch_zyx)
        self.grid_zyx = tuple(i // p for i, p in zip(input_zyx, patch_zyx))
        n = self.grid_zyx[0] * self.grid_zyx[1] * self.grid_zyx[2]
        self.embed = nnx.Linear(int(jnp.prod(jnp.array(patch_zyx))), width, rngs=rngs, dtype=dtype)
        self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (n, width)))
        self.blocks = nnx.List([Block(width, heads, mlp_dim, rngs=rngs, dtype=dtype) for _ in range(depth)])
        self.final_ln = nnx.LayerNorm(width, rngs=rngs, dtype=dtype)
        self.feature_blocks = tuple(feature_blocks)

    def __call__(self, volume):
        """volume: [B, Z, Y, X] float in [0, 1]. Returns [L, B, N, D] multi-level token features."""
        x = self.embed(patchify(volume, self.patch_zyx)) + self.pos[...]
        levels = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in self.feature_blocks:
                levels.append(x)
        levels.append(self.final_ln(x))
        return jnp.stack(levels)
