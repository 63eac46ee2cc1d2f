#!/usr/bin/env bash
# Lint, format check and type check of the package, as CI runs them (scripts/test.sh calls this
# first; README "Code quality"). Settings live in pyproject.toml ([tool.ruff], [tool.mypy]).
#   PY=<interpreter with the lint extra> (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m ruff check .
"$PY" -m ruff format --check .
# mypy reads the package as users import it. pyproject's package-dir maps folders to packages
# (interventions/ -> actedit.interventions, ...), which the default editable install resolves at
# run time only; a link tree with the real layout (build/typecheck/actedit/...) shows it to mypy.
"$PY" - <<'PYTHON'
import re
from pathlib import Path

text = Path("pyproject.toml").read_text()
mapping = dict(re.findall(r'"([\w.]+)" = "(\w+)"', re.search(r"^package-dir = \{(.*)\}$", text, re.M).group(1)))
root = Path("build/typecheck")
for package, folder in mapping.items():
    target = root.joinpath(*package.split("."))
    target.mkdir(parents=True, exist_ok=True)
    for old in target.iterdir():
        if old.is_symlink() and old.suffix in (".py", ".typed"):
            old.unlink()
    for source in Path(folder).iterdir():
        if source.suffix == ".py" or source.name == "py.typed":
            (target / source.name).symlink_to(source.resolve())
PYTHON
MYPYPATH=build/typecheck "$PY" -m mypy -p actedit
