"""The device half of the training augmentation, and evaluation's label unpacking (jit-able, pure).

The host (`input_pipeline.tfdata.train_batches`) crops the image exactly and the bit-packed labels
(`input_pipeline.label_packing`) to whole bytes, and draws the flips; `finish_on_device` then unpacks the labels,
drops the `label_shift` leading voxels of each row and applies the flips to image and labels. Moving the flips and
the unpacking to the accelerator is what lets the host pipeline stay near one copy per volume
(bench/input_stream.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from input_pipeline.label_packing import factor_from_shapes, unpack_labels


def unpack_window(packed, width: int, shift):
    """Packed labels uint8 [B, Z, Y, W] -> uint8 [B, Z, Y, width]: voxels shift[b] .. shift[b] + width - 1 of
    each row of sample b (jit-able; evaluation's device half of `input_pipeline.tfdata.center_window`)."""
    k = factor_from_shapes(packed.shape[-1], width)
    full = unpack_labels(packed, k, packed.shape[-1] * k)
    return jax.vmap(lambda f, s: jax.lax.dynamic_slice_in_dim(f, s, width, axis=-1))(full, shift)


def finish_on_device(batch: dict, width: int) -> dict:
    """The device half of the training augmentation (jit-able, pure): unpack, align and flip.

    batch: image uint8 [B, Z, Y, X=width] (already cropped), labels_packed uint8 [B, Z, Y, W] (whole bytes
    covering the crop), label_shift int [B] (voxels before the crop in the first byte), flip bool [B, 3].
    Returns the batch with image and labels uint8 [B, Z, Y, X], flipped per sample, and the packed keys dropped.
    """
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
