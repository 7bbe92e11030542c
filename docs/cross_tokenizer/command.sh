#!/usr/bin/env bash
# The cross-tokenizer evidence of the README's "Teachers with another vocabulary or tokenizer" section, and the files
# in this folder.
#   bash docs/cross_tokenizer/command.sh     # 3 grids of 6 cells (CE-only and CE + cross-tokenizer KD, 3 seeds),
#                                            # about 40 min on 2 cores
# Resumable: finished cells (<out>/cells/*/result.json) are skipped, so rerunning finishes an interrupted grid.
source "$(dirname "$0")/../common.sh"
DOCS=docs/cross_tokenizer

# The student with the project's own BPE (skipped when built).
[ -f cache/smollm2/student_bpe/build.json ] || \
    $PY scripts/build_bpe_student.py --out cache/smollm2/student_bpe --train-json cache/smollm2/text/train.json

# CE 1 / KD 1 (forward KL as the exact divergence), no IR, 25 steps on the first 480 training samples; held-out: the
# demo's held-out text in 24 windows of 96 student tokens (bits per byte next to perplexity; no KL: the tokenizers
# differ). Three KD settings, each against CE-only on the same seeds: exact divergence + ULD, exact only (the
# default), ULD only.
run_grid() {  # $1: the grid's folder, then overrides
    local out=$1; shift
    $PY scripts/experiment.py --config configs/cross_tokenizer_smollm2.yaml --heldout cache/smollm2/text/heldout.txt \
        --divergences forward_kl --ir off --seeds 0,1,2 --steps 25 --scales 1,1,0 --eval-seq-len 96 \
        --eval-windows 24 --out "$out" max_steps_per_epoch=25 "$@"
}
run_grid outputs/cross_tokenizer/exact_uld cross_tokenizer.exact_weight=1 cross_tokenizer.uld_weight=1
run_grid outputs/cross_tokenizer/exact_only cross_tokenizer.exact_weight=1 cross_tokenizer.uld_weight=0
run_grid outputs/cross_tokenizer/uld_only cross_tokenizer.exact_weight=0 cross_tokenizer.uld_weight=1
for grid in exact_uld exact_only uld_only; do
    cp outputs/cross_tokenizer/$grid/summary.md $DOCS/summary_$grid.md
    cp outputs/cross_tokenizer/$grid/results.csv $DOCS/results_$grid.csv
done
# The combinations against each other, paired by seed (the same data order in every grid).
for other in exact_only uld_only; do
    $PY scripts/compare_grids.py outputs/cross_tokenizer/$other outputs/cross_tokenizer/exact_uld \
        --labels $other,exact_uld --out $DOCS/compare_$other.md --overwrite
done
# The teacher's own held-out figures, on the same text and window settings (its own tokens).
$PY - <<'PYTHON'
import json

from torchtune_kd.evaluation import heldout_metrics

result = heldout_metrics.evaluate_heldout({"teacher": "cache/smollm2/teacher"}, "cache/smollm2/text/heldout.txt",
                                          seq_len=96, max_windows=24)["teacher"]
print(json.dumps(result, indent=2))
open("docs/cross_tokenizer/teacher.json", "w").write(json.dumps(result, indent=2) + "\n")
PYTHON
