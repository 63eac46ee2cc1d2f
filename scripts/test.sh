#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. This is the test command of README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 python -m pytest -q "$@"
