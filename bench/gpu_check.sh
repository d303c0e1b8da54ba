#!/usr/bin/env bash
# The issue-4 GPU figures in one short run (no TensorFlow needed): the paper-size train step in bf16 (step time,
# volumes/s, MFU, peak device memory at 14 volumes per device, with and without rematerialisation) and the image
# encoder's step in JAX bf16 against MONAI's ViT in PyTorch fp32 (the public recipe) on the same card.
#
#   bash bench/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT, else ./gpu_check_out
#
# Needs jax[cuda], flax, optax, orbax-checkpoint, ml-collections and tqdm; torch + monai for the comparison (a
# missing torch/monai only fails that part). Install torch before jax[cuda], or check `pip check` afterwards: torch
# can pull a cuDNN that JAX's GPU backend rejects. Parts run most important first, each with its own timeout, and
# the whole script keeps within a budget of GPU_CHECK_BUDGET seconds (default 540, for the device tool's 600 s call
# with the wheel install before it): a part is cut short or skipped when the budget runs out. Each paper-size train
# step takes about 100-120 s to import, trace, compile and run (each feed is timed twice, the first pass a warm-up);
# a part that breaks fails in seconds. Every figure is printed with the card's name; keep them
# together. The profiled step's Perfetto trace is left in OUTDIR (open it in ui.perfetto.dev, or
# `python bench/trace_summary.py OUTDIR/perfetto_trace.json.gz`).
#
# GPU_CHECK_PARTS picks parts by name (default: all but flags and feed, in this order): attention profile vs_pytorch remat
# flags gelu encode xla_attention feed. "flags" compares XLA GPU flags on the paper-size step, one process each; "gelu"
# runs that step with the GELU's intermediates stored (autodiff of jax.nn.gelu), the A/B of the model's recomputed
# GELU, whose own figures are the profile part's. "feed" (bench/feed_check.py) times the step's input feeds step by
# step: the wait for each batch, the step call's return, each copy.
# The profile part also dumps the step's optimized HLO, so trace_summary.py sums the time per model part.
#
# On the device tool's H200 (jax 0.11.2, flax 0.12.10, torch 2.11 there; ml-collections and monai carried as wheels
# in .whl/, see the tool's README): install them with pip --target /tmp/site, export PYTHONPATH=/tmp/site, then
# `bash bench/gpu_check.sh $OUT`.
set -uo pipefail
PY=${PYTHON:-python3}
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
# Runs one part with at most LIMIT seconds, fewer if the budget (GPU_CHECK_BUDGET, default 540 s for the whole
# script) is nearly spent; skips it when under 30 s are left, so the script ends inside one 600 s device call.
budget=${GPU_CHECK_BUDGET:-540}
part() {
  local limit=$1; shift
  local left=$((budget - SECONDS))
  if ((left < 30)); then echo "(skipped: ${left} s of the ${budget} s budget left)"; return; fi
  timeout -k 5 $((limit < left ? limit : left)) "$@"
}
parts=" ${GPU_CHECK_PARTS:-attention profile vs_pytorch remat gelu encode xla_attention} "
want() { [[ $parts == *" $1 "* ]]; }
{
  date -u
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
  timeout 60 $PY -c "import jax, flax, optax, importlib.metadata as m; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', m.version('orbax-checkpoint'), \
jax.devices())"
  if want attention; then
    echo "== cuDNN fused attention: chosen by 'auto'? same values and gradients as XLA?"
    part 60 $PY bench/gpu_attention_check.py
  fi
  if want profile; then
    echo "== train step, paper preset (config default: no remat), batch 14, bf16, with a profile of 3 steps"
    XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$out/hlo --xla_dump_hlo_module_re=.*step_fn.*" \
      part 170 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --steps=10 --profile="$out/prof"
    part 60 $PY bench/trace_summary.py "$out/prof" --top=30 --rows=3 --hlo="$out/hlo"
    find "$out/prof" -name perfetto_trace.json.gz -exec cp {} "$out/" \; 2>/dev/null; rm -rf "$out/prof"
    find "$out/hlo" -name "*step_fn*after_optimizations.txt" -exec gzip -c {} \; > "$out/step_hlo.txt.gz" 2>/dev/null
    rm -rf "$out/hlo"
  fi
  if want vs_pytorch; then
    echo "== image encoder: JAX bf16 vs MONAI ViT PyTorch fp32"
    part 110 $PY bench/vs_pytorch.py --size=paper --batch=14 --jax_dtype=bfloat16 --torch_device=cuda --rounds=3 \
      --steps=5
  fi
  if want remat; then
    echo "== train step, paper preset, batch 14, bf16, remat (nothing_saveable)"
    part 140 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --remat --steps=10
  fi
  if want flags; then
    echo "== train step, paper preset, batch 14, bf16: XLA GPU flag variants (one process each)"
    for flags in ${GPU_CHECK_FLAGS:-none --xla_gpu_enable_cublaslt=true --xla_gpu_enable_command_buffer= \
                 --xla_gpu_enable_cudnn_layer_norm=true}; do
      [[ $flags == none ]] && flags=""
      echo "-- XLA_FLAGS='${flags}' ($((budget - SECONDS)) s of the budget left)"
      XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flags" part "${GPU_CHECK_FLAG_LIMIT:-140}" $PY bench/train_step.py \
        --preset=paper --batch=14 --dtype=bfloat16 --steps=10 > "$out/flags.log" 2>&1
      echo "   exit $?"
      grep -E "step time|MFU|compile|peak device|fused" "$out/flags.log" || tail -n 3 "$out/flags.log"
    done
  fi
  if want gelu; then
    echo "== train step, paper preset (no remat), batch 14, bf16, GELU intermediates stored (A/B of the recomputed GELU)"
    part 140 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --steps=10 --gelu=store
  fi
  if want encode; then
    echo "== zero-shot evaluation's image encoding, paper preset, batch 14, bf16: copy in the loop vs copied ahead"
    part 90 $PY bench/encode.py --preset=paper --batch=14 --dtype=bfloat16 --batches=10 --rounds=3
  fi
  if want xla_attention; then
    echo "== train step, paper preset, batch 14, bf16, no remat, XLA attention (A/B of the cuDNN kernel; with remat"
    echo "   it had not reached its first timed step after 100 s on an H200)"
    part 160 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --no-remat --steps=10 --attention=xla
  fi
  if want feed; then
    echo "== the paper step's input feeds, step by step (bench/feed_check.py)"
    part 180 $PY bench/feed_check.py --preset=paper --batch=14 --dtype=bfloat16 --steps=20
  fi
  echo "gpu_check: done in ${SECONDS} s"
} 2>&1 | tee "$out/gpu_check.txt"
