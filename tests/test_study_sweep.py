"""Sweeps (``actedit sweep``, a study's ``sweep:`` block, ``actedit.sweep``) on a tiny local model
and TruthfulQA: every point equals the edit fitted directly with its settings, data sizes read
prefixes of one collection, the rule's choice, the files, resuming, and bad sweep blocks."""

import csv
import json

import pytest
import torch
import yaml

import actedit
from actedit.cli import main
from actedit.data.models import load_model
from actedit.interventions.artifacts import artifact_metadata, load_artifact
from actedit.interventions.edits import intervenable
from actedit.study import load_study
from actedit.study.sweep import choose
from actedit.train.pipeline import CollectSettings, DataSettings, PipelineConfig, collect, make_edit
from conftest import SHARED_DATA, STOCK_RELOAD_INPUTS


@pytest.fixture(scope="module")
def model_dir(chat_model_root):
    return chat_model_root / "model"


def sweep_config(model_dir, path, out, **sweep):
    config = {
        "model": str(model_dir),
        "dtype": "float32",
        "data": {"name": "truthfulqa_mc", "source": str(SHARED_DATA), "limit": 6},
        "out": str(out),
        "methods": {
            "caa": {"settings": {"layers": 1, "position_policy": "answer"}},
            "iti": {"settings": {"top_heads": 4, "strength": 2.0}},
        },
        "eval": {"limit": 4},
        "sweep": {
            "methods": {
                "caa": {"strength": [0.5, 4.0], "layers": [0, 2], "examples": [3]},
                "iti": {"strength": [8.0], "examples": [2]},
            },
            **sweep,
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def logits(pvm):
    with torch.no_grad():
        return pvm(dict(STOCK_RELOAD_INPUTS), unit_locations=None)[1].logits


def test_sweep_end_to_end_points_equal_direct_fits_and_resume(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    config = sweep_config(model_dir, tmp_path / "sweep.yaml", out)
    assert main(["sweep", str(config)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "sweep.json").read_text())
    caa = summary["rows"]["caa"]
    labels = [(p["axis"], p["value"]) for p in caa["points"]]
    assert labels == [
        ("default", None),
        ("strength", 0.5),
        ("strength", 4.0),
        ("layers", 0),
        ("layers", 2),
        ("examples", 3),
    ]
    assert [p["layers"] for p in caa["points"]] == [[1], [1], [1], [0], [2], [1]]
    for p in caa["points"]:
        assert set(p["scores"]) == {"eval", "test"} and p["kl"] >= 0 and p["lm_loss"] > 0
        assert p["measurements"]["test"]["n"] == 4 and p["measurements"]["eval"]["split"] == "eval"
    strengths = {p["value"]: p["kl"] for p in caa["points"] if p["axis"] == "strength"}
    assert strengths[4.0] > strengths[0.5]  # a stronger edit moves the model more

    # the rule: the best eval MC2 (ties: lower KL), saved as an artifact with the sweep and both scores
    chosen = choose(caa["points"], load_study(str(config)), "mc2")
    assert caa["chosen"] == chosen["id"]
    best = max(p["scores"]["eval"]["mc2"] for p in caa["points"])
    assert chosen["scores"]["eval"]["mc2"] == best
    info = artifact_metadata(out / "artifacts" / "caa")
    assert info["sweep"]["chosen"] == chosen["id"] and len(info["sweep"]["points"]) == 6
    assert sorted(m["split"] for m in info["metrics"]) == ["eval", "test"]
    assert info["edits"][0]["hyperparameters"]["multiplier"] == chosen["settings"]["multiplier"]
    assert "caa: chose" in printed and "sweep.md" in printed

    # each point is the edit fitted directly with its settings (strengths set after one fit; the
    # examples point reads a prefix of the collection) — checked on three points and the saved one
    model, tokenizer = load_model(str(model_dir))
    for point in [caa["points"][2], caa["points"][4], caa["points"][5], summary["rows"]["iti"]["points"][1]]:
        row = "iti" if point in summary["rows"]["iti"]["points"] else "caa"
        limit = point["examples"] or 6
        cfg = PipelineConfig(
            model=str(model_dir),
            method=row,
            data=DataSettings(name="truthfulqa_mc", source=str(SHARED_DATA), limit=limit),
            collect=CollectSettings(dir=None),
            settings=point["settings"],
            out=None,
        ).for_model(model)
        config_direct, _ = make_edit(cfg, model, tokenizer, store=collect(cfg, model, tokenizer, quiet=True))
        direct = intervenable(model, config_direct)
        if point["id"] == caa["chosen"]:
            torch.testing.assert_close(logits(load_artifact(out / "artifacts" / "caa", model)), logits(direct))
        swept = [r for r in (out / "sweep" / "points" / row).iterdir() if r.stem == point["id"]]
        assert swept, point
        direct_scores = actedit_scores(direct, tokenizer)
        assert direct_scores == pytest.approx(point["scores"]["test"], abs=1e-6)

    # CSV, report and plots
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == len(caa["points"]) + len(summary["rows"]["iti"]["points"])
    assert sum(r["chosen"] == "True" for r in rows) == 2
    report = (out / "sweep.md").read_text()
    assert "## caa (caa)" in report and "**chosen**" in report and "against the row's own settings" in report
    for plot in ("sweep_tradeoff.png", "sweep_strength.png", "sweep_layers.png"):
        assert (out / plot).stat().st_size > 1000

    # a rerun scores nothing again and gives the same summary
    stamps = {p: p.stat().st_mtime_ns for p in (out / "sweep" / "points").rglob("*.json")}
    assert main(["sweep", str(config), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "sweep" / "points").rglob("*.json")} == stamps
    again = json.loads((out / "sweep.json").read_text())
    assert again["rows"]["caa"]["chosen"] == caa["chosen"] and again["base"] == summary["base"]


def actedit_scores(pvm, tokenizer):
    from actedit.data.tasks import task_spec
    from actedit.eval.mc import score_mc_many

    questions = task_spec("truthfulqa").load(str(SHARED_DATA), "test", None, 4)
    return score_mc_many({"base": pvm.model, "e": pvm}, tokenizer, questions, progress=False)["e"].metrics


def test_a_kl_budget_excludes_the_strong_points(model_dir, tmp_path):
    out = tmp_path / "out"
    config = sweep_config(model_dir, tmp_path / "sweep.yaml", out)
    assert main(["sweep", str(config), "--method", "caa", "--quiet"]) == 0
    points = json.loads((out / "sweep.json").read_text())["rows"]["caa"]["points"]
    budget = sorted(p["kl"] for p in points)[1]  # only the two gentlest points are allowed
    cfg = load_study(str(config), [f"sweep.choose.max_kl={budget}"])
    chosen = choose(points, cfg, "mc2")
    assert chosen["kl"] <= budget
    assert choose(points, load_study(str(config), ["sweep.choose.max_kl=0"]), "mc2") is None  # every edit has KL > 0


def test_a_trained_method_trains_once_for_all_its_strengths(model_dir, tmp_path):
    out = tmp_path / "out"
    config = sweep_config(model_dir, tmp_path / "sweep.yaml", out)
    raw = yaml.safe_load(config.read_text())
    raw["methods"] = {"hpr": {"settings": {"top_layers": 1}, "train": {"epochs": 1, "progress": False}}}
    raw["sweep"] = {"methods": {"hpr": {"strength": [0.5, 2.0]}}}
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--quiet"]) == 0  # a study with a sweep: block runs the sweep
    points = json.loads((out / "sweep.json").read_text())["rows"]["hpr"]["points"]
    assert [p["settings"]["alpha"] for p in points] == [1.0, 0.5, 2.0]
    assert len(list((out / "sweep" / "training" / "hpr").iterdir())) == 1  # one training, three strengths
    assert len({p["layers"][0] for p in points}) == 1 and len({p["kl"] for p in points}) == 3


def test_the_python_call_sweeps_one_method(model_dir, tmp_path):
    model, tokenizer = load_model(str(model_dir))
    result = actedit.sweep(
        "caa",
        model,
        tokenizer,
        "truthfulqa_mc",
        base={"layers": 1},
        strength=[1.0, 3.0],
        source=str(SHARED_DATA),
        limit=3,
        eval_limit=3,
        out=str(tmp_path / "py"),
        quiet=True,
    )
    row = result["rows"]["caa"]
    assert [p["value"] for p in row["points"]] == [None, 3.0]  # strength 1 is the default point itself
    assert load_artifact(row["artifact"], model) is not None

    # examples themselves (as actedit.fit takes them) are written beside the results and recorded
    triples = [("Is the sky blue?", "Yes.", "No."), ("Is fire cold?", "No.", "Yes.")]

    def sweep_on(data):
        return actedit.sweep(
            "caa",
            model,
            tokenizer,
            data,
            base={"layers": 1},
            strength=[2.0],
            source=str(SHARED_DATA),
            eval_limit=2,
            out=str(tmp_path / "triples"),
            quiet=True,
        )

    result = sweep_on(triples)
    again = sweep_on(triples[:1])  # other data in the same folder: new points, never the old scores
    old_ids = {p["id"] for p in result["rows"]["caa"]["points"]}
    assert not old_ids & {p["id"] for p in again["rows"]["caa"]["points"]}
    first = json.loads((tmp_path / "triples" / "sweep" / "points" / "caa" / f"{next(iter(old_ids))}.json").read_text())
    files = sorted((tmp_path / "triples").glob("data-*.jsonl"))
    assert [len(f.read_text().splitlines()) for f in files] in ([2, 1], [1, 2])  # each call's examples kept
    assert first["point"]["settings"]["multiplier"] in (1.0, 2.0)


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"methods": {"hpr": {"strength": [1]}}}, "not a row of methods"),
        ({"methods": {"caa": {"strength": []}}}, "non-empty list"),
        ({"methods": {"caa": {"examples": [0]}}}, "positive integers or 'all'"),
        ({"methods": {"caa": {"settings": {"multipler": [1]}}}}, "did you mean 'multiplier'"),
        ({"methods": {"caa": {"settings": {"layers": [1]}}}}, "the layers axis"),
        ({"methods": {"caa": {"strength": [1]}}, "report_split": "eval"}, "not a report"),
        ({"methods": {"caa": {"strength": [1]}}, "choose": {"metric": "mc3"}}, "not a metric of truthfulqa"),
        ({"methods": {"caa": {"strength": [1]}}, "choose": {"max_kl": -1}}, "non-negative"),
        ({"methods": {"caa": {"strength": [1]}}, "mode": "random"}, "curves, grid"),
    ],
)
def test_bad_sweep_blocks_are_explained(model_dir, tmp_path, sweep, message):
    config = {
        "model": str(model_dir),
        "methods": {"caa": {"settings": {"layers": 1}}},
        "sweep": sweep,
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=message):
        load_study(str(path))


def test_grid_mode_takes_every_combination(model_dir, tmp_path):
    config = sweep_config(model_dir, tmp_path / "s.yaml", tmp_path / "o", mode="grid")
    cfg = load_study(str(config))
    points = cfg.sweep_points("caa")
    assert len(points) == 1 + 2 * 2 * 1
    assert {(p["settings"]["multiplier"], p["settings"]["layers"], p["examples"]) for p in points[1:]} == {
        (s, layer, 3) for s in (0.5, 4.0) for layer in (0, 2)
    }


def test_side_effects_are_measured_as_the_edit_acts_on_generated_text(model_dir):
    """An answer-policy edit edits only the last token of a plain forward pass; in generation it
    edits every new token, which is what the sweep's KL must see."""
    from actedit.eval.analysis import side_effects
    from actedit.interventions import build_caa_config
    from actedit.study.sweep import as_generating

    model, tokenizer = load_model(str(model_dir))
    pvm = intervenable(model, build_caa_config(model, {1: torch.ones(32)}, multiplier=3.0, position_policy="answer"))
    plain = side_effects(pvm, tokenizer, ["one two three four five", "six seven eight"])
    generating = side_effects(as_generating(pvm), tokenizer, ["one two three four five", "six seven eight"])
    assert generating.kl > 3 * plain.kl > 0
    assert pvm.interventions[pvm.sorted_keys[0]].policy.name == "ANSWER"  # the edit itself is unchanged


def test_the_embedded_sweeps_config_sweeps_every_truthfulqa_method():
    from actedit.cli.sweep import SWEEPS_CONFIG

    cfg = load_study(str(SWEEPS_CONFIG))
    assert list(cfg.sweep.methods) == ["hpr", "sea", "iti", "caa"] and cfg.sweep.report_split == "test"
    counts = {row: len(cfg.sweep_points(row)) for row in cfg.sweep.methods}
    assert counts == {"hpr": 8, "sea": 5, "iti": 9, "caa": 15}
    assert all(25 in (cfg.sweep.methods[row].examples or []) for row in cfg.sweep.methods)  # SEA's 25 demonstrations


def test_a_setting_that_changes_the_collection_cannot_vary_within_a_row(model_dir, tmp_path):
    config = sweep_config(model_dir, tmp_path / "s.yaml", tmp_path / "o")
    raw = yaml.safe_load(config.read_text())
    raw["methods"] = {"sea": {"settings": {"layers": "1-2", "base_tokens": 4}}}
    raw["sweep"] = {"methods": {"sea": {"settings": {"base_tokens": [4, 8]}}}}
    config.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(config), "--quiet"]) == 1  # refused before any collection
    assert not (tmp_path / "o" / "activations").exists()
