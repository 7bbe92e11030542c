#!/usr/bin/env bash
# GPU figures for the fused output pass (never needed for CI; a few minutes on one CUDA GPU):
#   1. the loss benchmark at 4096 tokens x 128,256 vocabulary in bf16, student hidden 2048, teacher 3072
#      (Llama 3.2 1B / 3B widths): plain full logits, torchtune's chunked forward KL, ours chunked and fused;
#   2. the recipe benchmark in bf16 on the GPU (teacher 4 x 3072, LoRA student 2 x 2048, batch 16 x ~256 tokens =
#      ~4096 tokens per step), ours against torchtune 0.6.1's recipe, unfused and fused.
# Usage (from the repository root, after `make setup`):  bash scripts/gpu_bench.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKDIR=${1:-cache/gpu_bench}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench.sh needs a CUDA GPU; on CPU run scripts/bench_losses.py and scripts/bench_recipe.py"
    exit 1
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

echo "== 1. losses: 4096 tokens x 128256, bf16, dims 2048 / 3072 =="
"$PY" scripts/bench_losses.py --device cuda --dtype bf16 --cases 4096x128256 --dim 2048 --teacher-dim 3072 \
    --repeats 3 --rounds 2 --methods torchtune_forward_kl_chunked,full_logits_torch_kl_div,full_logits_torch_jsd,ours_forward_kl_chunked,ours_jsd_chunked,ours_fused_forward_kl,ours_fused_jsd

echo "== 2. recipe: bf16 on the GPU, teacher 4x3072, LoRA student 2x2048, batch 16 =="
"$PY" scripts/bench_recipe.py --device cuda --dtype bf16 --vocab 128256 --student-dim 2048 --teacher-dim 3072 \
    --batch-size 16 --rounds 2 --steps 8 --workdir "$WORKDIR"
