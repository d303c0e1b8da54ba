"""tf.data training input throughput at the paper's resolution (112 x 256 x 352), ours vs a naive int16 pipeline.

Run: python bench/input_stream.py [--k 16] [--volumes 100]

Writes K prepared examples (uint8 image + 4-bit packed labels of 4 anatomies, smooth body with anatomy boxes and a
little noise so zlib sees a realistic ratio) through `records.ShardedWriter` / `records.write_metadata`, then
iterates `input_pipeline.tfdata.train_batches` (batch 2, crop 112 x 256 x 352, flip 0.2) unchanged except that
tf.data is pinned to one private thread (applied by a wrapper around `as_numpy_iterator`). Ours crops on the host
and leaves unpacking and flips to the accelerator (`fvlm_jax.augment.finish_on_device`, inside the train step);
the row "+ finish on this CPU" also runs that jitted finish on the CPU backend, the whole cost on a host without an
accelerator. The naive baseline stores raw int16 HU volumes and uint8 labels uncompressed in tf.train.Example
bytes, parses them, crops and flips both on the host (`naive_crop_flip`) and windows to float32. Each pipeline runs
in its own worker process (own peak RSS). Volumes per CPU-second (process user + sys) is the per-core figure. A
benchmark that prints figures, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZE_ZYX = (112, 256, 352)
# Prepared volumes are the anatomies' bounding box plus margin, padded to at least the crop: a little larger than the
# crop, so the random crop really cuts.
STORED_ZYX = (120, 272, 368)
BATCH = 2
HU_WINDOW = (-1150.0, 350.0)
PIPELINES = ("ours_none", "ours_none_cpu_finish", "ours_none_glibc_default", "ours_none_decode_after",
             "ours_none_one_per_epoch", "ours_none_one_per_epoch_tfrecord", "ours_none_parallel_reads",
             "ours_zlib", "ours_zlib_decode_first", "ours_none_eval", "naive")
DECODE = {"_decode_first": "before_shuffle", "_decode_after": "after_shuffle"}  # name suffix: train_batches(decode=)
READ_VARIANTS = ("_glibc_default", "_cpu_finish", "_one_per_epoch", "_tfrecord", "_parallel_reads", "_eval", *DECODE)


def records_of(method: str) -> str:
    """The records a pipeline reads ("ours_none", "ours_zlib" or "naive"): its name without the reading variant."""
    for suffix in READ_VARIANTS:
        method = method.replace(suffix, "")
    return method


def make_volume(rng, shape):
    """(HU int16, uint8 windowed image, uint8 anatomy labels 0..4) of a smooth synthetic body."""
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    hu = np.full(shape, -1000, np.int16)
    body = ((y - ny / 2) / (0.40 * ny)) ** 2 + ((x - nx / 2) / (0.45 * nx)) ** 2 <= 1
    hu[np.broadcast_to(body, shape)] = 40
    labels = np.zeros(shape, np.uint8)
    jitter = rng.integers(-8, 9, 3)
    boxes = [(1, (0.45, 0.95), (0.25, 0.70), (0.15, 0.45), -850), (1, (0.45, 0.95), (0.25, 0.70), (0.55, 0.85), -850),
             (2, (0.45, 0.75), (0.35, 0.60), (0.45, 0.65), 45), (3, (0.10, 0.45), (0.30, 0.65), (0.15, 0.50), 60),
             (4, (0.00, 0.25), (0.55, 0.75), (0.25, 0.75), 30)]
    for a, bz, by, bx, v in boxes:
        sl = tuple(slice(max(int(lo * n) + j, 0), min(int(hi * n) + j, n))
                   for (lo, hi), n, j in zip((bz, by, bx), shape, jitter))
        hu[sl] = v
        labels[sl] = a
    hu += rng.normal(0, 15, shape).astype(np.int16)
    lo, hi = HU_WINDOW
    image = np.rint(np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    return hu, image, labels


def write_ours(folder, k, rng, encoding):
    from input_pipeline import label_packing, records
    os.makedirs(folder, exist_ok=True)
    spec = records.features(4, 18, 128, 512, 16, encoding)
    w = records.ShardedWriter(folder, "train", 4, spec)
    for i in range(k):
        _, image, labels = make_volume(rng, STORED_ZYX)
        w.write({"id": f"synthetic_{i}", "image": image, "labels_packed": label_packing.pack_labels(labels, 2),
                 "text_tokens": rng.integers(0, 1000, (4, 128), dtype=np.int32), "has_text": np.ones(4, bool),
                 "normal": rng.random(4) < 0.5, "disease": rng.random((4, 18)) < 0.1,
                 "text_id": np.arange(4, dtype=np.int32), "report_tokens": rng.integers(0, 1000, 512, dtype=np.int32),
                 "targets": rng.integers(0, 2, 16, dtype=np.int32)})
    records.write_metadata(folder, spec, [w.close()], "input pipeline benchmark")
    # Two reconstructions per scan, as CT-RATE has about two, for the pipeline reading one per scan and epoch.
    ids = [f"synthetic_{i}" for i in range(k)]
    with open(os.path.join(folder, records.RECONSTRUCTIONS_FILE), "w") as f:
        json.dump({"train": records.reconstruction_table(ids, lambda i: f"scan_{int(i.rsplit('_', 1)[1]) // 2}")}, f)
    return sum(os.path.getsize(p) for p in w.paths)


def write_naive(folder, k, rng):
    import tensorflow as tf
    path = os.path.join(folder, "naive.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for _ in range(k):
            hu, _, labels = make_volume(rng, STORED_ZYX)
            feat = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[hu.tobytes()])),
                    "labels": tf.train.Feature(bytes_list=tf.train.BytesList(value=[labels.tobytes()])),
                    "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(STORED_ZYX)))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
    return os.path.getsize(path)


@contextlib.contextmanager
def tf_threads(n: int):
    """Apply tf.data threading options (a private pool of n threads) to the dataset `train_batches` builds,
    unmodified."""
    import tensorflow as tf
    original = tf.data.Dataset.as_numpy_iterator

    def patched(self):
        opts = tf.data.Options()
        opts.threading.private_threadpool_size = n
        opts.threading.max_intra_op_parallelism = 1
        return original(self.with_options(opts))

    tf.data.Dataset.as_numpy_iterator = patched
    try:
        yield
    finally:
        tf.data.Dataset.as_numpy_iterator = original


def naive_crop_flip(image, labels, seed):
    """The usual host augmentation: one random crop, then a reverse of both volumes per flipped axis."""
    import tensorflow as tf
    seeds = tf.random.experimental.stateless_split(seed, 4)
    room = tf.shape(image, out_type=tf.int32) - SIZE_ZYX + 1
    offset = tf.random.stateless_uniform([3], seed=seeds[0], minval=0, maxval=2**30, dtype=tf.int32) % room
    image, labels = tf.slice(image, offset, SIZE_ZYX), tf.slice(labels, offset, SIZE_ZYX)
    for axis in range(3):
        flip = tf.random.stateless_uniform([], seed=seeds[axis + 1]) < 0.2
        image, labels = tf.cond(flip, lambda i=image, lb=labels, a=axis: (tf.reverse(i, [a]), tf.reverse(lb, [a])),
                                lambda i=image, lb=labels: (i, lb))
    return image, labels


def naive_batches(path, seed):
    import tensorflow as tf
    desc = {"image": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.FixedLenFeature([], tf.string),
            "shape": tf.io.FixedLenFeature([3], tf.int64)}
    lo, hi = HU_WINDOW

    def decode(i, serialized):
        ex = tf.io.parse_single_example(serialized, desc)
        image = tf.reshape(tf.io.decode_raw(ex["image"], tf.int16), ex["shape"])
        labels = tf.reshape(tf.io.decode_raw(ex["labels"], tf.uint8), ex["shape"])
        image, labels = naive_crop_flip(image, labels, tf.stack([tf.constant(seed, tf.int64), i]))
        image = tf.clip_by_value((tf.cast(image, tf.float32) - lo) / (hi - lo), 0.0, 1.0)
        return {"image": image, "labels": labels}

    ds = tf.data.TFRecordDataset([path]).shuffle(512, seed=seed).repeat().enumerate()
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(BATCH, drop_remainder=True).prefetch(2).as_numpy_iterator()


def worker(method, folder, volumes, warmup, threads=1):
    import tensorflow as tf  # noqa: F401  (import outside the timed region)

    from input_pipeline import tfdata
    finish = None
    if method.endswith("cpu_finish"):
        import jax

        from fvlm_jax import augment
        finish = jax.jit(lambda b: augment.finish_on_device(b, SIZE_ZYX[2]))
    with tf_threads(threads):
        if method.endswith("_eval"):  # the evaluation stream: centre crop, labels unpacked; pass after pass
            def passes():
                while True:
                    yield from tfdata.eval_batches(os.path.join(folder, records_of(method)), "train",
                                                   batch_size=BATCH, size_zyx=SIZE_ZYX)
            it = passes()
        elif method.startswith("ours"):
            decode = next((d for suffix, d in DECODE.items() if method.endswith(suffix)), "auto")
            it = tfdata.train_batches(os.path.join(folder, records_of(method)), "train", batch_size=BATCH,
                                      size_zyx=SIZE_ZYX, flip_prob=0.2, seed=0, decode=decode,
                                      reconstructions="one_per_epoch" if "_one_per_epoch" in method else "all",
                                      ranged_reads=not method.endswith("_tfrecord"),
                                      parallel_reads=4 if method.endswith("_parallel_reads") else 1)
        else:
            it = naive_batches(os.path.join(folder, "naive.tfrecord"), seed=0)

        def get():
            b = next(it)
            if finish is not None:
                b = jax.block_until_ready(finish({k: b[k] for k in ("image", "labels_packed", "label_shift", "flip")}))
            return b

        for _ in range(warmup):
            batch = get()
        t0, c0 = time.perf_counter(), os.times()
        n = 0
        while n < volumes:
            batch = get()
            n += batch["image"].shape[0]
        t1, c1 = time.perf_counter(), os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    print(json.dumps({"n": n, "wall": t1 - t0, "cpu": cpu, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "shape": list(batch["image"].shape), "dtype": str(batch["image"].dtype)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=16, help="prepared examples written")
    ap.add_argument("--volumes", type=int, default=100, help="volumes timed after warm-up")
    ap.add_argument("--warmup", type=int, default=4, help="batches before timing")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds over all pipelines (alternating, so machine noise hits all); medians are printed")
    ap.add_argument("--pipelines", default=",".join(PIPELINES),
                    help="comma-separated subset to time (default: all); the ratio line needs ours_none, "
                         "ours_none_glibc_default, ours_zlib and naive; a decode-order line a pipeline and its "
                         "_decode_after / _decode_first variant")
    ap.add_argument("--threads", type=int, default=1,
                    help="tf.data private thread pool size (1: the per-core figure; more: what parallel reads gain)")
    ap.add_argument("--worker", choices=(*PIPELINES, "write"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "write":
        rng = np.random.default_rng(0)
        size = {f"ours_{e}": write_ours(os.path.join(args.dir, f"ours_{e}"), args.k, rng, e) for e in ("none", "zlib")}
        size["naive"] = write_naive(args.dir, args.k, rng)
        print(json.dumps({**size, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
        return
    if args.worker:
        worker(args.worker, args.dir, args.volumes, args.warmup, args.threads)
        return
    pipelines = list(dict.fromkeys(args.pipelines.split(",")))
    if unknown := set(pipelines) - set(PIPELINES):
        ap.error(f"--pipelines: unknown {sorted(unknown)}; choose from {', '.join(PIPELINES)}")

    # Everything heavy runs in child processes started from this small parent, so that each child's ru_maxrss is
    # its own (a forked child inherits the parent's resident pages in its high-water mark).
    with tempfile.TemporaryDirectory(prefix="fvlm_input_bench_") as tmp:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--worker", "write", "--dir", tmp, "--k", str(args.k)],
                             check=True, capture_output=True, text=True)
        size = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"wrote {args.k} examples of {SIZE_ZYX} per pipeline in {time.perf_counter() - t0:.1f} s "
              f"({len(glob.glob(os.path.join(tmp, '*tfrecord*')))} record files); cores available "
              f"{len(os.sched_getaffinity(0))}; tf.data private thread pool {args.threads}, batch {BATCH}, flip 0.2, "
              f"{args.volumes} volumes timed after {args.warmup} warm-up batches, {args.rounds} rounds (medians below)")
        runs = {m: [] for m in pipelines}
        for _ in range(args.rounds):
            for method in pipelines:
                env = dict(os.environ, FVLM_TUNE_MALLOC="0" if method.endswith("glibc_default") else "1")
                out = subprocess.run([sys.executable, __file__, "--worker", method, "--dir", tmp,
                                      "--volumes", str(args.volumes), "--warmup", str(args.warmup),
                                      "--threads", str(args.threads)],
                                     check=True, capture_output=True, text=True, env=env)
                runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def median_run(rs):  # the round with the median volumes per CPU-second (its wall time and RSS go with it)
        return sorted(rs, key=lambda r: r["n"] / r["cpu"])[len(rs) // 2]

    res = {m: median_run(rs) for m, rs in runs.items()}
    spread = {m: [round(r["n"] / r["cpu"], 1) for r in rs] for m, rs in runs.items()}
    print()
    print(f"{'pipeline':<34}{'vol/s':>8}{'vol/CPU-s':>11}{'cores used':>11}{'MiB/volume':>12}{'peak RSS MiB':>14}"
          "  batch")
    names = {"ours_none": "ours (uint8 raw, tfdata)", "ours_none_glibc_default": "  same, glibc malloc defaults",
             "ours_none_cpu_finish": "  + finish on this CPU (jax)",
             "ours_zlib": "ours (uint8 zlib, tfdata)",
             "ours_none_decode_after": "  same, decoded after the shuffle",
             "ours_none_one_per_epoch": "  same, one of 2 reconstructions",
             "ours_none_one_per_epoch_tfrecord": "    TFRecordDataset, other dropped",
             "ours_none_parallel_reads": "  same, 4 files read at once",
             "ours_zlib_decode_first": "  same, decoded before the shuffle",
             "ours_none_eval": "  eval stream (centre crop)",
             "naive": "naive (raw int16, float32 out)"}
    for m, r in res.items():
        print(f"{names[m]:<34}{r['n'] / r['wall']:>8.1f}{r['n'] / r['cpu']:>11.1f}{r['cpu'] / r['wall']:>11.2f}"
              f"{size[records_of(m)] / args.k / 2**20:>12.2f}{r['rss_kb'] / 1024:>14.0f}  {r['shape']} {r['dtype']}")
    print(f"volumes per CPU-second in each of the {args.rounds} rounds: " +
          "; ".join(f"{names[m].strip()}: {', '.join(map(str, v))}" for m, v in spread.items()))
    per_cpu = {m: r["n"] / r["cpu"] for m, r in res.items()}
    print("record bytes per volume: " + ", ".join(f"{names[m].strip()} {size[m] / args.k / 2**20:.2f} MiB"
                                                  for m in ("ours_none", "ours_zlib", "naive")))
    if {"ours_none", "ours_zlib", "ours_none_glibc_default", "naive"} <= set(per_cpu):
        best = per_cpu["ours_none"]
        print(f"ratio per CPU-second: ours raw / naive {best / per_cpu['naive']:.2f}x, ours zlib / naive "
              f"{per_cpu['ours_zlib'] / per_cpu['naive']:.2f}x; malloc tuning "
              f"{best / per_cpu['ours_none_glibc_default']:.2f}x; target >= 50 volumes per CPU-second: "
              f"{'met' if best >= 50 else 'NOT met'} ({best:.1f})")
    for default, other, what in (("ours_none", "ours_none_decode_after", "raw records decoded before the shuffle"),
                                 ("ours_zlib", "ours_zlib_decode_first", "zlib records decoded after the shuffle")):
        if {default, other} <= set(per_cpu):
            print(f"{what} (the default) / the other order: {per_cpu[default] / per_cpu[other]:.2f}x the volumes per "
                  f"CPU-second, peak RSS {res[default]['rss_kb'] / 1024:.0f} against "
                  f"{res[other]['rss_kb'] / 1024:.0f} MiB (the buffer holds up to min(K, shuffle buffer) records)")
    if {"ours_none", "ours_none_parallel_reads"} <= set(per_cpu):
        par, one = res["ours_none_parallel_reads"], res["ours_none"]
        print(f"4 files read at once / one: {(par['n'] / par['wall']) / (one['n'] / one['wall']):.2f}x the volumes "
              f"per second, {per_cpu['ours_none_parallel_reads'] / per_cpu['ours_none']:.2f}x per CPU-second, peak "
              f"RSS {par['rss_kb'] / 1024:.0f} against {one['rss_kb'] / 1024:.0f} MiB")
    for m, how in (("ours_none_one_per_epoch", "the other not read: ranged reads"),
                   ("ours_none_one_per_epoch_tfrecord", "every record read by TFRecordDataset, the other dropped")):
        if {"ours_none", m} <= set(per_cpu):
            print(f"one reconstruction of each scan's 2 per epoch ({how}) / every record: "
                  f"{per_cpu[m] / per_cpu['ours_none']:.2f}x the trained volumes per CPU-second")
    me, ch = (resource.getrusage(w).ru_maxrss / 1024 for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(f"peak RSS: this process {me:.0f} MiB; children: writer {size['rss_kb'] / 1024:.0f} MiB, largest child "
          f"{ch:.0f} MiB")


if __name__ == "__main__":
    main()
