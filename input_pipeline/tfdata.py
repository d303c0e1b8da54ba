"""tf.data input: prepared records -> fixed-size numpy batches (random crop + flips for training).

Volumes stay uint8 all the way to the device, where the model maps them to [0, 1].
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from input_pipeline import preprocess, records

_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep glibc from mmap-ing (and page-faulting in) a fresh buffer for every decoded volume.

    glibc serves allocations above its mmap threshold with new mappings, so each ~10 MB volume buffer costs page
    faults on first touch and munmap on release. Raising the threshold to glibc's maximum (32 MiB) and the trim
    threshold lets freed buffers be reused from the heap (bench/input_pipeline.py: 28.3 -> 32.7 volumes per
    CPU-second in the same run). Host memory stays bounded by the pipeline's buffers; it is just not handed back to
    the OS between batches. No-op off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("FVLM_TUNE_MALLOC", "1") == "0":  # FVLM_TUNE_MALLOC=0 switches it off
        return _MALLOC_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = (libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1) & (libc.mallopt(m_trim_threshold, 512 * 2**20) == 1)
        ok &= libc.mallopt(m_top_pad, 64 * 2**20) == 1
    except (OSError, AttributeError):
        ok = False
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


TRAIN_KEYS = ("image", "labels", "text_tokens", "has_text", "normal", "disease", "text_id", "report_tokens")


def _pad_to(x, size_zyx):
    shape = tf.shape(x)
    pad = [tf.maximum(s - shape[i], 0) for i, s in enumerate(size_zyx)]
    return tf.pad(x, [[p // 2, p - p // 2] for p in pad])


def random_crop_flip(image, labels, size_zyx, flip_prob: float, seed):
    """Same random crop of `size_zyx` (after zero-padding smaller volumes) and flips for image and labels.

    Image and labels are sliced and reversed separately with one shared offset: no stacking into an interleaved
    [..., 2] array, whose copies and strided reads cost more than the crop itself (2.6x slower end to end).
    """
    image, labels = _pad_to(image, size_zyx), _pad_to(labels, size_zyx)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    size = tf.constant(size_zyx, tf.int32)
    room = tf.shape(image, out_type=tf.int32) - size + 1
    offset = tf.random.stateless_uniform([3], seed=seeds[0], minval=0, maxval=2**30, dtype=tf.int32) % room
    image, labels = tf.slice(image, offset, size), tf.slice(labels, offset, size)
    for axis in range(3):
        flip = tf.random.stateless_uniform([], seed=seeds[axis + 1]) < flip_prob
        image, labels = tf.cond(flip, lambda i=image, lb=labels, a=axis: (tf.reverse(i, [a]), tf.reverse(lb, [a])),
                                lambda i=image, lb=labels: (i, lb))
    return tf.ensure_shape(image, size_zyx), tf.ensure_shape(labels, size_zyx)


def center_crop(x, size_zyx):
    """preprocess.fit_to_size inside the graph: the exact crop the exported model applies to new scans."""
    out = tf.numpy_function(lambda v: preprocess.fit_to_size(v, size_zyx), [x], x.dtype, stateful=False)
    return tf.ensure_shape(out, size_zyx)


def _epoch_perm(n_files: int, seed, epoch):
    """The seeded random order of the files in one epoch (a TF op, so the stream computes it in-graph)."""
    return tf.random.experimental.stateless_shuffle(tf.range(n_files, dtype=tf.int64),
                                                    seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]))


def epoch_blocks(n_files: int, block_files: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The files of one epoch in their seeded random order, cut into blocks of `block_files` files (the same
    permutation the training stream computes in-graph)."""
    perm = _epoch_perm(n_files, seed, epoch).numpy()
    return [perm[i:i + block_files] for i in range(0, n_files, block_files)]


def resume_point(lengths, block_files: int, seed: int, consumed: int) -> tuple[int, int, int]:
    """(epoch, block, offset in the block) of example number `consumed` of the stream, from the record counts per
    file alone: resuming reads nothing before the block it lands in, however late the step."""
    epoch, rest = divmod(consumed, sum(lengths))
    for b, files in enumerate(epoch_blocks(len(lengths), block_files, seed, epoch)):
        n = int(sum(lengths[i] for i in files))
        if rest < n:
            return epoch, b, rest
        rest -= n
    raise AssertionError("unreachable: the blocks of an epoch hold all its examples")


def train_batches(records_dir: str, split: str, *, batch_size: int, size_zyx, flip_prob: float, seed: int,
                  start_step: int = 0, shuffle_buffer: int = 512, block_files: int = 8, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
    """Endless deterministic stream of process-local training batches, starting at global step `start_step`.

    Each epoch visits this process's record files in a seeded random order, in blocks of `block_files` files: a
    block's files are interleaved record by record and shuffled through a buffer of `shuffle_buffer` records
    (seeded per block). Order and augmentation depend only on (seed, example counter), so a run resumed at any
    step sees exactly the batches of an uninterrupted run, and it reads at most one block to get there (the block
    is found from the record counts in the metadata; earlier blocks and epochs are not read).
    """
    tune_malloc()
    info = records.load_builder(records_dir).info
    spec = info.features
    files = records.split_files(records_dir, split)[process_index::process_count]
    lengths = list(info.splits[split].shard_lengths[process_index::process_count])
    if not sum(lengths):
        # An endless stream over no records would spin forever instead of failing.
        raise ValueError(f"process {process_index} of {process_count} gets no record of split {split!r}: prepare "
                         "with data.num_shards a multiple of the process count and at most the number of scans")
    consumed = start_step * batch_size
    epoch0, block0, offset = resume_point(lengths, block_files, seed, consumed)

    names = tf.constant(files)
    n_blocks = -(-len(files) // block_files)

    def block(g):  # the records of global block g = epoch * n_blocks + b, interleaved and shuffled
        epoch, b = g // n_blocks, g % n_blocks
        idx = _epoch_perm(len(files), seed, epoch)[b * block_files:(b + 1) * block_files]
        block_seed = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(seed, tf.int64) * 1_000_003 + epoch,
                                                                    b]), minval=None, maxval=None, dtype=tf.int64)
        ds = tf.data.Dataset.from_tensor_slices(tf.gather(names, idx)).interleave(
            tf.data.TFRecordDataset, cycle_length=block_files, block_length=1)
        return ds.shuffle(shuffle_buffer, seed=block_seed, reshuffle_each_iteration=False)

    # In-graph block plan (a Python generator here costs a third of the pipeline's throughput).
    ds = tf.data.Dataset.range(epoch0 * n_blocks + block0, np.iinfo(np.int64).max).flat_map(block)
    ds = ds.skip(offset).enumerate(start=consumed)
    size_zyx = [int(s) for s in size_zyx]

    def decode(i, serialized):
        ex = spec.deserialize_example(serialized)
        image, labels = random_crop_flip(ex["image"], ex["labels"], size_zyx, flip_prob,
                                         tf.stack([tf.constant(seed, tf.int64), i]))
        ex = {k: ex[k] for k in TRAIN_KEYS}
        ex["image"], ex["labels"] = image, labels
        return ex

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
    return ds.as_numpy_iterator()


def eval_batches(records_dir: str, split: str, *, batch_size: int, size_zyx) -> Iterator[dict]:
    """One pass over `split`, centre-cropped to `size_zyx`; the last batch is padded, with `mask` marking real rows.

    Yields numpy dicts with image, labels, targets [B, C], id and mask.
    """
    spec = records.load_builder(records_dir).info.features
    size_zyx = [int(s) for s in size_zyx]

    def decode(serialized):
        ex = spec.deserialize_example(serialized)
        return {"image": center_crop(ex["image"], size_zyx), "labels": center_crop(ex["labels"], size_zyx),
                "targets": ex["targets"], "id": ex["id"]}

    ds = tf.data.TFRecordDataset(records.split_files(records_dir, split)).map(decode, num_parallel_calls=4)
    for batch in ds.batch(batch_size).as_numpy_iterator():
        n = len(batch["id"])
        batch["mask"] = np.arange(batch_size) < n
        if n < batch_size:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, 0)]) if k != "mask" else v
                     for k, v in batch.items()}
        yield batch
