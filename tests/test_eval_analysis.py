"""Analyses: flip table, norm statistics, norms through pyvene, side effects (LM loss, KL), layer curves, plots.

Hand-computed toy cases for the pure statistics; for the model-based analyses, independent
references: a plain torch forward hook on the decoder layer (base norms), the edit applied by hand
to those activations (edited layer), and Hugging Face's own ``labels=`` loss (LM loss).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from actedit.eval import analysis as A
from actedit.eval import plots as P
from actedit.interventions import build_caa_config, build_hpr_config, compose, intervenable
from conftest import tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CharTokenizer:
    """Characters → ids 4..96, BOS = 1 first, pad 0, eos 2 (enough for encode_texts)."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1

    def __call__(self, text, add_special_tokens=True):
        ids = [4 + (ord(c) % 93) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def inputs():
    texts = ["The sea is deep.", "Water boils at one hundred degrees.", "Bees dance.", "Chess has sixty-four squares."]
    return A.encode_texts(CharTokenizer(), texts)


def hooked_block_outputs(model, inputs, layers):
    """Residual stream after each decoder layer from plain torch forward hooks (no pyvene)."""
    captured, handles = {}, []
    for layer in layers:

        def hook(module, args, output, layer=layer):
            captured[layer] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        handles.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


# ---------------------------------------------------------------------------- pure statistics
def test_flip_table_toy_case():
    base = [True, True, False, False, False]
    edited = [True, False, True, False, True]
    t = A.prediction_flips(base, edited)
    assert t.n == 5
    assert (t.false_to_true, t.true_to_false, t.remains_true, t.remains_false) == (40.0, 20.0, 20.0, 20.0)
    assert t.base_accuracy == 40.0 and t.accuracy == 60.0
    assert t.shift_rate == 60.0 and t.net_gain == 20.0
    assert t.counts == {"false_to_true": 2, "true_to_false": 1, "remains_true": 1, "remains_false": 1}
    json.dumps(t.to_dict())
    # the same from per-question records in another order, matched by index
    base_records = [{"index": i, "values": {"mc1": float(b)}} for i, b in enumerate(base)]
    edited_records = [{"index": i, "values": {"mc1": float(e)}} for i, e in reversed(list(enumerate(edited)))]
    assert A.flips_from_records(base_records, edited_records, "mc1") == t
    with pytest.raises(ValueError, match="no metric 'acc'"):
        A.flips_from_records(base_records, edited_records, "acc")
    with pytest.raises(ValueError, match="differ in length"):
        A.prediction_flips([True], [True, False])
    with pytest.raises(ValueError, match="booleans"):
        A.prediction_flips([0.5], [True])


def test_norm_statistics_and_drift_toy_case():
    s = A.norm_statistics([3.0, 4.0, 5.0, 6.0], layer=7)
    assert (s.layer, s.n, s.mean, s.min, s.max) == (7, 4, 4.5, 3.0, 6.0)
    assert s.std == pytest.approx(math.sqrt(1.25))  # population std: mean of (1.5², 0.5², 0.5², 1.5²)
    assert (s.q1, s.median, s.q3) == pytest.approx((3.75, 4.5, 5.25))
    assert A.relative_drift([2.0, 4.0], [3.0, 4.0]) == pytest.approx(0.25)  # (1/2 + 0/4) / 2
    assert A.relative_drift([2.0, 4.0], [1.0, 6.0]) == pytest.approx(0.5)  # (1/2 + 2/4) / 2
    comparison = A.NormComparison(
        A.NormProfile("base", "block_output", {0: [2.0, 4.0], 1: [1.0, 1.0]}),
        {"edit": A.NormProfile("edit", "block_output", {0: [3.0, 4.0], 1: [1.0, 1.5]})},
    )
    assert comparison.drift() == {"edit": {0: pytest.approx(0.25), 1: pytest.approx(0.25)}}
    summary = comparison.summary()
    assert summary["profiles"]["edit"]["0"]["mean"] == 3.5 and summary["profiles"]["base"]["0"]["std"] == 1.0
    assert summary["profiles"]["edit"]["1"]["relative_drift"] == pytest.approx(0.25)
    again = A.NormComparison.from_dict(json.loads(json.dumps(comparison.to_dict())))
    assert again.drift() == comparison.drift()
    with pytest.raises(ValueError, match="token-aligned"):
        A.relative_drift([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="other layers or tokens"):
        A.NormComparison(comparison.base, {"x": A.NormProfile("x", "block_output", {0: [1.0], 1: [1.0]})})


# --------------------------------------------------------------------------- norms via pyvene
def test_base_norms_equal_torch_hook(model, inputs):
    profile = A.collect_norms(model, inputs, batch_size=3)  # two batches, the second trimmed
    captured = hooked_block_outputs(model, inputs, [0, 1, 2])
    real = inputs["attention_mask"].bool()
    assert profile.n_tokens == int(real.sum())
    for layer in range(3):
        expected = captured[layer][real].norm(dim=-1)
        assert torch.allclose(torch.tensor(profile.norms[layer]), expected, atol=1e-6, rtol=1e-5)
    # without each row's first token (BOS / attention sink)
    later = real.clone()
    later[:, 0] = False
    skipped = A.collect_norms(model, inputs, [2], skip_first=1)
    assert torch.allclose(torch.tensor(skipped.norms[2]), captured[2][later].norm(dim=-1), atol=1e-6, rtol=1e-5)


def test_edited_norms_equal_manual_edit(model, inputs):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(32, generator=gen) * 0.1
    hpr_config = build_hpr_config(model, [1])
    hpr = hpr_config.representations[0].intervention
    torch.manual_seed(0)
    with torch.no_grad():  # a probe that puts many tokens on the negative side, so the rotation acts
        hpr.probe.weight.normal_()
    base_h = hooked_block_outputs(model, inputs, [0, 1])
    real = inputs["attention_mask"].bool()

    caa = intervenable(model, build_caa_config(model, {1: v}, multiplier=2.0))
    comparison = A.activation_norms(model, inputs, {"caa": caa}, layers=[0, 1], batch_size=4)
    assert comparison.edits["caa"].norms[0] == pytest.approx(comparison.base.norms[0], rel=1e-6)
    expected = (base_h[1] + 2.0 * v)[real].norm(dim=-1)
    assert torch.allclose(torch.tensor(comparison.edits["caa"].norms[1]), expected, atol=1e-5, rtol=1e-5)

    # the collector runs after an edit at the same site: it reads the rotated activations exactly
    edited = intervenable(model, hpr_config)
    acts = A.layer_activations(edited, inputs, [1])[1]
    with torch.no_grad():
        manual = hpr.edit(base_h[1])[real]
    changed = (manual - base_h[1][real]).norm(dim=-1) > 1e-4
    assert changed.any(), "the test rotation must move some activations"
    assert torch.allclose(acts, manual, atol=1e-5, rtol=1e-5)
    # composed CAA then HPR at the same layer: norms are those of CAA (HPR keeps norms)
    both = intervenable(model, compose(build_caa_config(model, {1: v}, multiplier=2.0), hpr_config))
    norms = A.collect_norms(both, inputs, [1]).norms[1]
    assert torch.allclose(torch.tensor(norms), expected, atol=1e-5, rtol=1e-5)
    # the edited model itself is untouched by the collection (no collector left behind)
    assert len(edited.interventions) == 1


# ------------------------------------------------------------------------------ side effects
def test_lm_loss_equals_independent_computation(model):
    tok = CharTokenizer()
    texts = list(A.NEUTRAL_TEXTS[:5])
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"][:40]])
            loss = model(input_ids=ids, labels=ids).loss  # Hugging Face's own shifted cross-entropy
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert A.lm_loss(model, tok, texts, batch_size=2, max_length=40) == pytest.approx(total / count, rel=1e-5)


def test_kl_zero_for_identity_edit_positive_otherwise(model):
    tok = CharTokenizer()
    texts = list(A.NEUTRAL_TEXTS[:6])
    identity = intervenable(model, build_caa_config(model, {0: torch.zeros(32), 2: torch.zeros(32)}))
    same = A.side_effects(identity, tok, texts, batch_size=4, max_length=32)
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.kl_max == pytest.approx(0.0, abs=1e-6)
    assert same.edited_loss == pytest.approx(same.base_loss, rel=1e-6)
    assert same.base_loss == pytest.approx(A.lm_loss(model, tok, texts, max_length=32), rel=1e-6)

    steer = intervenable(model, build_caa_config(model, {1: 0.3 * torch.ones(32)}))
    shifted = A.side_effects(steer, tok, texts, batch_size=4, max_length=32)
    assert shifted.kl > 1e-4 and shifted.kl_max >= shifted.kl
    assert shifted.base_loss == pytest.approx(same.base_loss, rel=1e-6)
    assert shifted.edited_loss == pytest.approx(A.lm_loss(steer, tok, texts, max_length=32), rel=1e-6)
    assert shifted.n_loss_tokens == sum(min(len(t) + 1, 32) - 1 for t in texts)
    json.dumps(shifted.to_dict())
    assert len(A.NEUTRAL_TEXTS) >= 20


# --------------------------------------------------------------------------- layer count + plots
def test_accuracy_vs_num_layers_and_plots(model, inputs, tmp_path):
    calls = []

    def score(layers):
        calls.append(list(layers))
        return {"mc1": 0.3 + 0.1 * len(layers) - 0.05 * max(0, len(layers) - 2) ** 2, "mc2": 0.5}

    curve = A.accuracy_vs_num_layers(score, [14, 13, 15, 3], score_base=True)
    assert calls == [[], [14], [14, 13], [14, 13, 15], [14, 13, 15, 3]]
    assert curve.ks == [1, 2, 3, 4] and curve.baseline == {"mc1": 0.3, "mc2": 0.5}
    assert curve.scores["mc1"] == pytest.approx([0.4, 0.5, 0.55, 0.5])
    assert curve.best_k("mc1") == 3 and curve.layers_for(2) == [14, 13]
    plain = A.accuracy_vs_num_layers(lambda layers: float(len(layers)), [2, 0, 1], max_k=2, baseline=0.0)
    assert plain.scores == {"accuracy": [1.0, 2.0]} and plain.baseline == {"accuracy": 0.0}

    # the Fig. 6 loop on a real edit: restrict_layers(full edit, top k) equals an edit built on those layers
    tok = CharTokenizer()
    texts = list(A.NEUTRAL_TEXTS[:3])
    vectors = {layer: 0.1 * torch.randn(32, generator=torch.Generator().manual_seed(layer)) for layer in range(3)}
    full = intervenable(model, build_caa_config(model, vectors))
    curve_loss = A.accuracy_vs_num_layers(
        lambda layers: A.lm_loss(A.restrict_layers(full, layers), tok, texts, max_length=24),
        [2, 0, 1],
        score_base=True,
        metric="loss",
    )
    assert curve_loss.baseline["loss"] == pytest.approx(A.lm_loss(model, tok, texts, max_length=24), rel=1e-6)
    only = intervenable(model, build_caa_config(model, {2: vectors[2], 0: vectors[0]}))
    assert curve_loss.scores["loss"][1] == pytest.approx(A.lm_loss(only, tok, texts, max_length=24), rel=1e-6)
    assert curve_loss.scores["loss"][2] == pytest.approx(A.lm_loss(full, tok, texts, max_length=24), rel=1e-6)
    assert len({round(x, 6) for x in curve_loss.scores["loss"] + [curve_loss.baseline["loss"]]}) == 4
    assert A.restrict_layers(full, []) is model
    with pytest.raises(ValueError, match="not edited"):
        A.restrict_layers(only, [1])

    caa = intervenable(model, build_caa_config(model, {1: 0.2 * torch.ones(32)}))
    comparison = A.activation_norms(model, inputs, {"caa": caa})
    flips = {"edit": A.prediction_flips([True, False, False], [True, True, False])}
    paths = [
        P.plot_norms(comparison, tmp_path / "norms.png"),
        P.plot_drift(comparison, tmp_path / "drift.png"),
        P.plot_flips(flips, tmp_path / "flips.png"),
        P.plot_layer_count(curve, tmp_path / "layers.png", ylabel="accuracy"),
        P.plot_per_layer(
            {0: 0.5, 1: 0.7, 2: 0.6}, "probe accuracy", tmp_path / "sub" / "probe.png", highlight=[1], baseline=0.5
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    json.dumps({"norms": comparison.to_dict(), "curve": curve.to_dict()})


def test_answer_picks_and_the_constant_answer_warning():
    from actedit.eval.analysis import answer_picks, constant_answer
    from actedit.eval.mc import MCRecord

    same = [MCRecord(index=i, choices=[" No", " Yes"], scores=[-1.0, -2.0 + (i % 4 == 0)], values={}) for i in range(8)]
    # question 0 and 4 tie at -1.0: the first choice wins, as np.argmax
    assert answer_picks(same) == {"No": 1.0, "Yes": 0.0} and constant_answer(answer_picks(same)) == "No"
    varied = [
        {"index": 0, "choices": [" a", " b", " c"], "scores": [-3.0, -1.0, -2.0], "values": {}},
        {"index": 1, "choices": [" d", " e", " f"], "scores": [-1.0, -5.0, -2.0], "values": {}},
    ]
    assert answer_picks(varied) == {"choice 1": 0.5, "choice 2": 0.5, "choice 3": 0.0}
    assert constant_answer(answer_picks(varied)) is None
    assert answer_picks(varied + [{"index": 2, "choices": [" x"], "scores": [0.0], "values": {}}]) is None
    assert answer_picks([]) is None and constant_answer(None) is None
