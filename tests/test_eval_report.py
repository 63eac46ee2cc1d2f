"""``actedit eval`` end to end on a tiny local model: results.json, report.md, plots, errors."""

import json

import pytest
import torch

import actedit.interventions as ai
from actedit.cli import main
from conftest import SHARED_DATA, build_tokenizer, require_truthfulqa, tiny_model


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    require_truthfulqa()
    from actedit.data.truthfulqa import TRUTHFULQA_PRIMER, load_split, load_truthfulqa, select

    questions = select(load_truthfulqa(SHARED_DATA), "test", load_split(SHARED_DATA), limit=3)
    tokenizer = build_tokenizer(
        [TRUTHFULQA_PRIMER] + [q.question for q in questions] + [c for q in questions for c in q.mc2_choices]
    )
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=1024)
    root = tmp_path_factory.mktemp("model")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    caa = ai.build_caa_config(model, {1: torch.randn(32) * 3})
    ai.save_artifact(ai.intervenable(model, caa), root / "caa")
    hpr = ai.build_hpr_config(model, [0, 2])
    with torch.no_grad():
        for rep in hpr.representations:
            for p in rep.intervention.parameters():
                p.normal_(std=0.3)
    selection = {
        "metric": "probe_accuracy",
        "accuracy": {"0": 0.7, "1": 0.6, "2": 0.9},
        "ranking": [2, 0, 1],
        "selected": [0, 2],
    }
    ai.save_artifact(ai.intervenable(model, hpr), root / "hpr", metadata={"layer_selection": selection})
    return root, questions


def test_eval_with_and_without_edit(local_model, tmp_path):
    root, questions = local_model
    args = ["eval", "--model", str(root / "model"), "--data", str(SHARED_DATA), "--split", "test", "--limit", "3"]
    assert main(args + ["--out", str(tmp_path / "base")]) == 0
    base = json.loads((tmp_path / "base" / "results.json").read_text())
    assert base["n_questions"] == 3 and 0 <= base["mc1"] <= 1 and 0 <= base["mc2"] <= 1
    assert [r["index"] for r in base["base"]["per_question"]] == [q.index for q in questions]
    assert main(args + ["--intervention", str(root / "caa"), "--out", str(tmp_path / "caa")]) == 0
    edited = json.loads((tmp_path / "caa" / "results.json").read_text())
    assert edited["mc2"] == edited["edited"]["metrics"]["mc2"]
    assert edited["base"]["metrics"]["mc2"] == pytest.approx(base["mc2"])
    assert edited["mc2"] != pytest.approx(base["mc2"])
    assert {"flips", "side_effects", "norm_drift"} <= set(edited)
    assert edited["side_effects"]["kl"] > 0
    assert (tmp_path / "caa" / "norms.png").stat().st_size > 0 and (tmp_path / "caa" / "flips.png").is_file()
    report = (tmp_path / "caa" / "report.md").read_text()
    assert "| edited |" in report and "False→True" in report


def test_eval_records_the_scores_in_a_local_artifact_unless_told_not_to(local_model, tmp_path, capsys):
    import shutil

    root, _ = local_model
    artifact = shutil.copytree(root / "caa", tmp_path / "caa")
    identity = ai.edit_identity(artifact)
    args = ["eval", "--model", str(root / "model"), "--data", str(SHARED_DATA), "--limit", "3"]
    args += ["--intervention", str(artifact)]
    before = (artifact / "config.json").read_bytes()  # (other tests of this module may have recorded scores)
    assert main(args + ["--no-record", "--out", str(tmp_path / "a")]) == 0
    assert (artifact / "config.json").read_bytes() == before
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert f"scores recorded in {artifact}" in capsys.readouterr().out
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    (entry,) = [e for e in ai.artifact_metadata(artifact)["metrics"] if e["n"] == 3 and e["split"] == "test"]
    assert entry["task"] == "truthfulqa" and entry["split"] == "test" and entry["n"] == 3
    assert entry["measured_by"] == "actedit eval" and entry["protocol"]["mc2_rule"] == "split"
    assert entry["scores"] == {"mc1": results["mc1"], "mc2": results["mc2"]}
    assert entry["stderr"]["mc2"] == results["mc2_stderr"] and entry["base"]["mc2"] == results["base"]["metrics"]["mc2"]
    card = (artifact / "README.md").read_text()
    assert f"| truthfulqa | test | 3 | MC2 | {100 * results['mc2']:.2f} ± {100 * results['mc2_stderr']:.2f} |" in card
    assert ai.edit_identity(artifact) == identity
    assert main(["info", str(artifact)]) == 0
    assert f"| truthfulqa | test | 3 | MC1 | {100 * results['mc1']:.2f}" in capsys.readouterr().out


def test_layer_curve_and_probe_plot(local_model, tmp_path):
    root, _ = local_model
    assert (
        main(
            [
                "eval",
                "--model",
                str(root / "model"),
                "--data",
                str(SHARED_DATA),
                "--limit",
                "3",
                "--intervention",
                str(root / "hpr"),
                "--layer-curve",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    curve = results["layer_curve"]
    assert curve["ranked_layers"] == [2, 0] and curve["ks"] == [1, 2]
    assert set(curve["scores"]) == {"mc1", "mc2"} and len(curve["scores"]["mc2"]) == 2
    # k = 2 restricts to every edited layer: the full edit's score
    assert curve["scores"]["mc2"][-1] == pytest.approx(results["edited"]["metrics"]["mc2"])
    assert (tmp_path / "o" / "layer_curve.png").is_file() and (tmp_path / "o" / "probe_accuracy.png").is_file()


def test_eval_errors(local_model, tmp_path, capsys):
    root, _ = local_model
    assert (
        main(
            ["eval", "--model", str(root / "model"), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]
        )
        == 1
    )
    assert "No TruthfulQA data" in capsys.readouterr().err
    assert main(["eval", "--model", "./no/such/model", "--data", str(SHARED_DATA), "--out", str(tmp_path / "o")]) == 1
    assert "No model at" in capsys.readouterr().err
