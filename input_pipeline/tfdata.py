"""tf.data input: prepared records -> fixed-size numpy batches (random crop + flips for training).

Volumes stay uint8 all the way to the device, where the model maps them to [0, 1]. Training batches carry the
anatomy labels still bit-packed, plus the flips to apply: the train step finishes the augmentation on the device
(`fvlm_jax.augment.finish_on_device`). Evaluation batches are centre-cropped, their labels packed too
(`fvlm_jax.augment.unpack_window` unpacks them on the device).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import struct
from collections.abc import Iterator

import numpy as np

from input_pipeline import label_packing, records
from input_pipeline.tf_modules import tf

log = logging.getLogger(__name__)

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


TRAIN_KEYS = ("image", "labels_packed", "label_shift", "flip", "text_tokens", "has_text", "normal", "disease",
              "text_id", "report_tokens")


def random_crop(image, labels_packed, size_zyx, k: int, flip_prob: float, seed):
    """The host half of the training augmentation: one random crop of `size_zyx` and the flips to apply.

    Crops the image exactly and the packed labels (`input_pipeline.label_packing`: k voxels per byte along x) to the
    whole bytes that cover the same window; volumes smaller than the crop are zero-padded first (along x by a multiple
    of k before, so packed bytes stay aligned). Returns (image [Z, Y, X], labels_packed [Z, Y, W], label_shift,
    flip [3] bool); `fvlm_jax.augment.finish_on_device` unpacks, aligns and flips on the accelerator, where a
    flip is nearly free (on the host each one is another pass over the volume).
    """
    size = [int(s) for s in size_zyx]
    shape = tf.shape(image, out_type=tf.int32)
    pad = [tf.maximum(s - shape[i], 0) for i, s in enumerate(size)]
    before = [pad[0] // 2, pad[1] // 2, pad[2] // 2 // k * k]
    image = tf.pad(image, [[b, p - b] for b, p in zip(before, pad)])
    # Packed rows: before[2] // k zero bytes in front; behind, enough for the padded row's packed width.
    need = (shape[2] + pad[2] - 1) // k + 2
    behind = tf.maximum(need - tf.shape(labels_packed, out_type=tf.int32)[2] - before[2] // k, 0)
    labels_packed = tf.pad(labels_packed, [[before[0], pad[0] - before[0]], [before[1], pad[1] - before[1]],
                                           [before[2] // k, behind]])
    seeds = tf.random.experimental.stateless_split(seed, 4)
    room = tf.shape(image, out_type=tf.int32) - size + 1
    offset = tf.random.stateless_uniform([3], seed=seeds[0], minval=0, maxval=2**30, dtype=tf.int32) % room
    image = tf.slice(image, offset, size)
    width = (size[2] - 1) // k + 2
    labels_packed = tf.slice(labels_packed, tf.stack([offset[0], offset[1], offset[2] // k]), [size[0], size[1], width])
    flip = tf.stack([tf.random.stateless_uniform([], seed=seeds[a + 1]) < flip_prob for a in range(3)])
    return (tf.ensure_shape(image, size), tf.ensure_shape(labels_packed, [size[0], size[1], width]),
            offset[2] % k, flip)


def center_window(image, labels_packed, k: int, size_zyx):
    """The evaluation crop, host half: `preprocess.fit_to_size` of the image (zero-pad to at least `size_zyx`,
    the extra voxel after, then the central block; the crop export applies to new scans) and the packed labels'
    whole bytes covering the same window, in TF ops (no Python op in the stream).

    Returns (image [Z, Y, X], labels_packed [Z, Y, W], label_shift): `fvlm_jax.augment.unpack_window` on the
    device gives labels equal to `fit_to_size` of the unpacked labels.
    """
    zyx = [int(s) for s in size_zyx]
    size = tf.constant(zyx, tf.int32)
    shape = tf.shape(image, out_type=tf.int32)
    pad = tf.maximum(size - shape, 0)
    before = pad // 2
    start = tf.where(pad > 0, -before, (shape - size) // 2)  # the window's first voxel, in the volume's coordinates
    src, n = tf.maximum(start, 0), tf.minimum(shape, size)
    image = tf.pad(tf.slice(image, src, n), tf.stack([before, pad - before], axis=1))
    # Labels: rows cut and padded like the image's; along x, whole zero bytes in front, then the bytes of the window.
    lead = (tf.maximum(-start[2], 0) + k - 1) // k
    x0 = start[2] + lead * k  # the window's first voxel in the padded packed row (>= 0)
    width = label_packing.packed_width(zyx[2], k)
    labels_packed = labels_packed[src[0]:src[0] + n[0], src[1]:src[1] + n[1]]
    behind = tf.maximum(x0 // k + width - lead - tf.shape(labels_packed, out_type=tf.int32)[2], 0)
    labels_packed = tf.pad(labels_packed, [[before[0], pad[0] - before[0]], [before[1], pad[1] - before[1]],
                                           [lead, behind]])
    labels_packed = labels_packed[:, :, x0 // k:x0 // k + width]
    return tf.ensure_shape(image, zyx), tf.ensure_shape(labels_packed, [zyx[0], zyx[1], width]), x0 % k


def records_packing_factor(spec) -> int:
    """The packing factor of prepared records (from their anatomy count); a clear error for unpacked old ones."""
    if "labels_packed" not in spec.keys():
        raise ValueError("these records store unpacked labels (prepared by fvlm-jax < 0.2): run --mode=prepare again")
    return label_packing.packing_factor(spec["text_tokens"].shape[0])


def _epoch_perm(n_files: int, seed, epoch):
    """The seeded random order of the files in one epoch (a TF op, so the stream computes it in-graph)."""
    return tf.random.experimental.stateless_shuffle(tf.range(n_files, dtype=tf.int64),
                                                    seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]))


def epoch_blocks(n_files: int, block_files: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The files of one epoch in their seeded random order, cut into blocks of `block_files` files (the same
    permutation the training stream computes in-graph)."""
    perm = _epoch_perm(n_files, seed, epoch).numpy()
    return [perm[i:i + block_files] for i in range(0, n_files, block_files)]


M31 = 2**31 - 1


def reconstruction_choice(group, seed: int, epoch, count):
    """Which reconstruction (0 .. count - 1) of scan `group` epoch `epoch` trains on: a seeded integer hash.

    Only +, * and % on non-negative int64 values below 2**52, so NumPy arrays and TF tensors give the same answer
    (the training stream filters in-graph; `resume_point` counts on the host).
    """
    x = (group + (seed % M31) * 1_000_003 % M31 + epoch * 7_919) % M31
    for _ in range(3):  # Park-Miller steps mix the sum
        x = x * 48_271 % M31
    return x % count


def kept_per_file(table: dict, rows: list[list[int]], seed: int, epoch: int) -> list[int]:
    """Records of each file that epoch `epoch` keeps when it takes one reconstruction per scan (table: int64
    arrays "group", "index", "count" in write order)."""
    keep = reconstruction_choice(table["group"], seed, epoch, table["count"]) == table["index"]
    return [int(keep[r].sum()) for r in rows]


def resume_point(lengths, block_files: int, seed: int, consumed: int) -> tuple[int, int, int]:
    """(epoch, block, offset in the block) of example number `consumed` of the stream, from the record counts per
    file alone: resuming reads nothing before the block it lands in, however late the step.

    lengths: records per file, or a function epoch -> records per file kept that epoch (one reconstruction per
    scan keeps a different subset each epoch).
    """
    if callable(lengths):
        epoch, rest, empty = 0, consumed, 0
        while rest >= (n := sum(lengths(epoch))):
            empty = empty + 1 if n == 0 else 0
            if empty > 1000:
                raise ValueError("1000 epochs in a row keep no record of these files")
            rest -= n
            epoch += 1
        per_file = lengths(epoch)
    else:
        epoch, rest = divmod(consumed, sum(lengths))
        per_file = lengths
    for b, files in enumerate(epoch_blocks(len(per_file), block_files, seed, epoch)):
        n = int(sum(per_file[i] for i in files))
        if rest < n:
            return epoch, b, rest
        rest -= n
    raise AssertionError("unreachable: the blocks of an epoch hold all its examples")


def record_spans(path: str, indexed: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and lengths of the data of each record in the TFRecord file `path`, in file order.

    A TFRecord is an 8-byte little-endian length, its 4-byte CRC, the data and the data's 4-byte CRC. `indexed` is
    the file's entry in the split's record index (`records.load_record_index`, written when the records were
    prepared): the spans follow from its record lengths without reading the file. Without one, or when it does not
    match the file's size (the file was rewritten since), they are found from the record headers: one seek and an
    8-byte read per record."""
    if indexed is not None:
        n = np.asarray(indexed["record_bytes"], np.int64)
        size = os.path.getsize(path)
        if indexed["bytes"] == size and int((n + 16).sum()) == size:
            return np.cumsum(n + 16) - n - 4, n
        log.warning("%s: the record index does not match the file (%d bytes); finding its records from their "
                    "headers", path, size)
    offsets, lengths = [], []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            f.seek(pos)
            header = f.read(8)
            if len(header) < 8:
                raise ValueError(f"{path}: truncated record header at byte {pos}")
            (n,) = struct.unpack("<Q", header)
            offsets.append(pos + 12)
            lengths.append(n)
            pos += 16 + n
    if pos != size:
        raise ValueError(f"{path}: the last record runs past the end of the file ({pos} > {size} bytes)")
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def record_at(path, start):
    """The one TFRecord that starts at byte `start` of the file `path`, as a dataset, read by TensorFlow.

    TFRecordDatasetV2 seeks to `start` and reads one record, checking its length and data CRCs, with no Python in
    the stream. (A tf.py_function reader, pread plus the `crc32c` package's hardware CRC, was 1.2x cheaper in CPU
    time, but a Python call in flight when the iterator is destroyed can deadlock the process.) Used inside
    `flat_map`, where the op is traced into a function: serializing the dataset itself, as tf.data checkpointing
    does, loses the op's byte_offsets input (TensorFlow 2.21), and this stream does not checkpoint iterators.
    """
    v = tf.raw_ops.TFRecordDatasetV2(filenames=path, compression_type="", buffer_size=tf.constant(0, tf.int64),
                                     byte_offsets=tf.cast(start, tf.int64))
    return tf.data.experimental.from_variant(v, tf.TensorSpec([], tf.string)).take(1)


def decodes_before_shuffle(spec) -> bool:
    """Whether `train_batches(decode="auto")` decodes records before its shuffle buffer: yes when the volumes are
    stored raw (a decoded record is as large as the stored one, and decoding it while it is still in cache is 11-12 %
    faster than after the shuffle, from memory gone cold), no when they are compressed (the buffer would hold them
    decoded, about 2.8x larger with zlib: 512 records of 120 x 272 x 368 take 8.6 GiB decoded, 3.1 GiB stored)."""
    return all(spec[key].to_json_content().encoding in ("", "none", "bytes") for key in ("image", "labels_packed"))


def train_batches(records_dir: str, split: str, *, batch_size: int, size_zyx, flip_prob: float, seed: int,
                  start_step: int = 0, shuffle_buffer: int = 512, block_files: int = 8, process_index: int = 0,
                  process_count: int = 1, reconstructions: str = "all", decode: str = "auto",
                  ranged_reads: bool = True, parallel_reads: int = 1) -> Iterator[dict]:
    """Endless deterministic stream of process-local training batches, starting at global step `start_step`.

    Each epoch visits this process's record files in a seeded random order, in blocks of `block_files` files: a
    block's files are interleaved record by record and shuffled through a buffer of `shuffle_buffer` records
    (seeded per block). Order and augmentation depend only on (seed, process, example counter), so a run resumed at any
    step sees exactly the batches of an uninterrupted run, and it reads at most one block to get there (the block
    is found from the record counts in the metadata; earlier blocks and epochs are not read).

    reconstructions: "all" trains on every record each epoch; "one_per_epoch" on one reconstruction of each scan
    (CT-RATE has about two per scan), chosen afresh each epoch by `reconstruction_choice` (the reference's "one
    sample = one scan with a random reconstruction").

    ranged_reads (default; only with "one_per_epoch"): the kept records are read by their byte ranges
    (`record_spans`, from the record index written at preparation, or from the record headers where there is
    none; `record_at`), so the reconstructions an epoch leaves out are not read at all. `ranged_reads=False` reads
    every record with TFRecordDataset and drops the left-out ones before decoding; files not on a local (or
    FUSE-mounted) path are always read that way. With "all", every record is read with TFRecordDataset. The
    batches are the same either way, and every record's CRCs are checked either way.

    parallel_reads: how many of a block's files are read at once (tf.data's parallel interleave, in the same
    deterministic order; -1: tf.data's AUTOTUNE). 1 (default) reads them one record after another in one thread,
    which bounds the stream at the reader's speed however many cores the host has. On a 2-core host, 2-4 gave
    1.2x the volumes per second of 1 at about 1 GiB more memory (bench/input_pipeline.py --threads 2).

    decode: where records are decoded relative to the shuffle buffer. "before_shuffle" decodes each record as it is
    read, while it is still in cache, so the buffer holds decoded volumes; "after_shuffle" keeps the buffer's
    records as stored and decodes them as they leave it; "auto" (default) is `decodes_before_shuffle(spec)`: before
    for raw volumes (same bytes either way, and faster), after for zlib ones (the buffer then holds compressed
    volumes, about 2.8x smaller). The batches are the same either way.
    """
    if reconstructions not in ("all", "one_per_epoch"):
        raise ValueError(f"reconstructions={reconstructions!r}: choose 'all' or 'one_per_epoch'")
    if parallel_reads != -1 and parallel_reads < 1:
        raise ValueError(f"parallel_reads={parallel_reads}: choose a count >= 1, or -1 for tf.data's AUTOTUNE")
    if decode not in ("auto", "before_shuffle", "after_shuffle"):
        raise ValueError(f"decode={decode!r}: choose 'auto', 'before_shuffle' or 'after_shuffle'")
    tune_malloc()
    info = records.load_builder(records_dir).info
    spec = info.features
    k = records_packing_factor(spec)  # first: a clear error for records too old to read
    decode_first = decodes_before_shuffle(spec) if decode == "auto" else decode == "before_shuffle"
    all_files = records.split_files(records_dir, split)
    files = all_files[process_index::process_count]
    lengths = list(info.splits[split].shard_lengths[process_index::process_count])
    if not sum(lengths):
        # An endless stream over no records would spin forever instead of failing.
        raise ValueError(f"process {process_index} of {process_count} gets no record of split {split!r}: prepare "
                         "with data.num_shards a multiple of the process count and at most the number of scans")
    # This process's file order, shuffles and augmentation draws: seeded by (seed, process) so that hosts do not
    # repeat each other's crops and flips (process 0 keeps `seed`, so one process streams as it always did). The
    # reconstruction choice stays keyed by `seed` and the scan alone.
    pseed = seed if process_index == 0 else (seed % M31) * 1_000_003 + process_index * 7_919
    table, rec = None, {}
    if reconstructions == "one_per_epoch":
        path = os.path.join(records_dir, records.RECONSTRUCTIONS_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing (records prepared by fvlm-jax < 0.2): run --mode=prepare "
                                    "again, or set data.reconstructions='all'")
        with open(path) as f:
            table = {key: np.asarray(v, np.int64) for key, v in json.load(f)[split].items()}
        rows = records.shard_rows(len(table["group"]), len(all_files))[process_index::process_count]
        if [len(r) for r in rows] != lengths:
            raise ValueError(f"{path} does not describe the record files of split {split!r}: prepare again")
        rec = {key: [v[r] for r in rows] for key, v in table.items()}
    counts = list(lengths)
    if table is not None:
        lengths = lambda epoch: kept_per_file(table, rows, seed, epoch)  # noqa: E731
    # Ranged reads need the spans from plain file I/O: paths, not URLs such as gs://.
    ranged_reads = ranged_reads and table is not None and not any("://" in f for f in files)
    if ranged_reads:
        index = records.load_record_index(records_dir, split) or {}
        spans = [record_spans(f, index.get(os.path.basename(f))) for f in files]
        if [len(o) for o, _ in spans] != counts:
            raise ValueError(f"the record files of split {split!r} do not hold the records their metadata lists: "
                             "prepare again")
        rec["start"] = [o - 12 for o, _ in spans]  # where each record's header begins
    pad = max(counts)  # per-file columns as [file, position] tables
    rec = {key: tf.constant(np.stack([np.pad(c, (0, pad - len(c)), constant_values=1) for c in v]))
           for key, v in rec.items()}
    per_file = tf.constant(counts, tf.int64)
    consumed = start_step * batch_size
    epoch0, block0, offset = resume_point(lengths, block_files, pseed, consumed)

    names = tf.constant(files)
    n_blocks = -(-len(files) // block_files)

    def block(g):  # the records of global block g = epoch * n_blocks + b, interleaved and shuffled
        epoch, b = g // n_blocks, g % n_blocks
        idx = _epoch_perm(len(files), pseed, epoch)[b * block_files:(b + 1) * block_files]
        block_seed = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(pseed, tf.int64) * 1_000_003 + epoch,
                                                                    b]), minval=None, maxval=None, dtype=tf.int64)

        def kept(i, pos):  # the epoch's reconstruction of each scan, by (file, position) in the table
            return reconstruction_choice(rec["group"][i, pos], seed, epoch, rec["count"][i, pos]) == \
                rec["index"][i, pos]

        def one_file(i):
            if table is None:
                return tf.data.TFRecordDataset(names[i], buffer_size=0)
            if ranged_reads:
                return tf.data.Dataset.range(per_file[i]).filter(lambda pos: kept(i, pos)).flat_map(
                    lambda pos: record_at(names[i], rec["start"][i, pos]))
            return tf.data.TFRecordDataset(names[i], buffer_size=0).enumerate().filter(
                lambda pos, _: kept(i, pos)).map(lambda _, r: r)
        par = {} if parallel_reads == 1 else {"num_parallel_calls": parallel_reads, "deterministic": True}
        ds = tf.data.Dataset.from_tensor_slices(idx).interleave(one_file, cycle_length=block_files, block_length=1,
                                                               **par)
        # The shuffle reorders elements whatever they hold, so decoding before or after it gives the same stream.
        # The crop stays after it (seeded by the example counter).
        if decode_first:
            ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.shuffle(shuffle_buffer, seed=block_seed, reshuffle_each_iteration=False)
        if not decode_first:
            ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds

    def parse(serialized):
        ex = spec.deserialize_example(serialized)
        return {key: ex[key] for key in TRAIN_KEYS if key in ex}

    # In-graph block plan (a Python generator here costs a third of the pipeline's throughput).
    ds = tf.data.Dataset.range(epoch0 * n_blocks + block0, np.iinfo(np.int64).max).flat_map(block)
    ds = ds.skip(offset).enumerate(start=consumed)
    size_zyx = [int(s) for s in size_zyx]

    def crop(i, ex):
        out = dict(ex)
        out["image"], out["labels_packed"], out["label_shift"], out["flip"] = random_crop(
            ex["image"], ex["labels_packed"], size_zyx, k, flip_prob, tf.stack([tf.constant(pseed, tf.int64), i]))
        return out

    ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
    return ds.as_numpy_iterator()


def eval_dataset(records_dir: str, split: str, *, batch_size: int, size_zyx) -> tf.data.Dataset:
    """The batches of `eval_batches` as a tf.data.Dataset (all TF ops: nothing to hang on at teardown). Raises
    ValueError naming the split when it was not prepared or holds no scan. size_zyx=None: each scan's whole stored
    volume, uncropped (batch_size 1: the shapes differ), label_shift 0."""
    info = records.load_builder(records_dir).info
    if split not in info.splits:
        raise ValueError(f"split {split!r} was not prepared in {records_dir} (it has {sorted(info.splits)}): "
                         "prepare again with it as data.threshold_split or data.eval_split")
    if not info.splits[split].num_examples:
        raise ValueError(f"split {split!r} holds no scans in {records_dir}: none was listed or all were rejected "
                         "(see rejects.jsonl there); choose a split with scans for data.threshold_split and "
                         "data.eval_split")
    spec = info.features
    if size_zyx is None and batch_size != 1:
        raise ValueError(f"whole volumes (size_zyx=None) come one per batch, not {batch_size}")
    size_zyx = None if size_zyx is None else [int(s) for s in size_zyx]
    k = records_packing_factor(spec)

    def decode(serialized):
        ex = spec.deserialize_example(serialized)
        if size_zyx is None:
            image, labels_packed, shift = ex["image"], ex["labels_packed"], tf.constant(0, tf.int32)
        else:
            image, labels_packed, shift = center_window(ex["image"], ex["labels_packed"], k, size_zyx)
        return {"image": image, "labels_packed": labels_packed, "label_shift": shift,
                "targets": ex["targets"], "id": ex["id"], "text_tokens": ex["text_tokens"],
                "has_text": ex["has_text"], "report_tokens": ex["report_tokens"]}

    ds = tf.data.TFRecordDataset(records.split_files(records_dir, split)).map(decode, num_parallel_calls=4)
    return ds.batch(batch_size)


def eval_batches(records_dir: str, split: str, *, batch_size: int, size_zyx) -> Iterator[dict]:
    """One pass over `split`, centre-cropped to `size_zyx` (None: whole volumes, one per batch, for the public
    evaluation protocol's per-anatomy crops); the last batch is padded, with `mask` marking real rows.

    Yields numpy dicts with image uint8 [B, Z, Y, X], labels_packed uint8 [B, Z, Y, W] and label_shift [B] (see
    `center_window`; `fvlm_jax.evaluate.encode_images` takes them as they are), targets [B, C], id and mask, and
    the texts retrieval embeds: text_tokens [B, A, L], has_text [B, A], report_tokens [B, R].
    """
    ds = eval_dataset(records_dir, split, batch_size=batch_size, size_zyx=size_zyx)
    for batch in ds.as_numpy_iterator():
        n = len(batch["id"])
        batch["mask"] = np.arange(batch_size) < n
        if n < batch_size:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, 0)]) if k != "mask" else v
                     for k, v in batch.items()}
        yield batch
