#!/usr/bin/env bash
# DualParal on one lent GPU (under 8 minutes): block-wise vs full-sequence Wan2.1-1.3B forwards (random
# weights, bf16, 480x832, CFG batch 2) as the video grows: latency, peak memory, achieved TFLOP/s per
# block-step; then the same engine's N=1 layer pipeline against the reference on the GPU (bit for bit); then the
# real path: render_video on a random Wan2.1-1.3B folder at 77 and 237 frames, decode inline vs in its thread.
# Usage: bash scripts/gpu_check.sh [output dir]   (the table is also saved there as gpu_check.json / .log)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-outputs/gpu_check}}"
mkdir -p "$out"
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu_check.log"
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu_check.log"
timeout 480 "$PY" scripts/gpu_check.py --json "$out/gpu_check.json" 2>&1 | tee -a "$out/gpu_check.log"
