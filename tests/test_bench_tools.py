"""bench/trace_summary.py: reads the Perfetto trace jax.profiler writes, and sums op time per device row."""

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "bench" / "trace_summary.py")
trace_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_summary)


def test_summary_prefers_device_rows_and_sums_durations(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "XLA Ops"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    ops = [("fusion.1", 30.0), ("fusion.2", 10.0), ("custom-call.3", 60.0), ("fusion.1", 30.0)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": i * 100, "dur": d}
                     for i, (n, d) in enumerate(ops)]
    events += [{"ph": "X", "pid": 2, "tid": 1, "name": "python", "ts": 0, "dur": 1e6},
               {"ph": "i", "pid": 1, "tid": 7, "name": "marker", "ts": 5}]  # instant events carry no duration
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    _, ev, procs, threads = trace_summary.load_events(tmp_path)
    rows = trace_summary.summarise(ev, procs, threads)
    assert list(rows) == [("/device:GPU:0", "XLA Ops")]  # the host row is left out when a device row exists
    ops, busy = rows[("/device:GPU:0", "XLA Ops")]
    assert ops == {"fusion.1": 60.0, "fusion.2": 10.0, "custom-call.3": 60.0}
    assert busy == 130.0
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_summary.py"), str(path), "--steps=2"],
                         capture_output=True, text=True, check=True).stdout
    assert "busy 0.07 ms per step" in out  # 130 µs over 2 steps
    assert "by kind: fusion 54%, custom-call 46%" in out


def test_busy_time_counts_nested_and_overlapping_events_once():
    assert trace_summary.union_length([]) == 0
    assert trace_summary.union_length([(0, 10), (2, 5), (8, 12), (20, 25)]) == 17  # [0, 12) and [20, 25)
    assert trace_summary.union_length([(5, 6), (0, 1)]) == 2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the host-row fallback is what XLA:CPU traces have")
def test_summary_of_a_real_profile(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((256, 256))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            f(x).block_until_ready()
    path, ev, procs, threads = trace_summary.load_events(tmp_path)
    assert path.name == "perfetto_trace.json.gz"
    rows = trace_summary.summarise(ev, procs, threads)
    assert rows and all(busy > 0 and sum(ops.values()) >= busy - 1e-3 for ops, busy in rows.values())
    assert any("/host:" in proc for proc, _ in rows)  # no device rows on XLA:CPU: the host rows are shown
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no perfetto_trace"):
        trace_summary.load_events(tmp_path / "empty")
    with pytest.raises(SystemExit, match="does not exist"):
        trace_summary.load_events(tmp_path / "nothing")
