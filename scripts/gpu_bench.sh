#!/usr/bin/env bash
# GPU figures for the fused output pass and the recipe benchmark (never needed for CI), in one command:
#   1. the loss benchmark at 4096 tokens x 128,256 vocabulary in bf16, student hidden 2048, teacher 3072
#      (Llama 3.2 1B / 3B widths): plain full logits, torchtune's chunked forward KL, ours chunked and fused;
#   2. the recipe benchmark in bf16 on the GPU (teacher 4 x 3072, LoRA student 2 x 2048, batch 16 x ~256 tokens),
#      ours (the default path, and unfused) against torchtune 0.6.1's recipe at vocabularies 32,000, 49,152,
#      128,256 and 151,936, with the cost curve drawn to $WORKDIR/bench_recipe_vocab.png;
#   3. the same against sequence length (128, 256, 512 tokens per sample) at 128,256, drawn to bench_recipe_seq.png.
# Usage (from the repository root, after `make setup`):
#   bash scripts/gpu_bench.sh [WORKDIR]            # on a CUDA GPU
#   bash scripts/gpu_bench.sh --dry-run [WORKDIR]  # anywhere: builds and checks every config of the matrix, runs nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
WORKDIR=${1:-cache/gpu_bench}
VOCABS=32000,49152,128256,151936
SEQ_LENS=128,256,512
ROUNDS=2
STEPS=8
RECIPE=(--device cuda --dtype bf16 --student-dim 2048 --teacher-dim 3072 --batch-size 16 --steps "$STEPS" --rounds "$ROUNDS")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline

# Runs: 4 vocabularies x 5 variants + 3 lengths x 3 variants, each $ROUNDS times, plus the loss benchmark.
RUNS=$(( (4 * 5 + 3 * 3) * ROUNDS ))
echo "gpu_bench.sh: $RUNS recipe runs of $STEPS steps + the loss benchmark; expect about $(( RUNS * 40 / 60 + 5 )) minutes on one H100-class GPU"

if [[ $DRY_RUN == 1 ]]; then
    "$PY" scripts/bench_recipe.py "${RECIPE[@]}" --vocabs "$VOCABS" --workdir "$WORKDIR/vocab" --dry-run
    "$PY" scripts/bench_recipe.py "${RECIPE[@]}" --vocabs 128256 --seq-lens "$SEQ_LENS" --variants upstream,ours_fkl,ours_seed \
        --workdir "$WORKDIR/seq" --dry-run
    echo "gpu_bench.sh --dry-run: every config checks; nothing ran"
    exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench.sh needs a CUDA GPU (or --dry-run); on CPU run scripts/bench_losses.py and scripts/bench_recipe.py"
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
started=$SECONDS

echo "== 1. losses: 4096 tokens x 128256, bf16, dims 2048 / 3072 =="
"$PY" scripts/bench_losses.py --device cuda --dtype bf16 --cases 4096x128256 --dim 2048 --teacher-dim 3072 \
    --repeats 3 --rounds 2 --methods torchtune_forward_kl_chunked,full_logits_torch_kl_div,full_logits_torch_jsd,ours_forward_kl_chunked,ours_jsd_chunked,ours_fused_forward_kl,ours_fused_jsd

echo "== 2. recipe against vocabulary size, bf16 on the GPU =="
"$PY" scripts/bench_recipe.py "${RECIPE[@]}" --vocabs "$VOCABS" --workdir "$WORKDIR/vocab" \
    --json "$WORKDIR/bench_recipe_vocab.json" --plot "$WORKDIR/bench_recipe_vocab.png"

echo "== 3. recipe against sequence length at vocab 128256 =="
"$PY" scripts/bench_recipe.py "${RECIPE[@]}" --vocabs 128256 --seq-lens "$SEQ_LENS" --variants upstream,ours_fkl,ours_seed \
    --workdir "$WORKDIR/seq" --json "$WORKDIR/bench_recipe_seq.json" --plot "$WORKDIR/bench_recipe_seq.png"
echo "gpu_bench.sh: done in $(( (SECONDS - started) / 60 )) min"
