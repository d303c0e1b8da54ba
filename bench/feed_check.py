"""The train step's input feeds, step by step: where a fed step's time goes on the host.

Times the same compiled step fed several ways, in two rounds in one process, and prints per feed the step time and,
per step, how long the loop waited for its batch, how long the step's call took to return (its dispatch) and how
long each host-to-device copy took. It found that the prefetched figure of a short `train_step.py` run can be a
one-time cost: on an H200 the first copy made in a process while steps ran took 0.58 s, the later ones 2-15 ms.

  python bench/feed_check.py --preset=paper --batch=14 --dtype=bfloat16 --steps=20     # on the device
  python bench/feed_check.py                                                           # CPU, small preset

Feeds: batches already on the device; the host batch copied in the loop; prefetched in a background thread as the
training loop does (fvlm_jax.prefetch, `ahead` 2 and 4); prefetched with a 2 s head start; prefetched with the
thread waiting until each copy is done; and one `jax.device_put` of the whole batch instead of one global array per
key, prefetched and in the loop.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import preset_config  # noqa: E402  (the presets of the train-step benchmark)

from fvlm_jax import sharding, synthetic, train  # noqa: E402
from fvlm_jax.prefetch import prefetch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("small", "demo", "paper"), default="small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed feed")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
    ap.add_argument("--depth", type=int, default=None,
                    help="blocks of both encoders (default: the preset's); 12 gives the paper's number of state "
                         "arrays at the small preset's width, for the step call's host time on a CPU")
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    if args.depth:
        cfg.model.vision.depth = cfg.model.text.depth = args.depth
    if args.dtype:
        cfg.model.dtype = args.dtype
    cfg.train.batch_size = args.batch
    trainer = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg))
    batches = [synthetic.random_batch(cfg, args.batch, seed=i, packed=True) for i in range(2)]
    mib = sum(v.nbytes for v in batches[0].values()) / 2**20
    print(f"{jax.devices()[0].device_kind}: preset {args.preset}, batch {args.batch} ({mib:.0f} MiB on the host), "
          f"dtype {cfg.model.dtype}, depth {cfg.model.vision.depth}, {len(jax.tree.leaves(trainer.state))} state "
          f"arrays, {args.steps} steps per feed")
    t0 = time.perf_counter()
    jax.block_until_ready(trainer.train_step(batches[0]))
    print(f"compile + first step: {time.perf_counter() - t0:.1f} s")
    on_device = [trainer.global_batch(b) for b in batches]
    jax.block_until_ready(on_device)

    def host():
        for i in range(args.steps):
            yield batches[i % 2]

    copy_s: list[float] = []

    def copied(put):
        def fn(b):
            t = time.perf_counter()
            out = put(b)
            copy_s.append(time.perf_counter() - t)
            return out
        return fn

    per_key = copied(trainer.global_batch)
    whole = copied(lambda b: jax.device_put(b, trainer.batch_sharding))
    waited = copied(lambda b: jax.block_until_ready(trainer.global_batch(b)))

    def run(label, make_feed, head_start=0.0):
        copy_s.clear()
        jax.block_until_ready(trainer.step_on_device(on_device[0]))
        feed = make_feed()
        if head_start:  # the feed runs ahead before the clock starts
            first = next(feed)
            time.sleep(head_start)
            feed = itertools.chain([first], feed)
        waits, dispatch = [], []
        metrics = None
        t0 = time.perf_counter()
        while True:
            tw = time.perf_counter()
            batch = next(feed, None)
            if batch is None:
                break
            td = time.perf_counter()
            metrics = trainer.step_on_device(batch)
            waits.append(td - tw)
            dispatch.append(time.perf_counter() - td)
        jax.block_until_ready(metrics)
        per_step = (time.perf_counter() - t0) / len(waits)

        def ms(xs):
            return f"median {statistics.median(xs) * 1e3:.1f}, max {max(xs) * 1e3:.1f}"
        copies = f"; copy {ms(copy_s)}" if copy_s else ""
        print(f"{label:44s} {per_step * 1e3:6.1f} ms/step   wait for batch {ms(waits)}; step call {ms(dispatch)}"
              f"{copies} (ms)")

    for rnd in range(args.rounds):
        print(f"-- round {rnd}")
        run("batch already on the device", lambda: iter([on_device[i % 2] for i in range(args.steps)]))
        run("copy in the loop", lambda: (per_key(b) for b in host()))
        run("prefetch, ahead 2 (training loop)", lambda: prefetch(host(), per_key, 2))
        run("prefetch, ahead 2, head start 2 s", lambda: prefetch(host(), per_key, 2), head_start=2.0)
        run("prefetch, ahead 2, thread waits for copy", lambda: prefetch(host(), waited, 2))
        run("prefetch, ahead 4", lambda: prefetch(host(), per_key, 4))
        run("prefetch, ahead 2, one device_put", lambda: prefetch(host(), whole, 2))
        run("copy in the loop, one device_put", lambda: (whole(b) for b in host()))


if __name__ == "__main__":
    main()
