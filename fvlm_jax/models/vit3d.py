"""3D Vision Transformer with multi-level token outputs (fVLM's image encoder)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvlm_jax.models.transformer import Block, block_runner, dense, layer_norm
from fvlm_jax.sharding import constrain, logical


def patchify_channels(x, stride_zyx):
    """[B, Z, Y, X, C] -> [B, Z/sz, Y/sy, X/sx, sz*sy*sx*C]: a non-overlapping strided conv's input as a matmul."""
    b, z, y, x_, c = x.shape
    sz, sy, sx = stride_zyx
    x = x.reshape(b, z // sz, sz, y // sy, sy, x_ // sx, sx, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, z // sz, y // sy, x_ // sx, sz * sy * sx * c)


def stem_strides(patch_zyx, num_stages: int) -> list[tuple[int, int, int]]:
    """Strides of the stem stages: halve every axis that allows it, the last stage takes what remains."""
    left, out = list(patch_zyx), []
    for _ in range(num_stages):
        s = tuple(2 if p % 2 == 0 and p > 1 else 1 for p in left)
        left = [p // q for p, q in zip(left, s)]
        out.append(s)
    return [*out, tuple(left)]


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation as PyTorch's `F.interpolate(..., size=n_out,
    align_corners=False)` computes it: output i samples the input at src = (i + 0.5) * n_in / n_out - 0.5, clamped
    below at 0; it takes (1 - f) of input floor(src) and f = src - floor(src) of the next one (the last input
    again at the far edge). No antialiasing when shrinking, as in PyTorch."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w


def resize_pos_embed(pos, grid_in, grid_out):
    """Position embeddings pos [gz * gy * gx, D] (raster order z, y, x) of the token grid `grid_in` resized to the
    grid `grid_out` -> [gz' * gy' * gx', D]: trilinear, align_corners=False, as fVLM's public patch embedding does
    at other input sizes (`F.interpolate(mode="trilinear", align_corners=False)`, patchembedding.py:145-152).
    Trilinear interpolation is the product of a linear one along each axis, so it is three small matrices
    (`linear_resize_matrix`, built on the host: the grids are static)."""
    if tuple(grid_in) == tuple(grid_out):
        return pos
    wz, wy, wx = (jnp.asarray(linear_resize_matrix(a, b), jnp.float32) for a, b in zip(grid_in, grid_out))
    grid = pos.reshape(*grid_in, pos.shape[-1]).astype(jnp.float32)
    out = jnp.einsum("az,by,cx,zyxd->abcd", wz, wy, wx, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(-1, pos.shape[-1]).astype(pos.dtype)


class ConvStem(nnx.Module):
    """Patch embedding as a few non-overlapping strided convolutions with GELU between them (kernel = stride).

    Same token grid as the single linear patch embedding, but non-linear inside the patch, so small high-contrast
    findings (calcifications, nodules) are not averaged away before the transformer sees them.
    """

    def __init__(self, patch_zyx, channels, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.strides = stem_strides(patch_zyx, len(channels))
        dims = [1, *channels, width]
        self.layers = nnx.List([
            dense(dims[i] * s[0] * s[1] * s[2], dims[i + 1], ("patch", "embed" if i + 1 == len(dims) - 1 else None),
                  rngs=rngs, dtype=dtype)
            for i, s in enumerate(self.strides)])

    def __call__(self, volume):
        """volume [B, Z, Y, X] -> tokens [B, N, width]."""
        x = volume[..., None]
        for i, (layer, s) in enumerate(zip(self.layers, self.strides)):
            x = layer(patchify_channels(x, s))
            if i + 1 < len(self.layers):
                x = jax.nn.gelu(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class ViT3D(nnx.Module):
    """Single-channel 3D ViT without CLS token.

    Tokens are in raster order (z, y, x) of the patch grid, as `patchify` and `anatomy.token_membership`.
    Returns the token outputs of the blocks listed in `feature_blocks` (1-based) plus the final LayerNorm output,
    stacked as [L, B, N, D]: fVLM pools anatomies over all these levels together. A volume of another size than
    `input_zyx` (each side a multiple of the patch) gets the position embeddings resized to its token grid
    (`resize_pos_embed`; the public evaluation's per-anatomy crops).
    """

    def __init__(self, *, input_zyx: Sequence[int], patch_zyx: Sequence[int], width: int, depth: int, heads: int,
                 mlp_dim: int, feature_blocks: Sequence[int], rngs: nnx.Rngs, stem_channels: Sequence[int] = (),
                 dtype=jnp.float32, remat: bool = False,
                 remat_policy: str = "nothing_saveable", attention_impl: str = "auto"):
        if any(not 1 <= i <= depth for i in feature_blocks):
            raise ValueError(f"feature_blocks {tuple(feature_blocks)} must lie in [1, depth={depth}]")
        self.patch_zyx = tuple(patch_zyx)
        self.grid_zyx = tuple(i // p for i, p in zip(input_zyx, patch_zyx))
        n = self.grid_zyx[0] * self.grid_zyx[1] * self.grid_zyx[2]
        # stem_channels=() is the paper's single linear 3D patch embedding.
        self.stem = ConvStem(patch_zyx, tuple(stem_channels), width, rngs=rngs, dtype=dtype)
        self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (n, width)), **logical("length", "embed"))
        self.blocks = nnx.List([Block(width, heads, mlp_dim, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
                                for _ in range(depth)])
        self.final_ln = layer_norm(width, rngs=rngs, dtype=dtype)
        self.feature_blocks = tuple(feature_blocks)
        self.remat, self.remat_policy = remat, remat_policy

    def __call__(self, volume):
        """volume: [B, Z, Y, X] float in [0, 1]. Returns [L, B, N, D] multi-level token features."""
        if any(n % p for n, p in zip(volume.shape[1:], self.patch_zyx)):
            raise ValueError(f"volume {volume.shape[1:]} is not a multiple of the patch {self.patch_zyx}")
        grid = tuple(n // p for n, p in zip(volume.shape[1:], self.patch_zyx))
        x = self.stem(constrain(volume, "batch", None, None, None))
        x = x + resize_pos_embed(self.pos[...], self.grid_zyx, grid).astype(x.dtype)
        run = block_runner(self.remat, self.remat_policy)
        levels = []
        for i, block in enumerate(self.blocks, start=1):
            x = run(block, x)
            if i in self.feature_blocks:
                levels.append(x)
        levels.append(self.final_ln(x))
        return jnp.stack(levels)
