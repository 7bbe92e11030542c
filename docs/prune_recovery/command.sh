#!/usr/bin/env bash
# The recovery grid of the README's "Evidence" section, and the files in this folder.
#   bash docs/prune_recovery/command.sh           # live teacher: 27 cells, about 60 min on 2 cores
#   bash docs/prune_recovery/command.sh cached    # the same grid from a k=256 teacher cache for the cells without IR
#                                                 # (then compared with the live grid, paired by seed)
# Resumable: finished cells (<out>/cells/*/result.json) are skipped, so rerunning finishes an interrupted grid.
set -euo pipefail
cd "$(dirname "$0")/../.."
export KD_DEMO_CACHE=$PWD/cache/smollm2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
PY=.venv/bin/python
DOCS=docs/prune_recovery

# The teacher, the text, and the student: SmolLM2's 20 most influential layers (block influence on the training
# text). Each step is skipped when its output is already there.
$PY scripts/prepare_smollm2.py cache/smollm2
$PY scripts/prune.py --config configs/demo_smollm2.yaml --calibration cache/smollm2/text/train.json \
    --num-layers 20 --out cache/smollm2/student_20L_bi

# CE only and four divergences (ce 0 / kd 1), each with and without cosine IR (ir 1) on all 20 kept layers against
# the teacher layers they came from, seeds 0-2, 20 steps on the first 480 training samples.
grid() {
  $PY scripts/experiment.py --config configs/demo_smollm2.yaml --heldout cache/smollm2/text/heldout.txt \
    --divergences forward_kl,reverse_kl,jsd,skew_kl --ir off,cosine --seeds 0,1,2 --steps 20 --scales 0,1,1 \
    --mapping '[[0,0],[1,1],[2,2],[3,5],[4,6],[5,7],[6,8],[7,9],[8,10],[9,11],[10,18],[11,19],[12,20],[13,21],[14,22],[15,23],[16,24],[17,27],[18,28],[19,29]]' \
    --eval-seq-len 96 --eval-windows 24 "$@" \
    model.num_layers=20 checkpointer.checkpoint_dir=$PWD/cache/smollm2/student_20L_bi 'dataset.split=train[:480]'
}

if [ "${1:-live}" = cached ]; then
  grid --teacher-cache cache/smollm2/teacher_cache_20L_top256 --cache-top-k 256 --out outputs/prune_recovery_20L
  $PY scripts/compare_grids.py outputs/prune_recovery_20L_live outputs/prune_recovery_20L --labels live,cache \
      --out $DOCS/cache_vs_live.md
else
  OUT=outputs/prune_recovery_20L_live
  grid --out $OUT
  cp $OUT/summary.md $OUT/results.csv $DOCS/
  cells=$OUT/cells
  $PY scripts/plot_run.py $cells/ce_only-ir_off-seed0/run $cells/forward_kl-ir_off-seed0/run \
      $cells/forward_kl-ir_cosine-seed0/run $cells/reverse_kl-ir_off-seed0/run $cells/jsd-ir_off-seed0/run \
      $cells/skew_kl-ir_off-seed0/run --labels ce_only,forward_kl,forward_kl+ir,reverse_kl,jsd,skew_kl \
      --metrics ce_loss,kd_loss,ir_loss,kd/top1_agreement --title "20-layer SmolLM2 (block influence) recovered, seed 0" \
      --out $DOCS/loss_curves.png
fi
