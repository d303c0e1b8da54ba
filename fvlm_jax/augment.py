"""Packed anatomy labels and the device half of the training augmentation. TensorFlow-free.

Records store the anatomy index map bit-packed along x: with A anatomies (values 0..A), each voxel takes the
smallest of 1, 2, 4 or 8 bits that holds A, so k = 8 // bits voxels share a byte. Voxel x of a row sits in byte
x // k at bit offset (x % k) * bits. A row of X voxels takes (X - 1) // k + 2 bytes: one byte more than needed, so
that the byte window of any crop fits inside the row. With the paper's 4 anatomies (k = 2) labels take half the
bytes of uint8.

The host (`input_pipeline.tfdata.train_batches`) crops the image exactly and the packed labels to whole bytes, and
draws the flips; `finish_on_device` then unpacks the labels, drops the `label_shift` leading voxels of each row
and applies the flips to image and labels. Moving the flips and the unpacking to the accelerator is what lets the
host pipeline stay near one copy per volume (bench/input_pipeline.py).
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


def unpack_window(packed, width: int, shift):
    """Packed labels uint8 [B, Z, Y, W] -> uint8 [B, Z, Y, width]: voxels shift[b] .. shift[b] + width - 1 of
    each row of sample b (jit-able; evaluation's device half of `input_pipeline.tfdata.center_window`)."""
    import jax

    k = factor_from_shapes(packed.shape[-1], width)
    full = unpack_labels(packed, k, packed.shape[-1] * k)
    return jax.vmap(lambda f, s: jax.lax.dynamic_slice_in_dim(f, s, width, axis=-1))(full, shift)


def finish_on_device(batch: dict, width: int) -> dict:
    """The device half of the training augmentation (jit-able, pure): unpack, align and flip.

    batch: image uint8 [B, Z, Y, X=width] (already cropped), labels_packed uint8 [B, Z, Y, W] (whole bytes
    covering the crop), label_shift int [B] (voxels before the crop in the first byte), flip bool [B, 3].
    Returns the batch with image and labels uint8 [B, Z, Y, X], flipped per sample, and the packed keys dropped.
    """
    import jax
    import jax.numpy as jnp

    packed = batch["labels_packed"]
    k = factor_from_shapes(packed.shape[-1], width)
    full = unpack_labels(packed, k, packed.shape[-1] * k)

    def one(image, labels, shift, flip):  # one sample: a single gather each (on CPU 6x faster than selects)
        zi, yi, xi = (jnp.where(f, n - 1 - jnp.arange(n), jnp.arange(n)) for f, n in zip(flip, image.shape))
        zi, yi, xi = zi[:, None, None], yi[None, :, None], xi[None, None, :]
        return image[zi, yi, xi], labels[zi, yi, xi + shift]

    # vmap gives gathers with a batching dimension, which GSPMD keeps split along the batch.
    image, labels = jax.vmap(one)(batch["image"], full, batch["label_shift"], batch["flip"])
    out = {k_: v for k_, v in batch.items() if k_ not in ("labels_packed", "label_shift", "flip")}
    out["image"], out["labels"] = image, labels
    return out
