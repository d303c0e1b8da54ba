"""Where a profiled step's time goes: the busiest ops of a `jax.profiler` Perfetto trace, per timeline row.

  python bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --profile=/tmp/prof   # on the device
  python bench/trace_summary.py /tmp/prof [--top=20] [--steps=3] [--hlo=DUMP_DIR]

Reads the newest `perfetto_trace.json.gz` under the directory (or the file given). For each timeline row of a
device (rows of processes named like /device:GPU:0 or /device:TPU:0; host rows when there is no device, as on
XLA:CPU), prints the busy time per step and the ops that take most of it, so an MFU shortfall can be traced to
kernels (matmuls, fused attention, elementwise fusions, copies) without TensorBoard.

With --hlo (the step's optimized HLO text, or an `XLA_FLAGS=--xla_dump_to=DIR` directory holding it), each op is
traced back to its `op_name` metadata and the time is also summed per model part: the named scopes of the model and
train step (vision, anatomy_pool, text, loss, augment, optimizer), forward and backward apart.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path


def load_events(path: Path):
    if not path.exists():
        raise SystemExit(f"{path} does not exist: give the --profile directory or a perfetto_trace.json.gz")
    if path.is_dir():
        traces = sorted(path.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
        if not traces:
            raise SystemExit(f"no perfetto_trace.json.gz under {path} (profile with create_perfetto_trace=True)")
        path = traces[-1]
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    return path, events, procs, threads


def summarise(events, procs, threads):
    """{(process, row): (Counter(op name -> total µs), busy µs)} over complete ('X') events; device rows only, if
    the trace has any. Busy time is the union of the row's event intervals, so nested events (host rows, or a
    module event around its ops) count once; the per-op totals do count nested time in each op, except a CUDA
    graph's span (`command_buffer_N`), whose kernels are events of their own and counted as such."""
    ops: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    spans: dict[tuple[str, str], list] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        row = (procs.get(e["pid"], str(e["pid"])), threads.get((e["pid"], e["tid"]), str(e["tid"])))
        if not e["name"].startswith("command_buffer"):
            ops[row][e["name"]] += float(e["dur"])
        spans[row].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    rows = {row: (ops[row], union_length(spans[row])) for row in ops}
    device = {k: v for k, v in rows.items() if "/device:" in k[0]}
    return device or rows


def union_length(intervals) -> float:
    """Total length covered by [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


SCOPES = ("vision", "anatomy_pool", "text", "loss", "augment", "optimizer")
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"')


def hlo_op_names(path: Path) -> dict[str, str]:
    """{instruction name -> op_name metadata} of an optimized HLO module (a file, or the newest
    `*step_fn*after_optimizations.txt` of a dump directory). Names are also keyed with '.' and '-' as '_', the form
    kernel names take."""
    if path.is_dir():
        found = sorted(path.rglob("*step_fn*after_optimizations.txt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise SystemExit(f"no *step_fn*after_optimizations.txt under {path}")
        path = found[-1]
    opener = gzip.open if path.suffix == ".gz" else open
    names = {}
    with opener(path, "rt") as f:
        for line in f:
            m = _INSTR.match(line)
            if m:
                names[m.group(1)] = m.group(2)
                names.setdefault(re.sub(r"[.\-]", "_", m.group(1)), m.group(2))
    return names


def scope_of(op_name: str) -> str:
    """'jit(step_fn)/transpose(jvp(vision))/dot_general' -> 'vision backward'; the first named scope of SCOPES on
    the path, 'backward' where a transpose wraps it (autodiff's backward pass); 'other' when there is none."""
    for part in op_name.split("/"):
        backward = False
        while (m := re.fullmatch(r"(\w+)\((.*)\)", part)):
            backward |= m.group(1) == "transpose"
            part = m.group(2)
        if part in SCOPES:
            return part if part in ("optimizer", "augment") else f"{part} {'backward' if backward else 'forward'}"
    return "other"


def kernel_kind(name: str) -> str:
    """A kernel's (or XLA op's) kind from its name: collective, cuDNN attention, matmul, reduction fusion,
    elementwise fusion, fusion (a bare `fusion.N`, whose kind the name does not tell), copy, other."""
    low = name.lower()
    if any(k in low for k in ("nccl", "all-reduce", "all_reduce", "allreduce", "all-gather", "all_gather",
                              "reduce-scatter", "reduce_scatter", "all-to-all", "collective-permute")):
        return "collective"
    if any(k in low for k in ("sdpa", "fmha", "flash", "compute_dot_do_o")):
        return "attention (cuDNN)"
    if (re.match(r"(nvjet|sm\d+_xmma|cutlass|ampere_|hopper_|cublas|dot[._]|dot$|dot_general|convolution|ynn_|"
                 r"xnn_|onednn)", low) or "gemm" in low):
        return "matmul"
    if "memcpy" in low or "memset" in low:
        return "copy"
    if re.match(r"fusion[._]?\d*$", low):
        return "fusion"
    if "reduce" in low and "reduce_precision" not in low:
        return "reduction fusion"
    if "fusion" in low or low.startswith(("wrapped_", "loop_", "input_")):
        return "elementwise fusion"
    return "other"


def event_hlo_name(e) -> str:
    """The HLO instruction an event ran: its 'hlo_op' argument where that names one op (not a command buffer, a
    CUDA graph of many ops), else the event's name (kernel names are HLO fusion names with '.' as '_')."""
    op = str((e.get("args") or {}).get("hlo_op") or "")
    return op if op and not op.startswith("command_buffer") else e["name"]


def by_part(events, procs, threads, row, names):
    """Time per model part (µs) on one timeline row, and per (part, kernel kind).

    A fusion counts for the part its root op belongs to, so work XLA fuses across parts (a gradient finished inside
    the optimizer's update kernel) counts for one of them. Library kernels (cuBLAS, cuDNN) launched inside a CUDA
    graph carry no HLO name: '(library kernel in a CUDA graph)'. Other events without an HLO op (copies, host or
    runtime events) are '(not an HLO op)'."""
    per, per_kind = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or e["name"].startswith("command_buffer"):
            continue
        if (procs.get(e["pid"], str(e["pid"])), threads.get((e["pid"], e["tid"]), str(e["tid"]))) != row:
            continue
        name = event_hlo_name(e)
        op = names.get(name) or names.get(re.sub(r"[.\-]", "_", name))
        if op is not None:
            part = scope_of(op)
        elif str((e.get("args") or {}).get("hlo_op", "")).startswith("command_buffer"):
            part = "(library kernel in a CUDA graph)"
        else:
            part = "(not an HLO op)"
        per[part] += float(e["dur"])
        per_kind[(part, kernel_kind(e["name"]))] += float(e["dur"])
    return per, per_kind


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path, help="profile directory or perfetto_trace.json.gz")
    ap.add_argument("--top", type=int, default=20, help="ops shown per row")
    ap.add_argument("--rows", type=int, default=4, help="busiest rows shown")
    ap.add_argument("--steps", type=int, default=3, help="steps in the trace (times are per step)")
    ap.add_argument("--hlo", type=Path, default=None,
                    help="the step's optimized HLO (file or XLA dump directory): also sum the time per model part")
    args = ap.parse_args()
    path, events, procs, threads = load_events(args.trace)
    rows = summarise(events, procs, threads)
    names = hlo_op_names(args.hlo) if args.hlo else None
    arg_keys = collections.Counter(k for e in events if e.get("ph") == "X" for k in (e.get("args") or {}))
    print(f"event argument keys: {', '.join(k for k, _ in arg_keys.most_common(12)) or 'none'}")
    print(f"{path}: {len(events)} events, {len(rows)} rows; times per step (of {args.steps})")
    for (proc, row), (ops, busy) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:args.rows]:
        total = sum(ops.values())
        print(f"\n{proc} / {row}: busy {busy / args.steps / 1e3:.2f} ms per step, {len(ops)} distinct ops "
              "(shares below: of the summed op time)")
        for name, us in ops.most_common(args.top):
            print(f"  {us / args.steps / 1e3:8.3f} ms  {us / total:6.1%}  {name[:110]}")
        kinds = collections.Counter()
        for name, us in ops.items():
            if not name.startswith("command_buffer"):  # a CUDA graph's span: its kernels are counted themselves
                kinds[kernel_kind(name)] += us
        kinds_total = sum(kinds.values()) or 1.0
        print("  by kernel kind: " + ", ".join(f"{k} {us / args.steps / 1e3:.2f} ms ({us / kinds_total:.0%})"
                                               for k, us in kinds.most_common()))
        if names is not None:
            per, per_kind = by_part(events, procs, threads, (proc, row), names)
            print("  by model part (kernel time per step; forward/backward from autodiff's transpose):")
            for part, us in sorted(per.items(), key=lambda kv: -kv[1]):
                split = ", ".join(f"{k} {v / args.steps / 1e3:.2f}" for (p, k), v in per_kind.most_common()
                                  if p == part)
                print(f"  {us / args.steps / 1e3:8.3f} ms  {us / kinds_total:6.1%}  {part}  ({split})")


if __name__ == "__main__":
    main()
