#!/usr/bin/env bash
# The issue-4 GPU figures in one short run (no TensorFlow needed): the paper-size train step in bf16 (step time,
# volumes/s, MFU, peak device memory at 14 volumes per device, with and without rematerialisation) and the image
# encoder's step in JAX bf16 against MONAI's ViT in PyTorch fp32 (the public recipe) on the same card.
#
#   bash bench/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT, else ./gpu_check_out
#
# Needs jax[cuda], flax, optax, orbax-checkpoint, ml-collections and tqdm; torch + monai for the comparison (a
# missing torch/monai only fails that part). Install torch before jax[cuda], or check `pip check` afterwards: torch
# can pull a cuDNN that JAX's GPU backend rejects. Each part has its own timeout, most important first; all together
# 8-10 minutes (each paper-size train step takes about 100 s to import, trace, compile and run), inside the device
# tool's 10-minute call; a part that breaks fails in seconds. Every figure is printed with the card's name; keep them
# together. The profiled step's Perfetto trace is left in OUTDIR (open it in ui.perfetto.dev, or
# `python bench/trace_summary.py OUTDIR/perfetto_trace.json.gz`).
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
{
  date -u
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
  timeout 60 $PY -c "import jax, flax, optax, orbax.checkpoint as o, importlib.metadata as m; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', m.version('orbax-checkpoint'), \
jax.devices())"
  echo "== cuDNN fused attention: chosen by 'auto'? same values and gradients as XLA?"
  timeout -k 10 60 $PY bench/gpu_attention_check.py
  echo "== train step, paper preset (config default: no remat), batch 14, bf16, with a profile of 3 steps"
  timeout -k 10 150 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --steps=5 --profile="$out/prof"
  timeout 60 $PY bench/trace_summary.py "$out/prof" --top=25 --rows=3
  find "$out/prof" -name perfetto_trace.json.gz -exec cp {} "$out/" \; ; rm -rf "$out/prof"
  echo "== image encoder: JAX bf16 vs MONAI ViT PyTorch fp32"
  timeout -k 10 110 $PY bench/vs_pytorch.py --size=paper --batch=14 --jax_dtype=bfloat16 --torch_device=cuda \
    --rounds=3 --steps=5
  echo "== train step, paper preset, batch 14, bf16, remat (nothing_saveable)"
  timeout -k 10 130 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --remat --steps=5
  echo "== train step, paper preset, batch 14, bf16, no remat, XLA attention (A/B of the cuDNN kernel; its compile"
  echo "   and run with remat did not finish in 100 s on an H200)"
  timeout -k 10 140 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --no-remat --steps=5 \
    --attention=xla
} 2>&1 | tee "$out/gpu_check.txt"
