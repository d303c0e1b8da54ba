"""Bit-packed anatomy labels (NumPy; the operators also work on jax arrays). No TensorFlow, no JAX import.

Records store the anatomy index map bit-packed along x: with A anatomies (values 0..A), each voxel takes the
smallest of 1, 2, 4 or 8 bits that holds A, so k = 8 // bits voxels share a byte. Voxel x of a row sits in byte
x // k at bit offset (x % k) * bits. A row of X voxels takes (X - 1) // k + 2 bytes: one byte more than needed, so
that the byte window of any crop fits inside the row. With the paper's 4 anatomies (k = 2) labels take half the
bytes of uint8.

Both sides use it: preparation packs (`input_pipeline.prepare`), the tf.data stream crops whole bytes
(`input_pipeline.tfdata`), and the train step unpacks on the device (`fvlm_jax.augment`).
"""

from __future__ import annotations

import numpy as np

PACKING_FACTORS = (8, 4, 2, 1)  # voxels per byte, for 1, 2, 4, 8 bits per voxel


def packing_factor(num_anatomies: int) -> int:
    """Voxels per byte for label values 0..num_anatomies: 8 // the smallest of 1, 2, 4, 8 bits that holds them."""
    if not 0 <= num_anatomies <= 255:
        raise ValueError(f"{num_anatomies} anatomies do not fit uint8 labels (at most 255)")
    return next(k for k in PACKING_FACTORS if num_anatomies < 2 ** (8 // k))


def packed_width(width: int, k: int) -> int:
    """Bytes per packed row of `width` voxels (one spare byte, see the module docstring)."""
    return (width - 1) // k + 2


def pack_labels(labels: np.ndarray, k: int) -> np.ndarray:
    """uint8 [..., X] -> packed uint8 [..., (X - 1) // k + 2]."""
    labels = np.asarray(labels)
    bits = 8 // k
    if labels.size and int(labels.max()) >= 2 ** bits:
        raise ValueError(f"label value {int(labels.max())} does not fit {bits} bits")
    x = labels.shape[-1]
    padded = np.zeros((*labels.shape[:-1], packed_width(x, k) * k), np.uint8)
    padded[..., :x] = labels
    parts = padded.reshape(*labels.shape[:-1], -1, k).astype(np.uint16) << (bits * np.arange(k, dtype=np.uint16))
    return parts.sum(-1).astype(np.uint8)


def unpack_labels(packed, k: int, width: int, shift: int = 0):
    """Packed uint8 [..., W] -> uint8 [..., width]: voxels shift .. shift + width - 1 of each packed row.

    Operators only, so it takes NumPy arrays (records read on the host) and jax arrays (inside the train step).
    """
    bits = 8 // k
    full = (packed[..., None] >> (bits * np.arange(k, dtype=np.uint8))) & np.uint8(2 ** bits - 1)
    return full.reshape(*packed.shape[:-1], -1)[..., shift:shift + width]


def factor_from_shapes(packed_w: int, width: int) -> int:
    """The packing factor k of a crop: the k whose byte window for `width` voxels is `packed_w` bytes."""
    for k in PACKING_FACTORS:
        if packed_width(width, k) == packed_w:
            return k
    raise ValueError(f"{packed_w} packed bytes fit no packing of {width} voxels")
