#!/usr/bin/env bash
# The GPU check (README, "GPU check"): every method collected, fitted or trained, scored and saved
# on one CUDA GPU in bf16, loaded back on the CPU, and its generation overhead timed; one table.
#   bash scripts/gpu_check.sh [OUT] [more options of benchmarks/gpu_check.py]
# Needs actedit installed where PYTHON runs (default .venv/bin/python, else python3), TruthfulQA in
# DATA (default ../shared/data/truthfulqa) and SmolLM2's tokenizer: the embedded model's, or a saved
# one in TOKENIZER. About 5 minutes on one H200; nothing is downloaded. CI never runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${1:-runs/gpu_check}
shift || true
exec "$PYTHON" benchmarks/gpu_check.py --data "${DATA:-../shared/data/truthfulqa}" \
    ${TOKENIZER:+--tokenizer "$TOKENIZER"} --out "$OUT" "$@"
