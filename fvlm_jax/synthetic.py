"""Random in-memory batches with the training input's structure (tests and benchmarks; no TensorFlow)."""

from __future__ import annotations

import ml_collections
import numpy as np

from input_pipeline import label_packing


def random_batch(cfg: ml_collections.ConfigDict, batch_size: int, seed: int = 0, packed: bool = False) -> dict:
    """A batch shaped like input_pipeline.tfdata's: anatomies are random boxes inside the volume.

    packed=True gives the training pipeline's form (labels bit-packed, a label shift of 0 and random flips, which
    the train step finishes on the device); packed=False gives plain uint8 labels and no flips.
    """
    rng = np.random.default_rng(seed)
    z, y, x = cfg.model.input_zyx
    a = len(cfg.prep.anatomies)
    k = 4
    labels = np.zeros((batch_size, z, y, x), np.uint8)
    for b in range(batch_size):
        for i in range(a):
            lo = [rng.integers(1, s // 2) for s in (z, y, x)]
            hi = [lo_ + rng.integers(2, s // 2) for lo_, s in zip(lo, (z, y, x))]
            labels[b, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = i + 1
    normal = rng.random((batch_size, a)) < 0.6
    disease = (rng.random((batch_size, a, k)) < 0.4) & ~normal[..., None]
    t_len, r_len, vocab = cfg.prep.text_len, cfg.prep.report_len, cfg.model.text.vocab_size
    batch = {
        "image": rng.integers(0, 256, (batch_size, z, y, x), dtype=np.uint8),
        "labels": labels,
        "text_tokens": rng.integers(4, vocab, (batch_size, a, t_len), dtype=np.int32),
        "has_text": rng.random((batch_size, a)) < 0.95,
        "normal": normal,
        "disease": disease,
        "text_id": np.where(normal, 0, rng.integers(1, 1 << 30, (batch_size, a))).astype(np.int32),
        "report_tokens": rng.integers(4, vocab, (batch_size, r_len), dtype=np.int32),
    }
    if packed:  # drawn last: the other arrays are those of packed=False
        batch["labels_packed"] = label_packing.pack_labels(batch.pop("labels"), label_packing.packing_factor(a))
        batch["label_shift"] = np.zeros(batch_size, np.int32)
        batch["flip"] = rng.random((batch_size, 3)) < 0.2
    return batch
