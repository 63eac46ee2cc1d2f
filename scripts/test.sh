#!/usr/bin/env bash
# Set up and run the whole test suite. This is the test command of README.md (and what CI runs).
#  1. .venv (scripts/setup.sh: newest transformers 5.x): every test.
#  2. .venv-tf4 (transformers 4.57.x): the intervention, artifact and compat tests, since actedit
#     supports both major versions of transformers.
# Extra arguments go to the first pytest run (e.g. -k hpr).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 python -m pytest -q "$@"
deactivate

if [ "${ACTEDIT_SKIP_TF4:-0}" != "1" ]; then
  if [ ! -x .venv-tf4/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv-tf4
  fi
  .venv-tf4/bin/python -m pip install -q "torch==2.13.0"
  .venv-tf4/bin/python -m pip install -q -e ".[test]" "transformers==4.57.6"
  HF_HUB_OFFLINE=1 .venv-tf4/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_hpr.py tests/test_sea.py tests/test_iti.py tests/test_positions.py \
    tests/test_artifacts.py tests/test_compat.py tests/test_cli.py
fi
