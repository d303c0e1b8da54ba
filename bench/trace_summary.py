"""Where a profiled step's time goes: the busiest ops of a `jax.profiler` Perfetto trace, per timeline row.

  python bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --profile=/tmp/prof   # on the device
  python bench/trace_summary.py /tmp/prof [--top=20] [--steps=3]

Reads the newest `perfetto_trace.json.gz` under the directory (or the file given). For each timeline row of a
device (rows of processes named like /device:GPU:0 or /device:TPU:0; host rows when there is no device, as on
XLA:CPU), prints the busy time per step and the ops that take most of it, so an MFU shortfall can be traced to
kernels (matmuls, fused attention, elementwise fusions, copies) without TensorBoard.
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
    module event around its ops) count once; the per-op totals do count nested time in each op."""
    ops: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    spans: dict[tuple[str, str], list] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        row = (procs.get(e["pid"], str(e["pid"])), threads.get((e["pid"], e["tid"]), str(e["tid"])))
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path, help="profile directory or perfetto_trace.json.gz")
    ap.add_argument("--top", type=int, default=20, help="ops shown per row")
    ap.add_argument("--rows", type=int, default=4, help="busiest rows shown")
    ap.add_argument("--steps", type=int, default=3, help="steps in the trace (times are per step)")
    args = ap.parse_args()
    path, events, procs, threads = load_events(args.trace)
    rows = summarise(events, procs, threads)
    print(f"{path}: {len(events)} events, {len(rows)} rows; times per step (of {args.steps})")
    for (proc, row), (ops, busy) in sorted(rows.items(), key=lambda kv: -kv[1][1])[:args.rows]:
        total = sum(ops.values())
        print(f"\n{proc} / {row}: busy {busy / args.steps / 1e3:.2f} ms per step, {len(ops)} distinct ops "
              "(shares below: of the summed op time)")
        for name, us in ops.most_common(args.top):
            print(f"  {us / args.steps / 1e3:8.3f} ms  {us / total:6.1%}  {name[:110]}")
        kinds = collections.Counter()
        for name, us in ops.items():  # fusion.12, fusion.345 -> fusion
            kinds[re.sub(r"[._]\d+$", "", name)] += us
        print("  by kind: " + ", ".join(f"{k[:40]} {us / total:.0%}" for k, us in kinds.most_common(8)))


if __name__ == "__main__":
    main()
