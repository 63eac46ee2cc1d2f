"""CAA: the vector is the mean difference of paired activations (numpy), and the edit adds m·v to
the residual stream after the block at the policy's positions, generated tokens included: the
edited model's logits and greedy tokens equal those of the plain model with a torch forward hook
that adds m·v where the paper says."""

import numpy as np
import pytest
import torch

from actedit.interventions import CAAIntervention, intervenable
from actedit.interventions.caa import CAASettings, CAAVectors, fit_caa
from actedit.interventions.registry import FitContext, method_spec
from conftest import tiny_model

LAYER = 1
# two rows of 7 tokens, the first left-padded by 2 (pad id 0)
IDS = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 9, 4, 11, 12, 13, 14]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])


def activations_with_a_nan(seed=9):
    """``(good, nan)``: layer 0 → (10, 8) activations, and a copy with one NaN (the fits' bad inputs)."""
    rng = np.random.default_rng(seed)
    good = {0: rng.normal(size=(10, 8))}
    nan = {0: good[0].copy()}
    nan[0][3, 2] = np.nan
    return good, nan


def last_token_block_outputs(model, layer, sequences):
    """(N, d) output of decoder layer ``layer`` at the last token of each sequence, by a torch hook."""
    rows = []

    def grab(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        rows.append(hidden[0, -1].detach().clone())

    handle = model.model.layers[layer].register_forward_hook(grab)
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return torch.stack(rows)


def caa_reference_hook(model, layer, shift, start):
    """A forward hook adding ``shift`` to the output of decoder layer ``layer`` at every real token
    whose index among its row's real tokens is >= ``start`` (negative: counted from the end of the
    row's prompt, here the whole forward). ``model`` is called with ``attention_mask`` in kwargs."""
    state = {}

    def pre(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs["input_ids"]
        state["mask"] = torch.ones_like(ids) if mask is None else mask

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mask = state["mask"]
        real_index = mask.cumsum(-1) - 1
        prompt_length = mask.sum(-1, keepdim=True)
        threshold = start if start >= 0 else prompt_length + start
        edited = (mask > 0) & (real_index >= threshold)
        hidden = hidden + shift * edited[..., None].to(hidden.dtype)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    return [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.model.layers[layer].register_forward_hook(add),
    ]


def fitted_caa(model, seed=0, pairs=6):
    """CAA vectors fitted on the tiny model's own activations: random positive and negative
    sequences sharing a prompt, read at their last (answer) token."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 90, (5,), generator=gen).tolist() for _ in range(pairs)]
    pos = [p + [int(torch.randint(3, 90, (1,), generator=gen))] for p in prompts]
    neg = [p + [int(torch.randint(3, 90, (1,), generator=gen))] for p in prompts]
    acts_pos = last_token_block_outputs(model, LAYER, pos)
    acts_neg = last_token_block_outputs(model, LAYER, neg)
    return fit_caa({LAYER: acts_pos}, {LAYER: acts_neg}), acts_pos, acts_neg


# ------------------------------------------------------------------------------------- fit
def test_caa_equals_numpy_mean_difference():
    rng = np.random.default_rng(7)
    pos = {3: rng.normal(size=(40, 32)), 5: rng.normal(size=(40, 32)).astype(np.float32)}
    neg = {3: rng.normal(size=(40, 32)), 5: rng.normal(size=(40, 32)).astype(np.float32)}
    fit = fit_caa(pos, neg)
    assert isinstance(fit, CAAVectors) and fit.num_pairs == 40
    for layer in (3, 5):
        expected = np.mean(pos[layer].astype(np.float64) - neg[layer].astype(np.float64), axis=0)
        np.testing.assert_allclose(fit.vectors[layer].numpy(), expected, rtol=1e-6, atol=1e-7)
    model = tiny_model("llama", num_hidden_layers=6)
    config = fit.config(model, multiplier=2.5, position_start=4)
    for rep in config.representations:
        assert torch.equal(rep.intervention.vector, fit.vectors[rep.layer])
        assert float(rep.intervention.multiplier) == 2.5 and int(rep.intervention.position_start) == 4


def test_caa_vector_of_model_activations_and_its_config_record():
    model = tiny_model("llama")
    fit, acts_pos, acts_neg = fitted_caa(model)
    expected = (acts_pos.double() - acts_neg.double()).numpy().mean(axis=0)
    assert fit.vectors[LAYER].dtype == torch.float32 and fit.num_pairs == 6
    np.testing.assert_allclose(fit.vectors[LAYER].numpy(), expected, rtol=1e-6, atol=1e-6)
    config = fit.config(model, multiplier=-3.0, position_start=2)
    assert [(r.layer, r.component) for r in config.representations] == [(LAYER, "block_output")]
    edit = config.actedit["edits"][0]
    assert edit["method"] == "caa" and edit["layers"] == [LAYER]
    assert edit["hyperparameters"] == {"multiplier": -3.0, "position_policy": "from_position", "position_start": 2}
    assert config.actedit["settings"] == {"num_pairs": 6}


def test_registered_fit_builds_the_same_modules_from_its_settings():
    model = tiny_model("llama")
    fit, acts_pos, acts_neg = fitted_caa(model, seed=1)
    spec = method_spec("caa")
    settings = spec.settings({"multiplier": 4.0, "position_start": -2}, layers=[LAYER])
    result = spec.fit({"pos": {LAYER: acts_pos}, "neg": {LAYER: acts_neg}}, settings, FitContext(width=32, num_heads=4))
    module = result.modules[LAYER]
    assert list(result.modules) == [LAYER] and result.record == {"num_pairs": 6}
    assert isinstance(module, CAAIntervention) and torch.equal(module.vector, fit.vectors[LAYER])
    assert float(module.multiplier) == 4.0 and int(module.position_start) == -2
    assert module.policy.name.lower() == "from_position"


# ------------------------------------------------------------------------------------ edit
def test_default_edit_adds_m_v_at_every_position():
    v = torch.randn(8, dtype=torch.float64)
    caa = CAAIntervention(embed_dim=8, vector=v, multiplier=-1.5).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert caa.policy.name.lower() == "from_position" and int(caa.position_start) == 0
    torch.testing.assert_close(caa(x), x - 1.5 * v.float().double(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("start", [0, 3, -1, -3])
def test_fitted_edit_equals_a_torch_hook_adding_m_v(start):
    """Logits of the edited model on a left-padded batch equal those of the plain model with
    m·v added by a hook at the positions from ``start`` on (padding never edited)."""
    model = tiny_model("llama", seed=2)
    fit, _, _ = fitted_caa(model)
    multiplier = 3.0
    pvm = intervenable(model, fit.config(model, multiplier=multiplier, position_start=start))
    batch = {"input_ids": IDS, "attention_mask": MASK}
    with torch.no_grad():
        plain = model(**batch).logits
        _, edited = pvm(dict(batch), unit_locations=None)
        handles = caa_reference_hook(model, LAYER, multiplier * fit.vectors[LAYER], start)
        try:
            reference = model(**batch).logits
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(edited.logits, reference, rtol=1e-5, atol=1e-5)
    real = MASK.bool()
    assert not torch.allclose(edited.logits[real], plain[real], atol=1e-3)  # the edit changes the output


def test_fitted_edit_steers_generated_tokens_too():
    """From the last prompt token on (start -1), each generated token is steered as well: the
    greedy tokens of the edited model (KV cache) equal a loop that re-runs the whole sequence
    with the hook adding m·v from the last prompt token to the end."""
    model = tiny_model("llama", seed=3)
    fit, _, _ = fitted_caa(model, seed=2)
    multiplier = 8.0
    prompt = torch.tensor([[5, 6, 7, 8]])
    n_prompt = prompt.shape[1]
    pvm = intervenable(model, fit.config(model, multiplier=multiplier, position_start=-1))
    _, generated = pvm.generate(
        {"input_ids": prompt},
        unit_locations=None,
        intervene_on_prompt=True,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    shift = multiplier * fit.vectors[LAYER]

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        edited = torch.arange(hidden.shape[1]) >= n_prompt - 1
        hidden = hidden + shift * edited[None, :, None].to(hidden.dtype)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    ids = prompt[0]
    handle = model.model.layers[LAYER].register_forward_hook(add)
    try:
        with torch.no_grad():
            for _ in range(6):
                logits = model(input_ids=ids[None], use_cache=False).logits
                ids = torch.cat([ids, logits[0, -1].argmax().reshape(1)])
    finally:
        handle.remove()
    assert torch.equal(generated[0], ids), (generated[0].tolist(), ids.tolist())
    plain = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0]
    assert not torch.equal(plain, ids), "the steering must change some generated token"


# ------------------------------------------------------------------------------ bad inputs
def test_fit_caa_bad_inputs_raise_clear_errors():
    good, nan = activations_with_a_nan()
    with pytest.raises(ValueError, match="NaN"):
        fit_caa(good, nan)
    with pytest.raises(ValueError, match="empty"):
        fit_caa({0: np.zeros((0, 8))}, {0: np.zeros((0, 8))})
    with pytest.raises(ValueError, match="no layers"):
        fit_caa({}, {})
    with pytest.raises(ValueError, match="rows"):
        fit_caa(good, {0: good[0][:9]})
    with pytest.raises(ValueError, match="layers"):
        fit_caa(good, {1: good[0]})
    with pytest.raises(ValueError, match="2-D"):
        fit_caa({0: good[0][0]}, {0: good[0][0]})
    with pytest.raises(ValueError, match="mapping|map layer"):
        fit_caa(good[0], good[0])


def test_intervention_and_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="length 7 but the site width is 8"):
        CAAIntervention(embed_dim=8, vector=torch.ones(7))
    with pytest.raises(ValueError, match="NaN or inf"):
        CAAIntervention(embed_dim=4, vector=torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="position_start must be an integer"):
        CAASettings(layers=[1], position_start=1.5)
    with pytest.raises(ValueError, match="at least one layer"):
        CAAVectors(vectors={}, num_pairs=3)
