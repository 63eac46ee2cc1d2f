"""Bad input gets a clear error that names the problem and the fix, never a silent wrong result.

One place for the cases a user hits first: mistyped settings (YAML, ``--set``, Python
keywords), ActAdd's prompt pair and layer, base models without a chat template, layer specs that
do not fit the model, pickled code inside an artifact, and missing shared data under CI.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import actedit.interventions as ai
from actedit.cli import main
from actedit.interventions.artifacts import ArtifactError, file_sha256, load_artifact, save_artifact
from actedit.interventions.layers import resolve_layer, resolve_layers
from actedit.interventions.registry import method_names, method_spec
from actedit.interventions.settings import UnknownSettingError
from actedit.study import default_config_path, load_study
from actedit.train.pipeline import load_config
from conftest import SHARED_DATA, make_tokenizer, tiny_model, unavailable

# ------------------------------------------------------------------------------ mistyped settings
# one near-miss per method: the message must name the key, the closest valid one and list them all
TYPOS = {
    "hpr": ("alpah", "alpha"),
    "sea": ("energy_ration", "energy_ratio"),
    "iti": ("top_headz", "top_heads"),
    "caa": ("multipler", "multiplier"),
    "actadd": ("coeficient", "coefficient"),
    "diff": ("hiden_widths", "hidden_widths"),
}


def test_every_method_has_a_typo_case():
    assert set(TYPOS) == set(method_names())


@pytest.mark.parametrize("method", method_names())
def test_settings_typo_in_yaml_lists_the_valid_keys(tmp_path, method):
    wrong, right = TYPOS[method]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": method, "settings": {wrong: 1}}))
    with pytest.raises(UnknownSettingError) as info:
        load_config(str(path))
    message = str(info.value)
    assert f"settings.{wrong}" in message and f"did you mean {right!r}" in message
    for key in method_spec(method).settings_class.field_names():
        assert key in message


@pytest.mark.parametrize("method", method_names())
def test_settings_typo_through_set_in_a_study(method):
    wrong, right = TYPOS[method]
    with pytest.raises(
        UnknownSettingError, match=rf"methods\.{method}\.settings\.{wrong} \(did you mean {right!r}\?\)"
    ):
        load_study(
            str(default_config_path()), [f"methods.{method}.settings.{wrong}=1", "methods.actadd.data.name=pairs.jsonl"]
        )


def test_train_typo_and_train_block_of_a_closed_form_method():
    with pytest.raises(UnknownSettingError, match=r"methods\.hpr\.train\.learnig_rate \(did you mean 'learning_rate'"):
        load_study(str(default_config_path()), ["methods.hpr.train.learnig_rate=1e-3"])
    with pytest.raises(UnknownSettingError, match=r"methods\.iti\.train: iti is closed-form.*top_heads"):
        load_study(str(default_config_path()), ["methods.iti.train.epochs=3"])
    with pytest.raises(UnknownSettingError, match=r"select has moved: set settings.top_layers and settings.strategy"):
        load_config(None, ["method=caa", "select.k=3"])
    with pytest.raises(UnknownSettingError, match=r"collect.layers has moved: set settings.layers"):
        load_config(None, ["method=sea", "collect.layers=1-2"])
    with pytest.raises(UnknownSettingError, match=r"eval.mc2_rule has moved: set eval.task_options.mc2_rule"):
        load_study(str(default_config_path()), ["eval.mc2_rule=labels"])


def test_typo_on_the_command_line_is_one_clear_line(capsys):
    assert main(["run", str(default_config_path()), "--set", "methods.caa.settings.multipler=4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'multiplier'" in err and "Traceback" not in err


def test_python_builders_refuse_mistyped_keywords(llama):
    v = torch.randn(32)
    with pytest.raises(
        UnknownSettingError,
        match=r"build_caa_config\(\) got unknown keyword argument multipler "
        r"\(did you mean 'multiplier'\?\); valid: .*multiplier",
    ):
        ai.build_caa_config(llama, {1: v}, multipler=4.0)
    with pytest.raises(TypeError):  # also what Python code expects from a bad keyword
        ai.build_hpr_config(llama, [1], alpah=2.0)
    with pytest.raises(UnknownSettingError, match="did you mean 'feature_function'"):
        ai.build_sea_config(llama, {1: (torch.zeros(32, 1), torch.zeros(32, 1))}, feature_fn="tanh")
    with pytest.raises(UnknownSettingError, match="did you mean 'alpha'"):
        ai.build_iti_config(llama, {}, alpah=3.0)
    with pytest.raises(UnknownSettingError, match="did you mean 'coefficient'"):
        ai.build_actadd_config(llama, {1: torch.zeros(2, 32)}, coeficient=2.0)
    pvm = ai.intervenable(llama, ai.build_caa_config(llama, {1: v}, multiplier=4.0))
    assert pvm.config.actedit["edits"][0]["hyperparameters"]["multiplier"] == 4.0
    with pytest.raises(UnknownSettingError, match="did you mean 'metadata'"):
        save_artifact(pvm, "unused", metdata={})


BAD_VALUES = {
    "hpr": {"alpha": "big"},
    "sea": {"energy_ratio": 1.5},
    "iti": {"direction": "pca"},
    "caa": {"position_policy": "sometimes"},
    "actadd": {"layers": "every"},
    "diff": {"input_norm": "per_dimension"},
}


def test_every_method_has_a_bad_value_case():
    assert set(BAD_VALUES) == set(method_names())


@pytest.mark.parametrize("method", method_names())
def test_bad_values_are_named(method):
    bad = BAD_VALUES[method]
    with pytest.raises(ValueError) as info:
        method_spec(method).settings(bad, "fit")
    assert any(str(v) in str(info.value) for v in bad.values())


# ---------------------------------------------------------------------------------------- ActAdd
@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from conftest import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("bad_inputs"))


def _pairs(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps({"prompt1": a, "prompt2": b}) + "\n" for a, b in pairs))
    return path


def test_actadd_fit_with_the_canonical_single_pair(tmp_path, chat_model_dir):
    data = _pairs(tmp_path / "love.jsonl", [("Love", "Hate")])
    args = [
        "fit",
        "--model",
        str(chat_model_dir),
        "--method",
        "actadd",
        "--set",
        f"data.name={data}",
        "--set",
        f"collect.dir={tmp_path / 'acts'}",
        "--set",
        "settings.layers=1",
        "--set",
        "settings.coefficient=5",
        "--out",
        str(tmp_path / "artifact"),
    ]
    assert main(args) == 0
    info = json.loads((tmp_path / "artifact" / "config.json").read_text())["actedit"]
    edit = info["edits"][0]
    assert edit["method"] == "actadd" and edit["layers"] == [1] and edit["component"] == "block_input"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_model_dir)
    pvm = load_artifact(tmp_path / "artifact", model)
    steering = next(iter(pvm.interventions.values()))
    steering = steering[0] if isinstance(steering, tuple) else steering
    tok = make_tokenizer()
    assert steering.length == max(len(tok("Love")["input_ids"]), len(tok("Hate")["input_ids"]))
    assert float(steering.steering.abs().sum()) > 0


def test_actadd_refuses_several_pairs_and_an_unset_layer(tmp_path, chat_model_dir, capsys):
    many = _pairs(tmp_path / "many.jsonl", [("Love", "Hate"), ("Joy", "Grief"), ("Calm", "Anger")])
    base = [
        "fit",
        "--model",
        str(chat_model_dir),
        "--method",
        "actadd",
        "--set",
        f"collect.dir={tmp_path / 'a'}",
        "--out",
        str(tmp_path / "artifact"),
    ]
    assert main(base + ["--set", f"data.name={many}", "--set", "settings.layers=1"]) == 1
    err = capsys.readouterr().err
    assert "one prompt pair" in err and "holds 3" in err and "data.limit=1" in err
    one = _pairs(tmp_path / "one.jsonl", [("Love", "Hate")])
    assert main(base + ["--set", f"data.name={one}"]) == 1
    err = capsys.readouterr().err
    assert "settings.layers is not set" in err and "never means every layer" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "artifact").exists()


# --------------------------------------------------------------------- base model, no chat template
def test_base_model_without_chat_template_uses_the_plain_text_form(tmp_path, capsys):
    from actedit.data.contrast import ContrastDataset, ContrastExample
    from actedit.data.formats import HPRFormat
    from actedit.train import pipeline

    tok = make_tokenizer()
    tok.chat_template = None
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256)
    data = tmp_path / "data.jsonl"
    ContrastDataset(
        [
            ContrastExample(f"Is the sky blue number {i}?", ["Yes it is."], ["No it is not.", "Never."], {"id": i})
            for i in range(4)
        ]
    ).to_jsonl(data)
    cfg = load_config(
        None,
        [
            "method=hpr",
            f"data.name={data}",
            "data.eval_ratio=0.5",
            f"collect.dir={tmp_path / 'acts'}",
            "settings.top_layers=2",
        ],
    )
    store = pipeline.collect(cfg, model, tok)
    out = capsys.readouterr().out
    assert "has no chat template" in out and "plain-text form" in out
    assert store.format["chat"] is False and store.num_rows > 0
    # the plain form: the lettered question with BOS, then the response's own tokens, all read
    encoded = HPRFormat(chat=False).encode(ContrastExample("Q?", ["Yes."], ["No."], {"id": 0}), tok)
    seq = encoded.sequences[0]
    assert seq.ids[0] == tok.bos_token_id and seq.read_positions[-1] == len(seq.ids) - 1
    # asking for the template explicitly is an error naming the fix
    with pytest.raises(ValueError, match="chat=true but the tokenizer .* has no chat template.*chat=false"):
        HPRFormat(chat=True).for_tokenizer(tok)


# ------------------------------------------------------------------------------ layer specs
def test_a_study_refuses_layers_beyond_the_depth_before_any_work(tmp_path, chat_model_dir, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(chat_model_dir),
                "dtype": "float32",
                "data": {"name": "truthfulqa_mc", "limit": 2},
                "out": str(tmp_path / "out"),
                "methods": {
                    "hpr": {"train": {"epochs": 1}, "settings": {"top_layers": 2}},
                    "sea": {"settings": {"layers": "10-29"}},
                },
            }
        )
    )
    if not (SHARED_DATA / "mc_task.json").is_file():
        unavailable(f"TruthfulQA data not found at {SHARED_DATA}")
    assert main(["run", str(config), "--data", str(SHARED_DATA)]) == 1
    err = capsys.readouterr().err
    assert "methods.sea.settings.layers" in err and "it has 3 layers (0..2)" in err and "'1/3:'" in err
    assert not (tmp_path / "out" / "activations").exists()  # nothing was collected first


def test_default_config_runs_unchanged_on_another_depth():
    """configs/default.yaml's layer specs are relative: they fit models of 12, 24, 30 and 32 layers."""
    study = load_study(str(default_config_path()))
    for depth in (12, 24, 30, 32):
        model = tiny_model("llama", num_hidden_layers=depth)
        resolved = {m: study.pipeline(m).for_model(model) for m in study.method_names}
        assert resolved["sea"].settings.layers == resolve_layers("1/3:", depth)
        assert resolved["caa"].settings.layers == [resolve_layer(0.4, depth)]
        assert resolved["hpr"].settings.layers == list(range(depth))
    assert resolved["caa"].settings.layers == [13]  # 32 layers: CAA's layer 13 of Llama-2-7B


# ----------------------------------------------------------------------- pickles in artifacts
class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _poisoned_artifact(llama, tmp_path) -> tuple:
    path = save_artifact(ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(32)})), tmp_path / "art")
    marker = tmp_path / "code-ran"
    binary = next(path.glob("intkey_*.bin"))
    binary.write_bytes(pickle.dumps({"intervention": _RunsCode(str(marker))}))
    manifest = json.loads((path / "actedit_manifest.json").read_text())  # a consistent manifest, as an attacker
    manifest["files"][binary.name] = {"bytes": binary.stat().st_size, "sha256": file_sha256(binary)}
    (path / "actedit_manifest.json").write_text(json.dumps(manifest))
    return path, marker


def test_torch_refuses_code_in_pickles():
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert (major, minor) >= (2, 6), "actedit requires torch >= 2.6 (torch.load weights_only=True by default)"


def test_an_artifact_holding_a_code_pickle_is_refused_by_load_artifact(llama, tmp_path):
    path, marker = _poisoned_artifact(llama, tmp_path)
    with pytest.raises(ArtifactError, match="refused to load .* could run arbitrary code"):
        load_artifact(path, llama)
    assert not marker.exists()


def test_an_artifact_holding_a_code_pickle_is_refused_by_stock_pyvene(llama, tmp_path):
    path, marker = _poisoned_artifact(llama, tmp_path)
    llama.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(f"""
        import sys
        import pyvene as pv
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
        try:
            pv.IntervenableModel.load({str(path)!r}, model)
        except Exception as exc:
            print("REFUSED", type(exc).__name__)
            sys.exit(0)
        print("LOADED")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "REFUSED" in done.stdout, done.stdout + done.stderr[-2000:]
    assert not marker.exists()


# ------------------------------------------------------------------------- shared data under CI
def test_missing_shared_data_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        unavailable("TruthfulQA data not found")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        unavailable("TruthfulQA data not found")


# ------------------------------------------------------------------------------------ quiet start
def test_the_cli_starts_quietly():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "actedit"), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert done.returncode == 0 and "nnsight" not in done.stdout + done.stderr
    assert done.stdout.startswith("usage: actedit")


def test_names_renamed_by_the_layout_redesign_say_where_they_went(tmp_path):
    """The YAML block ``fit`` is ``settings`` now; ``top_k`` is ``top_layers`` (HPR) or
    ``top_heads`` (ITI): each old name is an error naming the new one, in every place it was written."""
    with pytest.raises(UnknownSettingError, match=r"methods\.hpr\.fit has moved: set methods\.hpr\.settings"):
        load_study(str(default_config_path()), ["methods.hpr.fit.alpha=1"])
    with pytest.raises(UnknownSettingError, match=r"^fit has moved: set settings"):
        load_config(None, ["method=caa", "fit.layers=1"])
    with pytest.raises(UnknownSettingError, match=r"methods\.hpr\.settings\.top_k has moved: set top_layers"):
        load_study(str(default_config_path()), ["methods.hpr.settings.top_k=3"])
    with pytest.raises(UnknownSettingError, match=r"methods\.iti\.settings\.top_k has moved: set top_heads"):
        load_study(str(default_config_path()), ["methods.iti.settings.top_k=3"])
    with pytest.raises(UnknownSettingError, match=r"top_k has moved: set top_heads"):
        method_spec("iti").settings({"top_k": 4})
