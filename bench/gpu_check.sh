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
# at most ~9 minutes, inside the device tool's 10-minute call (a part that breaks fails in seconds). Every figure is
# printed with the card's name; keep them together.
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
  echo "== train step, paper preset, batch 14, bf16, remat (nothing_saveable)"
  timeout -k 10 100 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --remat --steps=5
  echo "== image encoder: JAX bf16 vs MONAI ViT PyTorch fp32"
  timeout -k 10 100 $PY bench/vs_pytorch.py --size=paper --batch=14 --jax_dtype=bfloat16 --torch_device=cuda \
    --rounds=3 --steps=5
  echo "== train step, paper preset, batch 14, bf16, no remat"
  timeout -k 10 80 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --no-remat --steps=5
  echo "== train step, paper preset, batch 14, bf16, remat saving the weight matmuls (dots_with_no_batch_dims_saveable)"
  timeout -k 10 80 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --remat --steps=5 \
    --remat_policy=dots_with_no_batch_dims_saveable
  echo "== train step, paper preset, batch 14, bf16, remat, XLA attention (A/B of the cuDNN kernel)"
  timeout -k 10 70 $PY bench/train_step.py --preset=paper --batch=14 --dtype=bfloat16 --remat --steps=5 \
    --attention=xla
} 2>&1 | tee "$out/gpu_check.txt"
