"""lm-eval bridge: lm-eval's own truthfulqa_mc1/mc2 tasks (reading a local copy of the questions)
give the same MC1/MC2 as actedit's scorer, on the same tiny model, with and without an edit."""

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
