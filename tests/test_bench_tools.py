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

from fvlm_jax import sharding

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
    assert "by kernel kind: fusion 0.04 ms (54%), other 0.03 ms (46%)" in out


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
    assert rows
    # Each row recounted from the raw events: op time summed per name, busy time as the elementary intervals
    # between all event boundaries that some event of the row covers.
    import numpy as np
    for row, (ops, busy) in rows.items():
        mine = [e for e in ev if e.get("ph") == "X" and "dur" in e and row == (
            procs.get(e["pid"], str(e["pid"])), threads.get((e["pid"], e["tid"]), str(e["tid"])))]
        want_ops = {}
        for e in mine:
            want_ops[e["name"]] = want_ops.get(e["name"], 0.0) + float(e["dur"])
        assert dict(ops) == pytest.approx(want_ops), row
        start = np.array([float(e["ts"]) for e in mine])
        end = start + np.array([float(e["dur"]) for e in mine])
        cuts = np.unique(np.concatenate([start, end]))
        covered = [bool(((start <= a) & (end >= b)).any()) for a, b in zip(cuts[:-1], cuts[1:])]
        assert busy > 0 and busy == pytest.approx(float(np.diff(cuts)[covered].sum()), rel=1e-9), row
    assert any("/host:" in proc for proc, _ in rows)  # no device rows on XLA:CPU: the host rows are shown
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no perfetto_trace"):
        trace_summary.load_events(tmp_path / "empty")
    with pytest.raises(SystemExit, match="does not exist"):
        trace_summary.load_events(tmp_path / "nothing")


def _instr(name: str, rest: str, op_name: str) -> str:
    return f'  {name} = {rest}, metadata={{op_name="{op_name}" stack_frame_id=1}}\n'


HLO = ("HloModule jit_step_fn, is_scheduled=true\nENTRY %main.1 (p: f32[4]) -> f32[4] {\n"
       + _instr("%input_add_reduce_fusion.106", "(bf16[112,3072]{1,0}) fusion(%a), kind=kInput, calls=%f.1",
                "jit(step_fn)/transpose(jvp(vision))/reduce_sum")
       + _instr("%loop_slice_fusion.11", "bf16[2]{0} fusion(%b), kind=kLoop, calls=%f.2",
                "jit(step_fn)/jvp(text)/slice")
       + _instr("ROOT %add_select_fusion.1", "s32[] fusion(%c), kind=kLoop, calls=%f.3",
                "jit(step_fn)/optimizer/jit(_where)/select_n")
       + _instr("%custom-call.7", 'f32[2] custom-call(%d), custom_call_target="__cublas$gemm"', "jit(step_fn)/sqrt")
       + "}\n")


def test_scope_of_names_the_model_part_and_the_pass():
    assert trace_summary.scope_of("jit(step_fn)/transpose(jvp(vision))/dot_general") == "vision backward"
    assert trace_summary.scope_of("jit(step_fn)/jvp(text)/vmap(jit(_where))/select_n") == "text forward"
    assert trace_summary.scope_of("jit(step_fn)/optimizer/mul") == "optimizer"
    assert trace_summary.scope_of("jit(step_fn)/checkpoint(jvp(anatomy_pool))/add") == "anatomy_pool forward"
    assert trace_summary.scope_of("jit(step_fn)/reduce_sum") == "other"
    assert trace_summary.scope_of("jit(step_fn)/visionary/add") == "other"  # whole path parts only


def test_kernel_kinds_from_names():
    kinds = {n: trace_summary.kernel_kind(n) for n in (
        "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "gemm_fusion_dot_general_536",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "input_add_reduce_fusion_106",
        "loop_convert_multiply_fusion_23", "wrapped_convert_5", "MemcpyH2D", "ThunkExecutor::Execute",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "all-reduce.3", "fusion.12", "dot.4", "ynn_fusion.317",
        "loop_reduce_precision_fusion_2")}
    assert list(kinds.values()) == ["matmul", "matmul", "attention (cuDNN)", "reduction fusion",
                                    "elementwise fusion", "elementwise fusion", "copy", "other", "collective",
                                    "collective", "fusion", "matmul", "matmul", "elementwise fusion"]


def test_kernels_are_traced_to_model_parts_through_the_hlo(tmp_path):
    (tmp_path / "module_0002.jit_step_fn.sm_9.0_gpu_after_optimizations.txt").write_text(HLO)
    names = trace_summary.hlo_op_names(tmp_path)
    assert names["loop_slice_fusion.11"] == "jit(step_fn)/jvp(text)/slice"
    assert names["loop_slice_fusion_11"] == names["loop_slice_fusion.11"]  # kernel-name form
    gz = tmp_path / "step_hlo.txt.gz"
    with gzip.open(gz, "wt") as f:
        f.write(HLO)
    assert trace_summary.hlo_op_names(gz) == names

    procs, threads = {1: "/device:GPU:0"}, {(1, 2): "Stream #14(Compute)"}
    cb = {"hlo_op": "command_buffer_1"}  # kernels inside a CUDA graph name the graph, not their op
    events = [{"ph": "X", "pid": 1, "tid": 2, "name": "command_buffer_1", "ts": 0, "dur": 100.0},
              {"ph": "X", "pid": 1, "tid": 2, "name": "input_add_reduce_fusion_106", "ts": 0, "dur": 30.0, "args": cb},
              {"ph": "X", "pid": 1, "tid": 2, "name": "loop_slice_fusion_11", "ts": 30, "dur": 10.0, "args": cb},
              {"ph": "X", "pid": 1, "tid": 2, "name": "nvjet_sm90_tst_NNT", "ts": 40, "dur": 50.0, "args": cb},
              {"ph": "X", "pid": 1, "tid": 2, "name": "anything", "ts": 90, "dur": 5.0,
               "args": {"hlo_op": "add_select_fusion.1"}},
              {"ph": "X", "pid": 1, "tid": 2, "name": "MemcpyH2D", "ts": 95, "dur": 2.0}]
    per, per_kind = trace_summary.by_part(events, procs, threads, ("/device:GPU:0", "Stream #14(Compute)"), names)
    assert per == {"vision backward": 30.0, "text forward": 10.0, "(library kernel in a CUDA graph)": 50.0,
                   "optimizer": 5.0, "(not an HLO op)": 2.0}
    assert per_kind[("(library kernel in a CUDA graph)", "matmul")] == 50.0
    ops, busy = trace_summary.summarise(events, procs, threads)[("/device:GPU:0", "Stream #14(Compute)")]
    assert "command_buffer_1" not in ops and busy == 100.0  # the graph's span: in the busy time, not an op


@pytest.mark.slow
def test_named_scopes_reach_the_compiled_step(tmp_path):
    """The model's named scopes are in the optimized HLO's op_name metadata that --hlo reads."""
    from configs import demo
    from fvlm_jax import synthetic, train

    cfg = demo.get_config("tiny")
    cfg.train.batch_size = 2
    trainer = train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg))
    batch = trainer.global_batch(synthetic.random_batch(cfg, 2, packed=True))
    with jax.set_mesh(trainer.mesh):
        text = trainer.step_fn.lower(trainer.state, batch).compile().as_text()
    (tmp_path / "jit_step_fn_after_optimizations.txt").write_text(text)
    parts = {trace_summary.scope_of(op) for op in trace_summary.hlo_op_names(tmp_path).values()}
    assert {"vision forward", "vision backward", "text forward", "text backward", "anatomy_pool forward",
            "optimizer", "augment"} <= parts


@pytest.mark.slow
def test_cpu_ops_jax_pieces_compute_what_they_are_named():
    """bench/cpu_ops.py's JAX side (its PyTorch side needs torch, not a dependency): each product piece is the
    named matmul, and the MLP chain's gradient matches central differences along a random direction."""
    import numpy as np
    from flax import nnx

    spec_ops = importlib.util.spec_from_file_location("cpu_ops", ROOT / "bench" / "cpu_ops.py")
    cpu_ops = importlib.util.module_from_spec(spec_ops)
    spec_ops.loader.exec_module(cpu_ops)
    pieces, _ = cpu_ops.jax_pieces(np.random.default_rng(0))
    expect = {"forward x W": lambda a, b: a @ b, "input grad dy W^T": lambda a, b: a @ b.T,
              "weight grad x^T dy": lambda a, b: a.T @ b, "logits Q K^T": lambda a, b: a @ b.transpose(0, 2, 1),
              "P V": lambda a, b: a @ b, "P^T dO": lambda a, b: a.transpose(0, 2, 1) @ b}
    checked = 0
    for name, (fn, args) in pieces.items():
        ref = next((f for key, f in expect.items() if name.endswith(key)), None)
        if ref is None:
            continue
        a, b = (np.asarray(x, np.float64) for x in args)
        np.testing.assert_allclose(np.asarray(fn(*args)), ref(a, b), rtol=2e-4, atol=2e-3, err_msg=name)
        checked += 1
    assert checked == 15

    fn, (params, x) = pieces["MLP chain, fvlm_jax layers (fwd + bwd)"]
    _, dx = fn(params, x)
    graphdef, _ = nnx.split(cpu_ops.JaxMlpChain(nnx.Rngs(0)), nnx.Param)
    model = nnx.merge(graphdef, params)
    loss = jax.jit(lambda x: jnp.sum(model(x) ** 2))
    v = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
    eps = 1e-2
    numeric = (float(loss(x + eps * v)) - float(loss(x - eps * v))) / (2 * eps)
    assert abs(float(jnp.vdot(dx, v)) - numeric) <= 2e-2 * abs(numeric)
