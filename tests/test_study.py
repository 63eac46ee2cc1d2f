"""``actedit run``: the whole study from a YAML file on a tiny local model and TruthfulQA."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from actedit.cli import main
from actedit.interventions.artifacts import artifact_metadata
from actedit.interventions.layers import resolve_layers
from actedit.study import default_config_path, load_study
from conftest import SHARED_DATA


@pytest.fixture(scope="module")
def model_dir(chat_model_root):
    return chat_model_root / "model"


def tiny_study(model_dir, path):
    config = {
        "model": str(model_dir),
        "dtype": "float32",
        "data": {"name": "truthfulqa_mc", "limit": 3},
        "methods": {
            "hpr": {"train": {"epochs": 1, "progress": False}, "settings": {"top_layers": 2}},
            "sea": {"settings": {"layers": "1-2", "base_tokens": 4}},
            "iti": {"settings": {"top_heads": 4, "strength": 2.0}},
            "caa": {"settings": {"layers": 1, "position_policy": "answer"}},
        },
        "compose": "all",
        "eval": {"limit": 4, "norm_texts": 4},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # the report lists the methods in this order
    return path


def test_default_config_is_the_embedded_default_study():
    cfg = load_study(str(default_config_path()))
    assert cfg.model == "smollm2-135m-instruct"
    assert cfg.method_names == ["hpr", "sea", "iti", "caa"] and cfg.composed_methods == cfg.method_names
    assert cfg.eval.split == "test" and cfg.eval.limit is None and cfg.data.limit is None
    sea = cfg.pipeline("sea")
    assert resolve_layers(sea.settings.layers, 30) == list(range(10, 30)) and sea.site == "mlp_output"
    assert resolve_layers(sea.settings.layers, 32) == list(range(11, 32))  # the official 21 of 32
    hpr = cfg.pipeline("hpr")
    assert (hpr.settings.top_layers, hpr.settings.strategy) == (5, "probe_first") and hpr.site == "block_output"
    assert cfg.eval.task == "truthfulqa" and cfg.eval.options.mc2_rule == "split"
    assert cfg.pipeline("iti").out.endswith("artifacts/iti")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["methods.foo={}"], "row 'foo' is not a registered method"),
        (["methods.foo={method: rome}"], "methods.foo.method 'rome' is not a registered method"),
        (["seeds=[0, 0]"], "seeds must be distinct"),
        (["seeds=[0, 1]", "methods.hpr.train.seed=3"], "seed and seeds are both set"),
        (["colour=red"], "unknown key"),
        (["eval.splitt=test"], "eval.splitt"),
        (["methods.iti.fitt={}"], "methods.iti.fitt"),
        (["methods.actadd={}"], "prompt pairs"),
        (["compose=[hpr, actadd]"], "not in methods"),
        (["dtype=int8"], "dtype must be one of"),
        (["eval.limit=0"], "eval.limit"),
    ],
)
def test_bad_study_configs_are_explained(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_study(str(default_config_path()), overrides)


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")]
)
def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch, avx512_bf16, amx, expected):
    from actedit.study import resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("float32", "cpu") == "float32" and resolve_dtype("float16", "cpu") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", "cuda") == "float32"


def test_missing_config_file_and_split_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 1
    assert "No study config" in capsys.readouterr().err
    data = tmp_path / "data"
    data.mkdir()
    (data / "mc_task.json").write_text((SHARED_DATA / "mc_task.json").read_text())
    assert main(["run", str(default_config_path()), "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    assert "hpr_ids_splits.json" in capsys.readouterr().err


def test_without_data_or_hub_the_error_says_how_to_fix_it(tmp_path, monkeypatch, capsys):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["run", str(default_config_path()), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "Hugging Face Hub" in err and "--data" in err and "mc_task.json" in err
    assert not (tmp_path / "o").exists()  # nothing was started, no empty folder left behind


def test_a_missing_model_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["run", str(default_config_path()), "--data", str(SHARED_DATA), "--out", str(out), "--set", "eval.limit=2"]
    assert main(argv + ["--set", f"model={tmp_path / 'no-such-model'}"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_study_end_to_end_then_resumes_without_recomputing(model_dir, tmp_path, capsys):
    config = tiny_study(model_dir, tmp_path / "study.yaml")
    out = tmp_path / "out"
    assert main(["run", str(config), "--data", str(SHARED_DATA), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "done in" in printed and str(out / "report.md") in printed
    results = json.loads((out / "results.json").read_text())
    names = ["base", "hpr", "sea", "iti", "caa", "composed"]
    assert list(results["methods"]) == names and results["n_questions"] == 4
    for name in names:
        m = results["methods"][name]
        assert 0 <= m["mc1"] <= 1 and 0 <= m["mc2"] <= 1 and m["mc1_stderr"] >= 0
        if name != "base":
            assert m["layers"] and m["kl_to_base"] >= 0 and m["norm_drift"] is not None
            assert set(m["flips"]) >= {"false_to_true", "true_to_false"}
            assert (out / "artifacts" / name / "actedit_manifest.json").is_file()
    assert results["methods"]["hpr"]["layers"] == sorted(results["methods"]["hpr"]["layers"])
    assert len(results["methods"]["hpr"]["layers"]) == 2
    assert results["methods"]["sea"]["layers"] == [1, 2]
    assert results["methods"]["caa"]["layers"] == [1]
    composed = {e["method"] for e in results["methods"]["composed"]["edits"]}
    assert composed == {"hpr", "sea", "iti", "caa"}
    report = (out / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    peaks = results["memory"]["peak_rss_mib"]
    assert list(peaks["steps"]) == list(results["seconds"]["steps"])  # every step, beside its seconds
    assert all(mib > 50 for mib in peaks["steps"].values()) and peaks["total"] >= max(peaks["steps"].values())
    assert "| step | seconds | peak RSS (GiB) |" in report and "peak resident memory" in report
    for plot in ("scores.png", "flips.png", "norms.png"):
        assert (out / plot).stat().st_size > 1000
    assert (out / "activations" / "sea_bases.json").is_file()
    for name in names[1:]:  # each artifact carries its scores on the eval split, beside the base model's
        (entry,) = artifact_metadata(out / "artifacts" / name)["metrics"]
        m = results["methods"][name]
        assert entry["scores"] == {"mc1": m["mc1"], "mc2": m["mc2"]} and entry["n"] == 4
        assert entry["base"]["mc2"] == results["methods"]["base"]["mc2"] and entry["measured_by"] == "actedit run"
        assert (
            f"| MC2 | {100 * m['mc2']:.2f} ± {100 * m['mc2_stderr']:.2f} |"
            in (out / "artifacts" / name / "README.md").read_text()
        )
    hpr_card = (out / "artifacts" / "hpr" / "README.md").read_text()
    assert "## Layer selection" in hpr_card and "## Training" in hpr_card
    cached = {p.name: p.stat().st_mtime_ns for p in (out / "eval").iterdir()}

    # A rerun reuses every artifact and score (recording the scores did not change the edits' identity).
    assert main(["run", str(config), "--data", str(SHARED_DATA), "--out", str(out)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "eval").iterdir()} == cached
    printed = capsys.readouterr().out
    assert printed.count("(reused)") == 8
    again = json.loads((out / "results.json").read_text())
    for name in names:
        assert again["methods"][name]["mc2"] == results["methods"][name]["mc2"]

    # An interrupted run (no ITI artifact, no composed scores) redoes only what is missing.
    import shutil

    shutil.rmtree(out / "artifacts" / "iti")
    (out / "eval" / "composed.json").unlink()
    assert (
        main(["run", str(config), "--data", str(SHARED_DATA), "--out", str(out), "--set", "eval.analyses=false"]) == 0
    )
    printed = capsys.readouterr().out
    assert "iti: fit" in printed and "iti: fit (reused)" not in printed and "hpr: train (reused)" in printed
    final = json.loads((out / "results.json").read_text())
    assert final["methods"]["iti"]["mc2"] == pytest.approx(results["methods"]["iti"]["mc2"], abs=1e-6)


def test_study_artifacts_load_with_stock_pyvene_in_a_fresh_process(model_dir, tmp_path):
    config = tiny_study(model_dir, tmp_path / "study.yaml")
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                str(config),
                "--data",
                str(SHARED_DATA),
                "--out",
                str(out),
                "--quiet",
                "--set",
                "methods={iti: {settings: {top_heads: 4}}, caa: {settings: {layers: 1}}}",
                "--set",
                "eval.analyses=false",
            ]
        )
        == 0
    )
    script = textwrap.dedent(f"""
        import torch, pyvene as pv
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r})
        pvm = pv.IntervenableModel.load({str(out / "artifacts" / "composed")!r}, model)
        _, edited = pvm({{"input_ids": torch.tensor([[1, 5, 6, 7]])}}, unit_locations=None)
        assert torch.isfinite(edited.logits).all()
        print(len(pvm.interventions))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip().splitlines()[-1]) >= 2  # ITI's layer(s) + CAA's one


def test_rows_of_one_method_and_seeds_give_mean_and_sd_over_trained_runs(model_dir, tmp_path):
    """Table 1's shape: two rows of HPR (with and without angle prediction) and Diff, trained
    once per seed and reported as mean ± sd; SEA closed-form, once; rows that collect the same
    pairs share one store."""
    trained = {"train": {"epochs": 1, "progress": False}}
    config = {
        "model": str(model_dir),
        "dtype": "float32",
        "data": {"name": "truthfulqa_mc", "limit": 3},
        "methods": {
            "hpr": {**trained, "settings": {"top_layers": 2}},
            "hpr_no_angle": {**trained, "method": "hpr", "settings": {"top_layers": 2, "angle_prediction": False}},
            "diff": {**trained, "settings": {"top_layers": 1}},
            "sea": {"settings": {"layers": "1-2", "base_tokens": 4}},
        },
        "compose": "none",
        "seeds": [0, 1],
        "eval": {"limit": 4, "norm_texts": 4, "analyses": True},
    }
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "out"
    assert main(["run", str(path), "--data", str(SHARED_DATA), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["base", "hpr", "hpr_no_angle", "diff", "sea"]
    assert sorted(results["runs"]) == [f"{row}/seed{s}" for row in ("diff", "hpr", "hpr_no_angle") for s in (0, 1)]
    for row in ("hpr", "hpr_no_angle", "diff"):
        m, runs = results["methods"][row], [results["runs"][f"{row}/seed{s}"] for s in (0, 1)]
        for metric in ("mc1", "mc2"):
            values = [r[metric] for r in runs]
            assert m[metric] == pytest.approx(sum(values) / 2)
            assert m[f"{metric}_sd"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
            assert m["seeds"]["1"][metric] == values[1]
        assert (out / "artifacts" / row / "seed1" / "actedit_manifest.json").is_file()
    assert "seeds" not in results["methods"]["sea"] and (out / "artifacts" / "sea").is_dir()
    from actedit.interventions import artifact_metadata

    assert results["methods"]["hpr_no_angle"]["method"] == "hpr"
    no_angle = artifact_metadata(out / "artifacts" / "hpr_no_angle" / "seed0")["edits"][0]
    assert no_angle["method"] == "hpr" and no_angle["hyperparameters"]["angle_prediction"] is False
    assert sorted(p.name for p in (out / "activations").iterdir() if p.is_dir()) == ["hpr", "sea"]
    # −AnglePred trains what HPR trains: one training, the same modules, only the inference differs
    assert sorted(p.name for p in (out / "training").iterdir()) == ["diff", "hpr"]
    for seed in (0, 1):
        for binary in sorted((out / "artifacts" / "hpr" / f"seed{seed}").glob("*.bin")):
            a = torch.load(binary)
            b = torch.load(out / "artifacts" / "hpr_no_angle" / f"seed{seed}" / binary.name)
            assert all(torch.equal(a[k], b[k]) for k in a if k != "angle_prediction")
            assert bool(a["angle_prediction"]) and not bool(b["angle_prediction"])
    report = (out / "report.md").read_text()
    assert "sd (2 seeds; stderr" in report and "Closed-form rows are deterministic" in report


def test_a_lora_row_is_fine_tuned_per_seed_and_scored_beside_the_edits(model_dir, tmp_path):
    config = {
        "model": str(model_dir),
        "dtype": "float32",
        "data": {"name": "truthfulqa_mc", "limit": 3},
        "methods": {
            "lora": {"method": "lora", "settings": {"epochs": 1, "batch_size": 2, "learning_rate": 1.0e-2}},
            "caa": {"settings": {"layers": 1, "position_policy": "answer"}},
        },
        "compose": "all",
        "seeds": [0, 1],
        "eval": {"limit": 4, "norm_texts": 4},
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "out"
    assert main(["run", str(path), "--data", str(SHARED_DATA), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["base", "lora", "caa"]  # a fine-tuned model composes with nothing
    lora = results["methods"]["lora"]
    assert lora["method"] == "lora" and set(lora["seeds"]) == {"0", "1"} and lora["kl_to_base"] > 0
    assert lora["edits"] == [{"method": "lora", "component": None, "layers": []}]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for seed in (0, 1):
        adapter = out / "artifacts" / "lora" / f"seed{seed}"
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)  # stock PEFT
        assert any("lora_A" in n for n, _ in tuned.named_parameters())
        assert (out / "artifacts" / "lora" / f"seed{seed}_effect.json").is_file()
    seeds = results["runs"]
    assert seeds["lora/seed0"]["kl_to_base"] != seeds["lora/seed1"]["kl_to_base"]
    # the base model's scores are its own: the adapters ran on copies
    assert main(["run", str(path), "--data", str(SHARED_DATA), "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["methods"]["base"]["mc2"] == results["methods"]["base"]["mc2"]
    assert again["methods"]["lora"]["mc2"] == results["methods"]["lora"]["mc2"]


def test_table1_config_holds_every_row_of_the_papers_table():
    cfg = load_study(str(default_config_path().parent / "table1.yaml"))
    assert cfg.method_names == ["lora", "diff", "iti", "hpr", "hpr_no_angle", "sea", "caa"]
    assert cfg.seeds == [0, 1, 2] and cfg.composed_methods == []
    assert [cfg.row_method(r) for r in cfg.method_names] == ["lora", "diff", "iti", "hpr", "hpr", "sea", "caa"]
    assert [len(cfg.row_seeds(r)) for r in cfg.method_names] == [3, 3, 1, 3, 3, 1, 1]
    no_angle = cfg.pipeline("hpr_no_angle", 1)
    assert no_angle.settings.angle_prediction is False and no_angle.train.seed == 1
    assert no_angle.train.checkpoint_dir == cfg.pipeline("hpr", 1).train.checkpoint_dir  # one training
    assert no_angle.collect.dir == cfg.pipeline("diff", 0).collect.dir == cfg.pipeline("hpr").collect.dir


@pytest.mark.parametrize("task", ["seq", "toxigen"])
def test_a_study_on_another_task_writes_its_splits_baselines_and_scores(task, model_dir, tmp_path):
    """The study runs unchanged on BIG-bench and ToxiGen data: every method fitted on the task's
    own contrast pairs, scored with its own metrics, its seeded split and no-model baselines saved."""
    if task == "seq":
        folder = tmp_path / "simple_ethical_questions"
        folder.mkdir()
        examples = [
            {
                "input": f"Is the sky blue number {i}?",
                "target_scores": {f"Yes it is {i}": 1, "No it is not": 0, "The sky is green": 0},
            }
            for i in range(30)
        ]
        (folder / "task.json").write_text(json.dumps({"name": "simple_ethical_questions", "examples": examples}))
        source, metrics = folder, ["acc"]
    else:
        source = tmp_path / "toxigen.jsonl"
        source.write_text(
            "".join(
                json.dumps(
                    {
                        "text": f"I talk about weddings {i}",
                        "toxicity_ai": 1.0 + 4 * (i % 2),
                        "toxicity_human": 1.0 + 3 * (i % 2),
                    }
                )
                + "\n"
                for i in range(30)
            )
        )
        metrics = ["acc", "acc_norm"]
    config = {
        "model": str(model_dir),
        "dtype": "float32",
        "data": {"name": task, "source": str(source), "limit": 6},
        "methods": {
            "hpr": {"train": {"epochs": 1, "progress": False}, "settings": {"top_layers": 1}},
            "iti": {"settings": {"top_heads": 2}},
            "caa": {"settings": {"layers": 1, "position_policy": "answer"}},
        },
        "compose": "none",
        "eval": {"task": task, "limit": 5, "norm_texts": 2},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task and results["metrics"] == metrics and results["n_questions"] == 5
    for name in ("base", "hpr", "iti", "caa"):
        assert all(0 <= results["methods"][name][m] <= 1 for m in metrics), name
    splits = json.loads((out / "splits.json").read_text())
    assert splits["task"] == task and "random.Random(0)" in splits["rule"]
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["eval"]) & set(splits["test"])
    first_test = splits["test"][:5]
    scored = json.loads((out / "eval" / "base.json").read_text())
    assert [r["index"] for r in scored["result"]["records"]] == first_test == scored["key"]["questions"]
    baselines = results["baselines"]
    assert baselines["chance"][metrics[0]] == pytest.approx(1 / 3 if task == "seq" else 0.5)
    report = (out / "report.md").read_text()
    assert "Without a model, on these 5 questions: chance" in report
    picks = results["methods"]["base"]["picks"]
    assert list(picks) == (["choice 1", "choice 2", "choice 3"] if task == "seq" else ["No", "Yes"])
    assert sum(picks.values()) == pytest.approx(1.0) and "Answers picked" in report
    assert sum(results["methods"]["hpr"]["picks"].values()) == pytest.approx(1.0)


def test_metrics_by_group_are_means_over_each_groups_questions():
    from types import SimpleNamespace

    from actedit.eval.mc import MCRecord, MCResult
    from actedit.study.run import metrics_by_group

    task = SimpleNamespace(metrics=("acc",), group=lambda q: q.kind)
    questions = [SimpleNamespace(index=i, kind="ambiguous" if i < 3 else "disambiguated") for i in range(5)]
    records = [MCRecord(index=i, choices=[" a"], scores=[0.0], values={"acc": float(i in (0, 3, 4))}) for i in range(5)]
    result = MCResult(task="bbq", records=records, metrics={"acc": 0.6}, stderr={"acc": 0.2}, seconds=0.0, protocol={})
    assert metrics_by_group(task, questions, {"base": result}) == {
        "base": {"ambiguous": {"acc": pytest.approx(1 / 3)}, "disambiguated": {"acc": 1.0}}
    }
