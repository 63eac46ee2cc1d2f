"""ActAdd: the x-vector is coeff · (a(prompt₁) − a(prompt₂)), the shorter prompt right-padded with
a space token, read at the input of the block; the edit adds its row i to the i-th real token of
the prompt pass only. Checked against numpy and against the plain model with a torch hook."""

import numpy as np
import pytest
import torch
from test_caa import activations_with_a_nan

from actedit.data.contrast import PromptPair
from actedit.data.formats import ActAddFormat
from actedit.interventions import ActAddIntervention, intervenable
from actedit.interventions.actadd import ActAddSteering, fit_actadd
from actedit.interventions.registry import FitContext, method_spec
from conftest import make_tokenizer, tiny_model

LAYER = 1
PROMPT1, PROMPT2 = "Love", "Hate"  # Turner et al.'s example; "Hate" is the shorter one here
COEFFICIENT = 5.0


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", seed=1, vocab_size=len(tok))


def padded_steering_ids(tok):
    """Both steering prompts tokenized with BOS, the shorter right-padded with the space token."""
    ids1, ids2 = tok(PROMPT1).input_ids, tok(PROMPT2).input_ids
    (space,) = tok(" ", add_special_tokens=False).input_ids
    n = max(len(ids1), len(ids2))
    return ids1 + [space] * (n - len(ids1)), ids2 + [space] * (n - len(ids2))


def block_inputs(model, layer, ids):
    """(seq, d) input of decoder layer ``layer`` (``block_input``) for one unpadded sequence."""
    seen = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden[0].detach().clone())

    handle = model.model.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen[0]


def steering_of(model, tok):
    a1, a2 = (block_inputs(model, LAYER, ids) for ids in padded_steering_ids(tok))
    return fit_actadd({LAYER: a1}, {LAYER: a2}, coefficient=COEFFICIENT), a1, a2


def add_rows_hook(model, layer, steering, edited_of):
    """A pre-hook adding ``steering[i]`` to the input of decoder layer ``layer`` at the tokens
    ``edited_of(real_index, n)`` selects; ``real_index`` is each token's index among its row's real
    tokens (-1 for padding), from the ``attention_mask`` the model is called with."""
    state = {}
    n = steering.shape[0]

    def read_mask(module, args, kwargs):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        state["mask"] = torch.ones_like(ids) if mask is None else mask

    def add(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = state["mask"]
        real_index = torch.where(mask > 0, mask.cumsum(-1) - 1, -1)
        edited = edited_of(real_index, n) & (real_index >= 0)
        rows = steering[real_index.clamp(0, n - 1)] * edited[..., None].to(hidden.dtype)
        if args:
            return (hidden + rows,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden + rows}

    return [
        model.register_forward_pre_hook(read_mask, with_kwargs=True),
        model.model.layers[layer].register_forward_pre_hook(add, with_kwargs=True),
    ]


# ------------------------------------------------------------------------------------- fit
def test_actadd_equals_numpy_difference():
    rng = np.random.default_rng(8)
    a1 = {1: torch.tensor(rng.normal(size=(5, 32)))}
    a2 = {1: torch.tensor(rng.normal(size=(5, 32)))}
    fit = fit_actadd(a1, a2, coefficient=4.0)
    assert isinstance(fit, ActAddSteering) and fit.length == 5
    np.testing.assert_allclose(fit.steering[1].numpy(), 4.0 * (a1[1].numpy() - a2[1].numpy()), rtol=1e-6)
    config = fit.config(tiny_model("llama"))
    rep = config.representations[0]
    assert rep.component == "block_input" and torch.equal(rep.intervention.steering, fit.steering[1])
    # a length mismatch is an error unless asked to zero-extend
    short = {1: a2[1][:3]}
    with pytest.raises(ValueError, match="Right-pad"):
        fit_actadd(a1, short)
    padded = fit_actadd(a1, short, allow_length_mismatch=True)
    expected = a1[1].numpy().copy()
    expected[:3] -= short[1].numpy()
    np.testing.assert_allclose(padded.steering[1].numpy(), expected, rtol=1e-6)


def test_x_vector_of_the_padded_steering_prompts(model, tok):
    ids1, ids2 = padded_steering_ids(tok)
    assert len(tok(PROMPT2).input_ids) < len(ids2) == len(ids1)  # the shorter prompt was padded
    encoded = ActAddFormat().encode(PromptPair(PROMPT1, PROMPT2), tok).sequences
    assert [s.ids for s in encoded] == [ids1, ids2]  # the format pads as the paper does
    fit, a1, a2 = steering_of(model, tok)
    assert fit.length == len(ids1) and fit.coefficient == COEFFICIENT
    expected = COEFFICIENT * (a1.double() - a2.double()).numpy()
    np.testing.assert_allclose(fit.steering[LAYER].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(fit.steering[LAYER][0], torch.zeros(32))  # both prompts start with BOS


def test_registered_fit_applies_the_coefficient(model, tok):
    fit, a1, a2 = steering_of(model, tok)
    spec = method_spec("actadd")
    settings = spec.settings({"coefficient": COEFFICIENT}, layers=[LAYER])
    result = spec.fit({"pos": {LAYER: a1}, "neg": {LAYER: a2}}, settings, FitContext(width=32, num_heads=4))
    module = result.modules[LAYER]
    assert list(result.modules) == [LAYER] and result.record == {"length": fit.length}
    assert isinstance(module, ActAddIntervention) and torch.equal(module.steering, fit.steering[LAYER])
    assert module.policy.name.lower() == "prompt"


# ------------------------------------------------------------------------------------ edit
def test_rows_go_to_the_first_n_positions_of_a_direct_call():
    steering = torch.randn(3, 8, dtype=torch.float64)
    act = ActAddIntervention(embed_dim=8, steering=steering).double()
    longer = torch.randn(2, 5, 8, dtype=torch.float64)
    out = act(longer)
    torch.testing.assert_close(out[:, :3], longer[:, :3] + steering.float().double(), rtol=0, atol=1e-12)
    assert torch.equal(out[:, 3:], longer[:, 3:])
    shorter = torch.randn(1, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(act(shorter), shorter + steering[:2].float().double(), rtol=0, atol=1e-12)
    fresh = ActAddIntervention(embed_dim=8)  # pyvene builds with defaults (n = 0), then loads
    assert fresh.length == 0 and torch.equal(fresh(shorter.float()), shorter.float())
    fresh.load_state_dict(act.float().state_dict())
    assert fresh.length == 3 and torch.equal(fresh(longer.float()), act(longer.float()))


def test_fitted_edit_equals_a_torch_hook_on_a_padded_batch(model, tok):
    """Rows shorter and longer than n, the short one left-padded: row i of X lands on the i-th
    real token, padding and positions >= n untouched."""
    fit, _, _ = steering_of(model, tok)
    n = fit.length
    short, long = list(range(10, 10 + n - 2)), list(range(40, 40 + n + 3))
    width = len(long)
    batch = {
        "input_ids": torch.tensor([[0] * (width - len(short)) + short, long]),
        "attention_mask": torch.tensor([[0] * (width - len(short)) + [1] * len(short), [1] * width]),
    }
    pvm = intervenable(model, fit.config(model))
    with torch.no_grad():
        plain = model(**batch).logits
        _, edited = pvm(dict(batch), unit_locations=None)
        handles = add_rows_hook(model, LAYER, fit.steering[LAYER], lambda index, n: index < n)
        try:
            reference = model(**batch).logits
        finally:
            for handle in handles:
                handle.remove()
    torch.testing.assert_close(edited.logits, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(edited.logits[1], plain[1], atol=1e-3)


@pytest.mark.parametrize("prompt_length", [2, 8])
def test_generation_is_steered_in_the_prompt_pass_only(model, tok, prompt_length):
    """Greedy tokens of the edited model (KV cache) equal a loop that re-runs the whole sequence
    with X added at the first min(n, prompt length) positions only: generated tokens are never
    steered, even at an index below n."""
    fit, _, _ = steering_of(model, tok)
    prompt = torch.arange(20, 20 + prompt_length)[None]
    pvm = intervenable(model, fit.config(model))
    _, generated = pvm.generate(
        {"input_ids": prompt},
        unit_locations=None,
        intervene_on_prompt=True,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    ids = prompt
    handles = add_rows_hook(model, LAYER, fit.steering[LAYER], lambda index, n: (index < n) & (index < prompt_length))
    try:
        with torch.no_grad():
            for _ in range(6):
                logits = model(input_ids=ids, use_cache=False).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(generated, ids), (generated.tolist(), ids.tolist())
    plain = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, ids), "the steering must change some generated token"


# ------------------------------------------------------------------------------ bad inputs
def test_fit_actadd_bad_inputs_raise_clear_errors():
    good, nan = activations_with_a_nan()
    with pytest.raises(ValueError, match="NaN"):
        fit_actadd(nan, good)
    with pytest.raises(ValueError, match="finite"):
        fit_actadd(good, good, coefficient=float("inf"))
    with pytest.raises(ValueError, match=r"steering must have shape \(n, d=8\)"):
        ActAddIntervention(embed_dim=8, steering=torch.ones(3, 7))
