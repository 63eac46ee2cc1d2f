"""lm-eval's own command line: ``actedit-lmeval`` (lm-eval's CLI with actedit's model registered,
its built-in models kept) and a ``--to lm-eval-steered`` file run by lm-eval's ``steered`` model,
each in a subprocess on a tiny model with local TruthfulQA task files, give the MC1/MC2 of
actedit's scorer on the same edit."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from actedit.cli import main as cli_main
from actedit.eval import mc
from actedit.export.hf import ExportError
from actedit.interventions import build_caa_config, build_iti_config, compose, intervenable, save_artifact
from actedit.interventions.compat import head_dim
from conftest import SHARED_DATA, require_truthfulqa, save_tiny_chat_model, unavailable

try:
    import lm_eval
except ImportError:  # the optional extra actedit[lmeval]
    lm_eval = None

N_QUESTIONS = 5


@pytest.fixture(autouse=True)
def needs_lm_eval():
    if lm_eval is None:
        unavailable("lm-eval is not installed: pip install 'actedit[lmeval]'")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama saved with its tokenizer, an ITI + CAA edit acting at every position saved as
    an artifact, local task files for the first questions, and actedit's scores of the edit."""
    require_truthfulqa()
    from actedit.data.truthfulqa import load_truthfulqa
    from actedit.eval.lmeval import local_truthfulqa_tasks

    root = tmp_path_factory.mktemp("lmeval")
    base = save_tiny_chat_model(root)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    g = torch.Generator().manual_seed(7)
    heads, hd = int(model.config.num_attention_heads), int(head_dim(model.config))
    iti = build_iti_config(
        model,
        {
            1: {
                "directions": torch.nn.functional.normalize(torch.randn(heads, hd, generator=g), dim=-1),
                "sigmas": torch.rand(heads, generator=g) + 0.5,
                "heads": [0, 2],
            }
        },
        alpha=6.0,
        position_policy="all",
    )
    caa = build_caa_config(model, {2: 2.0 * torch.randn(model.config.hidden_size, generator=g)}, position_policy="all")
    pvm = intervenable(model, compose(iti, caa))
    artifact = save_artifact(pvm, root / "artifact")
    questions = load_truthfulqa(SHARED_DATA)[:N_QUESTIONS]
    tasks = local_truthfulqa_tasks(root / "tasks", questions)
    edited = mc.score_mc(pvm, tokenizer, questions, progress=False, mc2_rule="labels").metrics
    plain = mc.score_mc(model, tokenizer, questions, progress=False, mc2_rule="labels").metrics
    assert edited != plain  # the edit changes the scores
    return {"root": root, "base": base, "artifact": artifact, "tasks": tasks, "edited": edited, "model": model}


def run_lmeval(setup, model: str, model_args: str, name: str) -> dict:
    """``actedit-lmeval`` (the console script) in a subprocess; MC1/MC2 from its results file."""
    out = setup["root"] / f"out-{name}"
    script = shutil.which("actedit-lmeval", path=str(Path(sys.executable).parent)) or "actedit-lmeval"
    args = [
        script,
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(setup["tasks"]),
        "--include_path",
        str(setup["root"] / "tasks"),
        "--batch_size",
        "4",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=setup["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = list(out.rglob("results_*.json"))
    data = json.loads(results.read_text())["results"]
    mc1, mc2 = setup["tasks"]
    return {"mc1": data[mc1]["acc,none"], "mc2": data[mc2]["acc,none"]}


def test_actedit_lmeval_runs_lm_eval_cli_with_actedit_model(setup):
    theirs = run_lmeval(setup, "actedit", f"pretrained={setup['base']},intervention={setup['artifact']}", "actedit")
    assert theirs == pytest.approx(setup["edited"], abs=1e-5)


def test_steered_export_runs_in_lm_eval_steered_model(setup, capsys):
    steer = setup["root"] / "steer.pt"
    assert cli_main(["export", str(setup["artifact"]), "--to", "lm-eval-steered", str(steer)]) == 0
    assert "2 steering hookpoint(s)" in capsys.readouterr().out
    config = torch.load(steer)
    assert sorted(config) == ["layers.1.self_attn.o_proj", "layers.2.mlp.down_proj"]
    assert all(v["action"] == "add" and v["head_index"] is None for v in config.values())
    # `steered` is one of lm-eval's own models: actedit-lmeval keeps the built-in registry
    theirs = run_lmeval(setup, "steered", f"pretrained={setup['base']},steer_path={steer}", "steered")
    assert theirs == pytest.approx(setup["edited"], abs=1e-5)


def test_steered_export_refuses_what_it_cannot_express(setup, tmp_path):
    from actedit.export.lmeval import export_lm_eval_steered

    model = setup["model"]
    answer_only = build_caa_config(model, {1: torch.ones(model.config.hidden_size)}, position_policy="answer")
    artifact = save_artifact(intervenable(model, answer_only), tmp_path / "answer")
    with pytest.raises(ExportError, match="policy 'answer'"):
        export_lm_eval_steered(artifact, model, tmp_path / "steer.pt")
    with pytest.raises(ExportError, match=r"\.pt or \.pth"):
        export_lm_eval_steered(setup["artifact"], model, tmp_path / "steer.json")
