"""Train-step benchmark on synthetic in-memory batches: step time, volumes/s, model FLOP/s and MFU.

No TensorFlow needed, so it runs unchanged on an accelerator host:
  python bench/train_step.py --preset=small            # width 256, 4 layers, 256 tokens, batch 4 (tiny: the tests')
  python bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16   # ViT-B on 112x256x352 (--remat: compare)
  python bench/train_step.py --preset=demo --batch=32 --steps=5 --coteach  # co-teaching's cost: time and memory ratios
MFU = analytic model FLOPs per step (fvlm_jax.flops, vision + text, forward and backward) / (step time x peak x
devices).
The peak comes from --peak_tflops or, for known accelerators, from the device kind (H100/H200 bf16 dense: 989).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import jax
import numpy as np

from configs import ct_rate, demo
from fvlm_jax import flops, sharding, synthetic, text_lengths, train
from fvlm_jax.models import transformer
from fvlm_jax.models.fvlm import METHODS
from fvlm_jax.models.transformer import ATTENTION_IMPLS

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v4": 275.0}


def preset_config(name: str):
    if name in ("demo", "tiny"):  # tiny: configs/demo.py:tiny, the tests' config (the script's own smoke test)
        return demo.get_config("tiny" if name == "tiny" else None)
    cfg = ct_rate.get_config()
    if name == "small":  # the CPU comparison size
        cfg.model.input_zyx = (32, 64, 64)
        cfg.model.vision.update(patch_zyx=(8, 8, 8), width=256, depth=4, heads=4, mlp_dim=1024, feature_blocks=(2,))
        cfg.model.text.update(width=256, depth=4, heads=4, mlp_dim=1024, vocab_size=8000, max_len=512)
        cfg.prep.text_len = 32
        cfg.model.dtype, cfg.model.remat = "float32", False
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "small", "demo", "paper"), default="small")
    ap.add_argument("--method", choices=METHODS, default="fvlm")
    ap.add_argument("--batch", type=int, default=4, help="global batch")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
    ap.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--remat_policy", default=None,
                    help="model.remat_policy, a jax.checkpoint_policies name (default: the preset's)")
    ap.add_argument("--text_len", type=int, default=None, help="tokens per anatomy text (default: the preset's)")
    ap.add_argument("--anatomy_len", default=None,
                    help="model.text.anatomy_len: explicit tokens per anatomy ('lung=112,heart=56'), '' for every "
                         "anatomy at --text_len (default: the preset's if explicit; the paper preset's percentile "
                         "needs prepared records, so it runs at --text_len)")
    ap.add_argument("--peak_tflops", type=float, default=None)
    ap.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (exact accumulation)")
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. 1,8,1 (default: all devices on data)")
    ap.add_argument("--fake_devices", type=int, default=0, help="run on this many fake CPU devices (sharding check)")
    ap.add_argument("--loss_impl", choices=("gspmd", "shard_map"), default="gspmd")
    ap.add_argument("--attention", choices=ATTENTION_IMPLS, default=None,
                    help="model.attention (default: the preset's, 'auto')")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also trace 3 steps with jax.profiler into DIR (a Perfetto trace, summarised by "
                         "bench/trace_summary.py) after the timing")
    ap.add_argument("--gelu", choices=("recompute", "store"), default="recompute",
                    help="the blocks' GELU: recomputed in the backward pass (the model's) or autodiff storing its "
                         "intermediates (jax.nn.gelu, the A/B)")
    ap.add_argument("--ahead", type=int, default=None,
                    help="batches the training loop's feed copies ahead (default: the config's "
                         "data.prefetch_to_device)")
    ap.add_argument("--more_ahead", type=lambda v: [int(n) for n in v.split(",") if n], default=[],
                    help="also time the prefetched feed with these `ahead` values, e.g. 1,4")
    ap.add_argument("--memory_only", action="store_true",
                    help="compile only and print XLA's memory analysis of the step (no run): checks what fits "
                         "on a device from any host")
    ap.add_argument("--coteach", action="store_true",
                    help="compare the co-teaching step (loss.coteach) with the plain one: step time on batches "
                         "already on the device and XLA's memory analysis of each, and their ratios (with "
                         "--memory_only: the memory analysis alone)")
    args = ap.parse_args()
    if args.memory_only:
        # XLA:CPU's default scheduler favours concurrency over memory; the memory-aware one is closer to what the
        # GPU/TPU compilers do, so the CPU estimate means something. (Set before the backend starts.)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

    if args.gelu == "store":  # Block.__call__ looks the module's gelu up when traced
        transformer.gelu = jax.nn.gelu
    if args.fake_devices:  # CPU devices, also on a GPU host (the sharding / memory check)
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.fake_devices)
    cfg = preset_config(args.preset)
    if args.mesh:
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(v) for v in args.mesh.split(","))
    if args.dtype:
        cfg.model.dtype = args.dtype
    if args.remat is not None:
        cfg.model.remat = args.remat
    if args.remat_policy:
        cfg.model.remat_policy = args.remat_policy
    if args.text_len:
        cfg.prep.text_len = args.text_len
    if args.anatomy_len is not None:
        cfg.model.text.anatomy_len = args.anatomy_len
    elif text_lengths.is_percentile(cfg.model.text.anatomy_len) or args.text_len:
        cfg.model.text.anatomy_len = ""  # no records statistics here (or a changed stored length)
    cfg.train.batch_size = args.batch
    if args.ahead is None:
        args.ahead = int(cfg.data.prefetch_to_device)
    cfg.train.grad_accum_steps = args.grad_accum
    cfg.loss.impl = args.loss_impl
    if args.attention:
        cfg.model.attention = args.attention
    dev = jax.devices()[0]
    kind = dev.device_kind
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)

    # The training input's form: packed labels and flips, finished on the device inside the step.
    batches = [synthetic.random_batch(cfg, args.batch, seed=i, packed=True) for i in range(2)]
    if args.coteach:
        compare_coteach(cfg, args, batches, kind)
        return
    trainer = train.Trainer(cfg, args.method, sharding.make_mesh(cfg))
    if args.memory_only:
        t0 = time.perf_counter()
        with jax.set_mesh(trainer.mesh):
            compiled = trainer.step_fn.lower(trainer.state, trainer.global_batch(batches[0])).compile()
        m = compiled.memory_analysis()
        gib = 2**30
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        print(f"{kind} ({jax.default_backend()}): preset {args.preset}, batch {args.batch} on {jax.device_count()} "
              f"device(s), dtype {cfg.model.dtype}, remat {cfg.model.remat} ({cfg.model.remat_policy}), "
              f"grad_accum {args.grad_accum}, attention {cfg.model.attention}, GELU {args.gelu}; "
              f"compiled in {time.perf_counter() - t0:.0f} s")
        print(f"XLA memory analysis per device: arguments {m.argument_size_in_bytes / gib:.2f} GiB, outputs "
              f"{m.output_size_in_bytes / gib:.2f} GiB (aliased {m.alias_size_in_bytes / gib:.2f}), temporaries "
              f"{m.temp_size_in_bytes / gib:.2f} GiB; peak estimate {peak / gib:.2f} GiB")
        return
    fused = None
    if jax.default_backend() == "gpu":  # which attention kernel the step really runs (tracing only, no compile)
        with jax.set_mesh(trainer.mesh):
            hlo = trainer.step_fn.lower(trainer.state, trainer.global_batch(batches[0])).as_text()
        fused = hlo.count("__cudnn$fmha")
    t0 = time.perf_counter()
    jax.block_until_ready(trainer.train_step(batches[0]))
    compile_s = time.perf_counter() - t0

    last = {}
    on_device = [trainer.global_batch(b) for b in batches]
    jax.block_until_ready(on_device)

    def timed(make_feed) -> float:
        """Seconds per step over args.steps steps fed by make_feed() (an iterator of device batches), on the
        second of two passes. The first pass is untimed: the first host-to-device copies of a process pay one-time
        costs that are no per-step cost (on an H200, one copy made while a step ran took 0.58 s, the next ones
        2-15 ms; bench/feed_check.py). Each pass starts after an untimed step on a batch already on the device, and
        the feed starts after it, so a prefetching feed gets no head start: its first copy is inside the timed
        steps (the figure errs by at most one copy over args.steps steps, on the slow side)."""
        for _ in range(2):
            jax.block_until_ready(trainer.step_on_device(on_device[0]))
            t0 = time.perf_counter()
            for batch in make_feed():
                metrics = trainer.step_on_device(batch)
            jax.block_until_ready(metrics)
        last["metrics"] = metrics
        return (time.perf_counter() - t0) / args.steps

    def host_batches():
        for i in range(args.steps):
            yield batches[i % 2]

    # 1) Batches already on the device: the compute alone. 2) As the training loop feeds it: host batches copied
    # to the device ahead in a background thread (data.prefetch_to_device). 3) The host batch copied in the loop.
    device_step_s = timed(lambda: (on_device[i % 2] for i in range(args.steps)))
    prefetch_step_s = timed(lambda: trainer.device_batches(host_batches(), ahead=args.ahead))
    step_s = timed(lambda: (trainer.global_batch(b) for b in host_batches()))
    more_ahead = {n: timed(lambda n=n: trainer.device_batches(host_batches(), ahead=n)) for n in args.more_ahead}

    f = flops.train_step_flops(cfg, args.batch, args.method)
    achieved = f["total"] / prefetch_step_s / 1e12
    # The most any device held (with FSDP the devices' shares differ slightly).
    mems = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    mem = max((m for m in mems if m is not None), default=None)
    remat = f"True ({cfg.model.remat_policy})" if cfg.model.remat else "False"
    print(f"device: {jax.device_count()} x {kind} ({jax.default_backend()}); preset {args.preset}, method "
          f"{args.method}, batch {args.batch}, dtype {cfg.model.dtype}, remat {remat}, attention "
          f"{cfg.model.attention}, GELU {args.gelu}, input {tuple(cfg.model.input_zyx)}, patch "
          f"{tuple(cfg.model.vision.patch_zyx)}, text_len {cfg.prep.text_len}"
          + (f" (per anatomy {trainer.text_lengths})" if trainer.text_lengths and args.method == "fvlm" else ""))
    if fused is not None:
        print(f"fused cuDNN attention calls in the step (forward + backward): {fused}")
    print(f"compile + first step: {compile_s:.1f} s")
    loop_feed = (f"host batches prefetched to the device, ahead {args.ahead}" if args.ahead > 0
                 else "host batch copied in the loop, as ahead=0 does")
    feeds = {"host batch copied in the loop": step_s, f"{loop_feed} (training loop)": prefetch_step_s,
             **{f"host batches prefetched to the device, ahead {n}": t for n, t in more_ahead.items()},
             "batch already on the device": device_step_s}
    for label, t in feeds.items():
        print(f"step time: {t * 1e3:.1f} ms   volumes/s: {args.batch / t:.1f}   ({label})")
    print(f"model FLOPs/step: {f['total'] / 1e12:.3f} TFLOP (vision {f['vision'] / f['total']:.0%}, text "
          f"{f['text'] / f['total']:.0%})   achieved: {achieved:.2f} TFLOP/s (prefetched)")
    if peak:  # the step runs on every device of the mesh: MFU against all of their peak
        n = jax.device_count()
        print("MFU: " + ", ".join(f"{f['total'] / t / 1e12 / (peak * n):.1%} ({label.split(' (')[0]})"
                                  for label, t in feeds.items()) + f" of {n} x {peak:.0f} TFLOP/s")
    else:
        print("MFU: no peak known for this device (pass --peak_tflops)")
    if mem is not None:
        print(f"peak device memory: {mem / 2**30:.2f} GiB (the largest of {len(mems)} local devices)")
    print(f"peak host RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    assert np.isfinite(float(last["metrics"]["loss"]))
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for batch in trainer.device_batches((batches[i % 2] for i in range(3)), ahead=args.ahead):
                metrics = trainer.step_on_device(batch)
            jax.block_until_ready(metrics)
        print(f"profile of 3 steps written under {args.profile} (python bench/trace_summary.py {args.profile})")


def memory_gib(compiled) -> dict:
    """XLA's memory analysis of a compiled step in GiB: arguments, temporaries and the peak estimate (arguments +
    outputs - aliased + temporaries)."""
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"arguments": m.argument_size_in_bytes / 2**30, "temporaries": m.temp_size_in_bytes / 2**30,
            "peak": peak / 2**30}


def compare_coteach(cfg, args, batches, kind) -> None:
    """Plain step vs the co-teaching step (fVLM) in one process: XLA's memory analysis of each compiled step and,
    unless --memory_only, seconds per step on batches already on the device (the median of 3 passes of --steps
    steps, after one untimed step), then the ratios."""
    res = {}
    for name, coteach in (("plain", False), ("co-teaching", True)):
        c = cfg.copy_and_resolve_references()
        c.loss.coteach = coteach
        trainer = train.Trainer(c, "fvlm", sharding.make_mesh(c))
        on_device = [trainer.global_batch(b) for b in batches]
        t0 = time.perf_counter()
        with jax.set_mesh(trainer.mesh):
            compiled = trainer.step_fn.lower(trainer.state, on_device[0]).compile()
        res[name] = {**memory_gib(compiled), "compile_s": time.perf_counter() - t0}
        if not args.memory_only:
            jax.block_until_ready(trainer.step_on_device(on_device[0]))
            passes = []
            for _ in range(3):
                t0 = time.perf_counter()
                for i in range(args.steps):
                    metrics = trainer.step_on_device(on_device[i % 2])
                jax.block_until_ready(metrics)
                passes.append((time.perf_counter() - t0) / args.steps)
            res[name]["step_s"] = float(np.median(passes))
            assert np.isfinite(float(metrics["loss"]))
        del trainer, on_device, compiled
    print(f"{kind} ({jax.default_backend()}) x {jax.device_count()}: preset {args.preset}, fVLM, batch {args.batch}, "
          f"dtype {cfg.model.dtype}, remat {cfg.model.remat}; co-teaching vs plain step")
    for name, r in res.items():
        line = (f"{name}: XLA memory analysis per device: arguments {r['arguments']:.3f} GiB, temporaries "
                f"{r['temporaries']:.3f} GiB, peak estimate {r['peak']:.3f} GiB; compiled in {r['compile_s']:.0f} s")
        if "step_s" in r:
            line += f"; step {r['step_s'] * 1e3:.1f} ms ({args.batch / r['step_s']:.1f} volumes/s)"
        print(line)
    a, b = res["co-teaching"], res["plain"]
    print("ratio co-teaching / plain: " + ", ".join(
        f"{k} {a[k] / b[k]:.2f}x" for k in ("step_s", "peak", "arguments", "temporaries") if k in a and b[k]))


if __name__ == "__main__":
    main()
