"""``actedit collect / fit / train`` from YAML configs on a tiny local model and TruthfulQA."""

import dataclasses
import json

import pytest
import torch

from actedit.cli import main
from actedit.interventions import load_artifact
from actedit.train.pipeline import load_config
from conftest import SHARED_DATA, tiny_model


@pytest.fixture(scope="module")
def model_dir(chat_model_root):
    return chat_model_root


def common(root, method):
    return [
        "--model",
        str(root / "model"),
        "--data",
        str(SHARED_DATA),
        "--method",
        method,
        "--set",
        "data.limit=3",
        "--set",
        f"collect.dir={root / method / 'acts'}",
        "--out",
        str(root / method / "artifact"),
    ]


def test_train_hpr_end_to_end(model_dir):
    args = common(model_dir, "hpr") + [
        "--set",
        "train.epochs=1",
        "--set",
        "train.progress=false",
        "--set",
        "settings.top_layers=2",
    ]
    assert main(["collect", *args]) == 0
    assert main(["train", *args]) == 0
    info = json.loads((model_dir / "hpr" / "artifact" / "config.json").read_text())["actedit"]
    selection = info["layer_selection"]
    assert len(selection["selected"]) == 2 and info["edits"][0]["layers"] == selection["selected"]
    assert (model_dir / "hpr" / "artifact_probe_accuracy.png").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir / "model")
    pvm = load_artifact(model_dir / "hpr" / "artifact", model)
    _, out = pvm({"input_ids": torch.tensor([[1, 5, 6, 7]])})
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("method", ["caa", "iti"])
def test_fit_closed_form_end_to_end(model_dir, method):
    extra = ["--set", "settings.top_heads=4"] if method == "iti" else ["--set", "settings.layers=-1"]
    assert main(["fit", *common(model_dir, method), *extra]) == 0  # collects on the way
    info = json.loads((model_dir / method / "artifact" / "config.json").read_text())["actedit"]
    assert info["edits"][0]["method"] == method and info["data"]["limit"] == 3


def test_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: hpr\ncolect: {}\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="valid keys of collect"):
        load_config(None, ["collect.batchsize=4"])
    with pytest.raises(ValueError, match="unknown method"):
        load_config(None, ["method=rome"])
    assert main(["train", "--method", "sea"]) == 1
    assert "closed-form, not trained: use `actedit fit`" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
    assert "No config file" in capsys.readouterr().err


def test_caa_with_a_fixed_layer_collects_that_layer_only(model_dir, capsys):
    from actedit.data.store import ActivationStore

    args = common(model_dir, "caa") + [
        "--set",
        f"collect.dir={model_dir / 'caa1' / 'acts'}",
        "--out",
        str(model_dir / "caa1" / "artifact"),
        "--set",
        "settings.layers=1",
    ]
    assert main(["fit", *args]) == 0
    assert ActivationStore(model_dir / "caa1" / "acts").layers == [1]
    info = json.loads((model_dir / "caa1" / "artifact" / "config.json").read_text())["actedit"]
    assert info["edits"][0]["layers"] == [1]
    other = args[:-2] + ["--set", "settings.layers=0"]  # the store holds layer 1 only
    assert main(["fit", *other]) == 1
    assert "layers [0] are not in the activation store" in capsys.readouterr().err


def test_a_layer_spec_is_resolved_once_per_model_and_again_after_a_change():
    model = tiny_model("llama")
    depth = model.config.num_hidden_layers
    cfg = load_config(None, ["method=sea", "settings.layers='-2:'"]).for_model(model)
    assert cfg.settings.layers == [depth - 2, depth - 1] and cfg.depth == depth
    assert cfg.for_model(model) is cfg  # resolved once
    changed = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, layers="all"))
    assert changed.for_model(model).settings.layers == list(range(depth))
