"""Which tokens each anatomy covers, and whether an anatomy is usable in a crop. Pure functions."""

from __future__ import annotations

import jax.numpy as jnp


def token_membership(labels, num_anatomies: int, patch_zyx):
    """Anatomy mask max-pooled with kernel = stride = patch.

    Args:
      labels: [B, Z, Y, X] int anatomy index map (0 background, a + 1 for anatomy a).
    Returns:
      [B, A, N] bool: token n (raster order z, y, x) contains a voxel of anatomy a.
    """
    b, z, y, x = labels.shape
    pz, py, px = patch_zyx
    ids = jnp.arange(1, num_anatomies + 1, dtype=labels.dtype)
    lab = labels.reshape(b, z // pz, pz, y // py, py, x // px, px)
    # Reduce one patch axis at a time so the [.., A] one-hot never exists at full resolution for all axes.
    hit = (lab[..., None] == ids).any(axis=6).any(axis=4).any(axis=2)  # [B, gz, gy, gx, A]
    return jnp.moveaxis(hit.reshape(b, -1, num_anatomies), -1, 1)


def presence_and_intact(labels, num_anatomies: int):
    """present [B, A]: the anatomy has a voxel; intact [B, A]: present and touching none of the six faces."""
    ids = jnp.arange(1, num_anatomies + 1, dtype=labels.dtype)

    def has(region):  # region [B, ...] -> [B, A]
        return (region.reshape(region.shape[0], -1)[..., None] == ids).any(axis=1)

    present = has(labels)
    faces = [labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1], labels[:, :, :, 0], labels[:, :, :, -1]]
    on_face = jnp.zeros_like(present)
    for f in faces:
        on_face = on_face | has(f)
    return present, present & ~on_face
