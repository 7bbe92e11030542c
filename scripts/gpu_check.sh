#!/usr/bin/env bash
# Multi-GPU check (needs >= 2 CUDA GPUs; never needed for CI, which runs the same checks on CPU with gloo):
#   1. the distributed recipe against the single-device one on the tiny stand-ins, 2 GPUs vs 1, bf16;
#   2. a few steps of configs/distributed_3B_to_1B.yaml (real Llama 3.2 3B -> 1B shapes) on dummy weights,
#      printing every rank's peak memory and tokens/s.
# Usage (from the repository root, after `make setup`):  bash scripts/gpu_check.sh [WORKDIR]
# Takes a few minutes, most of it writing the dummy 3B and 1B checkpoints (~9 GB in bf16) to WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKDIR=${1:-cache/gpu_check}
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 2 ]; then
    echo "gpu_check.sh needs at least 2 CUDA GPUs (found $NGPU); on CPU run: $PY scripts/distributed_check.py equivalence"
    exit 1
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true

echo "== 1. equivalence: 2 GPUs vs 1, bf16 (tiny stand-ins) =="
"$PY" scripts/distributed_check.py equivalence --device cuda --dtype bf16 --nproc 2 --steps 4 --workdir "$WORKDIR"

echo "== 2. configs/distributed_3B_to_1B.yaml on 2 GPUs, dummy weights, bf16 =="
"$PY" scripts/distributed_check.py dummy --config configs/distributed_3B_to_1B.yaml --device cuda --dtype bf16 \
    --nproc 2 --steps 5 --workdir "$WORKDIR" batch_size=2 gradient_accumulation_steps=2
