"""Zero-shot evaluation's image encoding on synthetic in-memory batches: scans/s with the batches copied to the
devices in the loop (`--ahead 0`, what evaluation did before) and copied ahead in a background thread while the
previous batch is encoded (`data.prefetch_to_device`, default 2), in alternating rounds of one run.

No TensorFlow needed, so it runs unchanged on an accelerator host:
  python bench/encode.py --preset=small                      # the CPU comparison size, batch 4
  python bench/encode.py --preset=paper --batch=14 --dtype=bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import preset_config  # noqa: E402  (the presets of the train-step benchmark)

from fvlm_jax import evaluate, synthetic, train_state  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("small", "demo", "paper"), default="small")
    ap.add_argument("--batch", type=int, default=4, help="scans per evaluation batch")
    ap.add_argument("--batches", type=int, default=8, help="batches per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each feed")
    ap.add_argument("--ahead", type=int, default=2, help="batches copied ahead in the pipelined feed")
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
    args = ap.parse_args()
    cfg = preset_config(args.preset)
    if args.dtype:
        cfg.model.dtype = args.dtype
    encoder = evaluate.image_encoder(train_state.create_model(cfg, "fvlm"))
    # Evaluation's input form: plain uint8 labels. A few distinct batches, reused (host arrays, as tf.data gives).
    distinct = [synthetic.random_batch(cfg, args.batch, seed=i) for i in range(min(args.batches, 3))]
    for b in distinct:
        b.update(mask=np.ones(args.batch, bool), targets=np.zeros((args.batch, 1), np.int8),
                 id=np.array([str(i).encode() for i in range(args.batch)]))
    feed = [distinct[i % len(distinct)] for i in range(args.batches)]
    kind = jax.devices()[0].device_kind
    print(f"{kind} ({jax.default_backend()}): preset {args.preset}, {args.batches} batches of {args.batch} scans "
          f"{tuple(cfg.model.input_zyx)}, dtype {cfg.model.dtype}, {cfg.model.vision.depth} layers of width "
          f"{cfg.model.vision.width}")
    t0 = time.perf_counter()
    evaluate.encode_images(encoder, distinct[:1], ahead=0)  # compiles the encoder, reused below
    print(f"first batch (compile + run) {time.perf_counter() - t0:.1f} s")

    feeds = {"copied in the loop (ahead 0)": 0, f"copied ahead (ahead {args.ahead})": args.ahead}
    times: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(args.rounds):
        for name, ahead in feeds.items():
            t0 = time.perf_counter()
            out = evaluate.encode_images(encoder, feed, ahead=ahead)
            times[name].append(time.perf_counter() - t0)
            assert out["emb"].shape[0] == args.batch * args.batches
    scans = args.batch * args.batches
    med = {name: float(np.median(t)) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:32s} {scans / med[name]:8.1f} scans/s  ({med[name] / args.batches * 1e3:.1f} ms per batch; "
              f"rounds: {', '.join(f'{scans / x:.1f}' for x in t)})")
    a, b = med.values()
    print(f"speed-up of copying ahead: {a / b:.2f}x (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
