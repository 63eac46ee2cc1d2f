"""lm-eval bridge: lm-eval's own truthfulqa_mc1/mc2 tasks (reading a local copy of the questions)
give the same MC1/MC2 as actedit's scorer, on the same tiny model, with and without an edit; its
bigbench_bbq_lite_json / simple_ethical_questions multiple-choice and toxigen tasks give the same
log-likelihood for every choice and the same acc (and acc_norm)."""

import json

import pytest
import torch

from actedit.data.truthfulqa import TRUTHFULQA_PRIMER
from actedit.eval import mc
from actedit.interventions import build_hpr_config, intervenable, load_artifact, save_artifact
from conftest import SHARED_DATA, build_tokenizer, require_truthfulqa, tiny_model, unavailable

try:
    import lm_eval
except ImportError:  # the optional extra actedit[lmeval]
    lm_eval = None


@pytest.fixture(autouse=True)
def needs_lm_eval():
    if lm_eval is None:
        unavailable("lm-eval is not installed: pip install 'actedit[lmeval]'")


N_QUESTIONS = 6


@pytest.fixture(scope="module")
def questions():
    require_truthfulqa()
    from actedit.data.truthfulqa import load_truthfulqa

    return load_truthfulqa(SHARED_DATA)[:N_QUESTIONS]


def test_lm_eval_and_actedit_scorer_agree(questions, tmp_path):
    from actedit.eval.lmeval import ActEditLM, evaluate_truthfulqa

    corpus = [TRUTHFULQA_PRIMER] + [q.question for q in questions] + [c for q in questions for c in q.mc2_choices]
    tokenizer = build_tokenizer(corpus)
    model = tiny_model("llama", seed=2, vocab_size=len(tokenizer), max_position_embeddings=1024).double()

    hpr = build_hpr_config(model, [0, 2])
    with torch.no_grad():
        for rep in hpr.representations:
            for p in rep.intervention.parameters():
                p.normal_(std=0.3)
            rep.intervention.double()
    artifact = save_artifact(intervenable(model, hpr), tmp_path / "hpr")

    for intervention in (None, artifact):
        lm = ActEditLM(pretrained=model, tokenizer=tokenizer, intervention=intervention, batch_size=4)
        result = evaluate_truthfulqa(lm, questions, tmp_path / "tasks")
        theirs = (result["mc1"], result["mc2"])
        target = model if intervention is None else load_artifact(intervention, model)
        ours = mc.score_mc(target, tokenizer, questions, progress=False, mc2_rule="labels")
        assert abs(ours.metrics["mc1"] - theirs[0]) < 1e-6 and abs(ours.metrics["mc2"] - theirs[1]) < 1e-6, (
            intervention,
            ours.metrics,
            theirs,
        )
    assert ours.metrics["mc2"] != pytest.approx(
        mc.score_mc(model, tokenizer, questions, progress=False, mc2_rule="labels").metrics["mc2"]
    )


# ------------------------------------------------------------------ BBQ, SEQ and ToxiGen
@pytest.mark.parametrize("task", ["bbq", "seq", "toxigen"])
def test_lm_eval_tasks_and_actedit_scorer_agree_question_by_question(task, tmp_path):
    """lm-eval's own bigbench_*_multiple_choice / toxigen task files, pointed at local copies of the
    same rows, and actedit's scorer give the same log-likelihood for every choice and the same acc."""
    from actedit.data import bigbench, toxigen
    from actedit.data.tasks import task_spec
    from actedit.eval.lmeval import ActEditLM, evaluate_task

    if task == "toxigen":
        rows = [
            {"text": f"people from place {i} are {w}", "toxicity_ai": ai, "toxicity_human": hu}
            for i, (w, ai, hu) in enumerate(
                [("kind", 1.0, 1.2), ("awful", 4.2, 4.0), ("fine", 2.0, 3.0), ("vermin", 5.0, 4.6), ("smart", 1.1, 1.0)]
            )
        ]
        questions = [toxigen.statement(r, i, "test", "row") for i, r in enumerate(rows)]
        corpus = [toxigen.LM_EVAL_PROMPT.format(text=r["text"]) + " No Yes" for r in rows]
    else:
        name = "bbq_lite_json" if task == "bbq" else "simple_ethical_questions"
        folder = tmp_path / "raw" / name
        folder.mkdir(parents=True)
        people = [
            ("nurse", "pilot", "late"),
            ("cook", "judge", "rude"),
            ("baker", "miner", "kind"),
            ("poet", "smith", "loud"),
        ]
        examples = [
            {
                "input": f"Two people, {a} and {b}, met on day {k}. Who was {w}?",
                "target_scores": {f"The {a}": int(k % 3 == 0), "Unknown": int(k % 3 == 1), f"The {b}": int(k % 3 == 2)},
            }
            for k, (a, b, w) in enumerate(people * 5)
        ]
        if task == "seq":
            for e in examples:
                e["target_scores"]["I prefer not to say"] = 0
        (folder / "task.json").write_text(json.dumps({"name": name, "examples": examples}))
        data = bigbench.from_task_folder(name, folder)
        questions = data.questions[:4]
        corpus = [q.inputs + " " + " ".join(q.choices) for q in questions]
    tokenizer = build_tokenizer(corpus)
    model = tiny_model("llama", seed=3, vocab_size=len(tokenizer), max_position_embeddings=512).double()
    lm = ActEditLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    theirs = evaluate_task(lm, task, questions, tmp_path / "tasks")
    spec = task_spec(task)
    ours = mc.score_mc(model, tokenizer, questions, task=task, progress=False)
    assert len(theirs["loglikelihoods"]) == len(questions)
    for q, record, lls in zip(questions, ours.records, theirs["loglikelihoods"], strict=True):
        item = spec.item(q, spec.options())
        by_choice = dict(zip(item.choices, record.scores, strict=True))
        choices = (" " + c for c in (q.choices if task != "toxigen" else toxigen.CHOICES))
        assert [by_choice[c] for c in choices] == pytest.approx(lls, abs=1e-9), q.index
    for metric in spec.metrics:
        assert ours.metrics[metric] == pytest.approx(theirs[metric], abs=1e-12), metric
    assert len({tuple(r.scores) for r in ours.records}) == len(questions)  # scores differ per question
