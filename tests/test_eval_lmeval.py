"""lm-eval bridge: lm-eval's own truthfulqa_mc1/mc2 tasks (reading a local copy of the questions)
give the same MC1/MC2 as actedit's scorer, on the same tiny model, with and without an edit."""

import json
import shutil
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'actedit[lmeval]'")

from actedit.eval import mc  # noqa: E402
from actedit.interventions import build_hpr_config, intervenable, load_artifact, save_artifact  # noqa: E402

from conftest import SHARED_DATA, tiny_model  # noqa: E402
from test_eval_mc import build_tokenizer  # noqa: E402

N_QUESTIONS = 6


@pytest.fixture(scope="module")
def questions():
    if not (SHARED_DATA / "mc_task.json").is_file():
        pytest.skip(f"TruthfulQA data not found at {SHARED_DATA}; this test reads mc_task.json from there.")
    from actedit.train.truthfulqa import load_truthfulqa

    return load_truthfulqa(SHARED_DATA)[:N_QUESTIONS]


def local_tasks(directory: Path, questions) -> list:
    """lm-eval's installed truthfulqa task files, pointed at a local JSONL in the Hub's schema."""
    rows = [{"question": q.question,
             "mc1_targets": {"choices": q.mc1_choices, "labels": q.mc1_labels},
             "mc2_targets": {"choices": q.mc2_choices, "labels": q.mc2_labels}} for q in questions]
    data = directory / "truthfulqa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    source = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
    mc1 = (source / "truthfulqa_mc1.yaml").read_text()
    for line in ("dataset_path: truthfulqa/truthful_qa\n", "dataset_name: multiple_choice\n"):
        assert line in mc1, "lm-eval's truthfulqa_mc1.yaml changed; update this test"
    mc1 = mc1.replace("dataset_path: truthfulqa/truthful_qa\n", f"dataset_path: json\ndataset_kwargs:\n"
                      f"  data_files:\n    validation: {data}\n").replace("dataset_name: multiple_choice\n", "")
    mc1 = mc1.replace("tag:\n  - truthfulqa\n", "").replace("task: truthfulqa_mc1", "task: local_truthfulqa_mc1")
    (directory / "truthfulqa_mc1.yaml").write_text(mc1)
    mc2 = (source / "truthfulqa_mc2.yaml").read_text().replace("task: truthfulqa_mc2", "task: local_truthfulqa_mc2")
    (directory / "truthfulqa_mc2.yaml").write_text(mc2)
    shutil.copy(source / "utils.py", directory / "utils.py")
    return ["local_truthfulqa_mc1", "local_truthfulqa_mc2"]


def run_lm_eval(lm, tasks, include_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(include_path)),
                          num_fewshot=0, bootstrap_iters=0)
    return out["results"]["local_truthfulqa_mc1"]["acc,none"], out["results"]["local_truthfulqa_mc2"]["acc,none"]


def test_lm_eval_and_actedit_scorer_agree(questions, tmp_path):
    from actedit.eval.lmeval import ActEditLM

    corpus = [mc.TRUTHFULQA_PRIMER] + [q.question for q in questions] + [c for q in questions for c in q.mc2_choices]
    tokenizer = build_tokenizer(corpus)
    model = tiny_model("llama", seed=2, vocab_size=len(tokenizer), max_position_embeddings=1024).double()
    tasks = local_tasks(tmp_path, questions)

    hpr = build_hpr_config(model, [0, 2])
    with torch.no_grad():
        for rep in hpr.representations:
            for p in rep.intervention.parameters():
                p.normal_(std=0.3)
            rep.intervention.double()
    artifact = save_artifact(intervenable(model, hpr), tmp_path / "hpr")

    for intervention in (None, artifact):
        lm = ActEditLM(pretrained=model, tokenizer=tokenizer, intervention=intervention, batch_size=4)
        theirs = run_lm_eval(lm, tasks, tmp_path)
        target = model if intervention is None else load_artifact(intervention, model)
        ours = mc.score_mc(target, tokenizer, questions, progress=False, mc2_rule="labels")
        assert abs(ours.mc1 - theirs[0]) < 1e-6 and abs(ours.mc2 - theirs[1]) < 1e-6, (intervention, ours, theirs)
    assert ours.mc2 != pytest.approx(mc.score_mc(model, tokenizer, questions, progress=False, mc2_rule="labels").mc2)
