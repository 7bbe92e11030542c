#!/usr/bin/env bash
# The on-policy grid of the README's "On-policy distillation" section, and the files in this folder.
#   bash docs/on_policy/command.sh       # 18 cells (CE-only, off-policy forward KL, on-policy reverse KL and
#                                        # generalized JSD at lambda 0.5 and 1; 3 seeds each), about 70-80 min on 2 cores
# Resumable: finished cells (<out>/cells/*/result.json) are skipped, so rerunning finishes an interrupted grid.
set -euo pipefail
cd "$(dirname "$0")/../.."
export KD_DEMO_CACHE=$PWD/cache/smollm2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
PY=.venv/bin/python
DOCS=docs/on_policy
OUT=outputs/on_policy_20L

# The teacher, the text and the pruned 20-layer student of the recovery grid (each step skipped when done).
$PY scripts/prepare_smollm2.py cache/smollm2
$PY scripts/prune.py --config configs/demo_smollm2.yaml --calibration cache/smollm2/text/train.json \
    --num-layers 20 --out cache/smollm2/student_20L_bi

# KD only (ce 0 / kd 1), no IR, 20 steps on the first 480 training samples, trained on the responses (the prompt is
# the alpaca instruction and input: train_on_input=False for every cell, so that all settings see the same prompts);
# on-policy cells sample up to 32 new tokens at temperature 1. Held-out: perplexity, KL and agreement on the demo's
# held-out text, and the on-policy metrics on 16 validation prompts (the student's samples, scored by the teacher).
$PY scripts/experiment.py --config configs/demo_smollm2.yaml --heldout cache/smollm2/text/heldout.txt \
    --divergences forward_kl,reverse_kl@0.5,reverse_kl@1,gkd_jsd@0.5,gkd_jsd@1 --ir off --seeds 0,1,2 --steps 20 \
    --scales 0,1,0 --eval-seq-len 96 --eval-windows 24 \
    --onpolicy-eval-data cache/smollm2/text/validation.json --onpolicy-eval-prompts 16 --onpolicy-eval-new-tokens 32 \
    --out $OUT "$@" \
    model.num_layers=20 checkpointer.checkpoint_dir=$PWD/cache/smollm2/student_20L_bi 'dataset.split=train[:480]' \
    dataset.train_on_input=False on_policy.max_new_tokens=32
cp $OUT/summary.md $OUT/results.csv $DOCS/
