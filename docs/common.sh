# Sourced by the evidence commands in docs/*/command.sh: run from the checkout, offline, with its virtualenv, and
# the SmolLM2 teacher and text prepared (skipped when done).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export KD_DEMO_CACHE=$PWD/cache/smollm2 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
PY=.venv/bin/python
$PY scripts/prepare_smollm2.py cache/smollm2
