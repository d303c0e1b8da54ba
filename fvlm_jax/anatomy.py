"""Which tokens each anatomy covers, and whether an anatomy is usable in a crop. Pure functions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


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


# ---- The public evaluation's per-anatomy crops (fVLM eval.py and blip_pretrain.py), on the host (NumPy) ----------


def anatomy_box(mask) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) voxel index zyx of a non-empty bool mask [Z, Y, X], both inclusive (eval.py's
    masks_to_boxes_3d)."""
    idx = np.argwhere(np.asarray(mask))
    if not len(idx):
        raise ValueError("anatomy_box: the mask is empty")
    return idx.min(0), idx.max(0)


def public_crop_window(mask, crop_zyx) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, stop) zyx of eval.py's `center_crop` (eval.py:92-118) around the anatomy `mask` [Z, Y, X].

    Per axis, with the anatomy's box first..last (inclusive): the window is max(crop, last - first) long (note: not
    last - first + 1, so an anatomy longer than the crop loses one voxel), centred at (first + last) // 2, shifted
    back inside the volume where it would stick out, and cut to the volume where it is longer than the volume."""
    first, last = anatomy_box(mask)
    start, stop = [], []
    for n, c, lo, hi in zip(np.shape(mask), crop_zyx, first, last):
        size = max(int(c), int(hi - lo))
        s = max(0, (int(lo) + int(hi)) // 2 - size // 2)
        e = min(n, s + size)
        if e - s < size:
            s = max(0, e - size)
        start.append(s)
        stop.append(e)
    return tuple(start), tuple(stop)


def pad_end_to_multiple(volume, multiple_zyx) -> np.ndarray:
    """Zero-pad [Z, Y, X] after the end of each axis to the next multiple of `multiple_zyx` (MONAI's DivisiblePad,
    method="end", as eval.py pads each crop to the patch size)."""
    v = np.asarray(volume)
    pads = [(0, -n % int(m)) for n, m in zip(v.shape, multiple_zyx)]
    return np.pad(v, pads) if any(p for _, p in pads) else v


def public_usable(window_labels, whole_counts, skip: int | None = None, margin: int = 2,
                  min_fraction: float = 0.9) -> np.ndarray:
    """Which anatomies a window may score, by blip_pretrain.py's `forward_test_win` (lines 413-457).

    Args:
      window_labels: [Z, Y, X] int anatomy index map of the (padded) window (0 background, a + 1 for anatomy a).
      whole_counts: [A] voxels of each anatomy in the whole scan.
      skip: the anatomy the window was cropped for (eval.py passes it): it is exempt from both rules below.
    Returns:
      [A] bool: present in the window, and (a == skip, or: no voxel within `margin` voxels of a face of the window,
      and at least `min_fraction` of its whole-scan voxels inside the window).
    """
    lab = np.asarray(window_labels)
    whole = np.asarray(whole_counts)
    ids = np.arange(1, len(whole) + 1)
    inside = (lab[..., None] == ids).reshape(-1, len(ids)).sum(0)
    band = np.ones(lab.shape, bool)
    band[tuple(slice(margin, n - margin) for n in lab.shape)] = False
    on_band = np.isin(ids, lab[band])
    fraction = inside / np.maximum(whole, 1)
    exempt = ids - 1 == skip
    return (inside > 0) & (exempt | (~on_band & (fraction >= min_fraction)))
