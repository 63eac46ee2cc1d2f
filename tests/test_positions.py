"""Position policies: exact additions at exactly the policy's positions, with and without KV
cache, with left padding, and under ``IntervenableModel.generate``."""

import pytest
import torch
from transformers import DynamicCache

from actedit.interventions import (
    ActAddIntervention,
    CAAIntervention,
    PositionPolicy,
    build_actadd_config,
    build_caa_config,
    intervenable,
    mark_answer_starts,
    mark_prompt_lengths,
)
from actedit.interventions.positions import CallPositions, generation, position_mask

from conftest import tiny_model

# Two rows of 8 tokens; the first is left-padded by 2. The first 4 columns are the prompt.
IDS = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [3, 9, 4, 11, 12, 13, 14, 15]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
N_PROMPT = 4
# index of each token among its row's real tokens (-1 = padding), and real prompt lengths
REAL_INDEX = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
PROMPT_LEN = torch.tensor([[2], [4]])


def expected_mask(policy, start=0):
    real = REAL_INDEX >= 0
    if policy == "all":
        return real
    if policy == "prompt":
        return real & (REAL_INDEX < PROMPT_LEN)
    if policy == "generated":
        return real & (REAL_INDEX >= PROMPT_LEN)
    if policy == "from_position":
        return real & (REAL_INDEX >= (start if start >= 0 else PROMPT_LEN + start))
    if policy in ("last", "answer"):  # last prompt token, then every generated one
        return real & (REAL_INDEX >= PROMPT_LEN - 1)
    raise ValueError(policy)


def capture(module):
    """Record the first input of ``module`` on every call."""
    seen = []

    def hook(mod, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        seen.append(x.detach().clone())

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def teacher_forced(call, cached):
    """Run IDS as a generation (prompt pass + 4 decode steps) with forced tokens."""
    with generation():
        if cached:
            cache = DynamicCache()
            call({"input_ids": IDS[:, :N_PROMPT], "attention_mask": MASK[:, :N_PROMPT],
                  "past_key_values": cache, "use_cache": True})
            for t in range(N_PROMPT, IDS.shape[1]):
                call({"input_ids": IDS[:, t:t + 1], "attention_mask": MASK[:, :t + 1],
                      "past_key_values": cache, "use_cache": True})
        else:
            for t in range(N_PROMPT, IDS.shape[1] + 1):
                call({"input_ids": IDS[:, :t], "attention_mask": MASK[:, :t], "use_cache": False})


def edited_minus_base(model, config, probe_module, cached):
    seen, handle = capture(probe_module)
    try:
        with torch.no_grad():
            teacher_forced(lambda b: model(**b), cached)
            base = torch.cat(seen, dim=1) if cached else seen[-1]
            seen.clear()
            pvm = intervenable(model, config)
            teacher_forced(lambda b: pvm(b), cached)
            edited = torch.cat(seen, dim=1) if cached else seen[-1]
    finally:
        handle.remove()
    return edited - base


POLICIES = [("all", 0), ("prompt", 0), ("generated", 0), ("from_position", 1), ("from_position", -1),
            ("last", 0), ("answer", 0)]


@pytest.mark.parametrize("cached", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("policy,start", POLICIES)
def test_caa_adds_exactly_at_policy_positions(policy, start, cached):
    model = tiny_model("llama")
    v = torch.linspace(-1, 1, 32)
    config = build_caa_config(model, {1: v}, multiplier=2.0, position_policy=policy, position_start=start)
    diff = edited_minus_base(model, config, model.model.layers[2], cached)
    mask = expected_mask(policy, start)
    assert mask.any() and (~mask).any()
    assert torch.allclose(diff[mask], (2.0 * v).expand(int(mask.sum()), 32), atol=1e-5)
    assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))


@pytest.mark.parametrize("cached", [True, False], ids=["kv_cache", "no_cache"])
def test_actadd_adds_rows_to_first_prompt_positions(cached):
    model = tiny_model("llama")
    steering = torch.randn(3, 32)
    config = build_actadd_config(model, {1: steering})
    diff = edited_minus_base(model, config, model.model.layers[1].input_layernorm, cached)
    mask = expected_mask("prompt") & (REAL_INDEX < 3)
    expected = torch.zeros_like(diff)
    expected[mask] = steering[REAL_INDEX[mask]]
    assert torch.allclose(diff, expected, atol=1e-5)
    assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))


def test_answer_policy_with_marked_answer_starts():
    """Scoring: one forward over context + answer; only the marked answer tokens are edited."""
    model = tiny_model("llama")
    v = torch.ones(32)
    config = build_caa_config(model, {1: v}, position_policy="answer")
    seen, handle = capture(model.model.layers[2])
    starts = torch.tensor([3, 5])  # index among real tokens
    try:
        with torch.no_grad():
            model(input_ids=IDS, attention_mask=MASK)
            pvm = intervenable(model, config)
            with mark_answer_starts(starts):
                pvm({"input_ids": IDS, "attention_mask": MASK})
    finally:
        handle.remove()
    diff = seen[1] - seen[0]
    mask = (REAL_INDEX >= 0) & (REAL_INDEX >= starts[:, None])
    assert torch.allclose(diff[mask], v.expand(int(mask.sum()), 32), atol=1e-5)
    assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))


def test_marked_prompt_lengths_define_the_prompt():
    """A scorer feeding a sequence in one call marks where its prompt ends; generated = after it."""
    model = tiny_model("llama")
    v = torch.ones(32)
    config = build_caa_config(model, {1: v}, position_policy="generated")
    seen, handle = capture(model.model.layers[2])
    lengths = torch.tensor([2, 5])  # real tokens of each row's prompt
    try:
        with torch.no_grad():
            model(input_ids=IDS, attention_mask=MASK)
            pvm = intervenable(model, config)
            with mark_prompt_lengths(lengths):
                pvm({"input_ids": IDS, "attention_mask": MASK})
            with pytest.raises(ValueError, match="one value per row"), mark_prompt_lengths([1, 2, 3]):
                pvm({"input_ids": IDS, "attention_mask": MASK})
    finally:
        handle.remove()
    diff = seen[1] - seen[0]
    mask = (REAL_INDEX >= 0) & (REAL_INDEX >= lengths[:, None])
    assert torch.allclose(diff[mask], v.expand(int(mask.sum()), 32), atol=1e-5)
    assert torch.equal(diff[~mask], torch.zeros_like(diff[~mask]))


@pytest.mark.parametrize("policy", ["all", "prompt", "generated", "last", "from_position"])
def test_generate_same_with_and_without_cache(policy):
    model = tiny_model("llama", seed=3)
    v = torch.randn(32) * 4
    config = build_caa_config(model, {1: v}, position_policy=policy, position_start=-1)
    pvm = intervenable(model, config)
    inputs = {"input_ids": IDS[:, :N_PROMPT], "attention_mask": MASK[:, :N_PROMPT]}
    kwargs = dict(unit_locations=None, intervene_on_prompt=True, max_new_tokens=6, do_sample=False, pad_token_id=0)
    _, cached = pvm.generate(inputs, use_cache=True, **kwargs)
    _, uncached = pvm.generate(inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    base = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    if policy != "prompt":  # the steering must matter for this test to mean anything
        assert not torch.equal(cached, base)


def test_batch_and_single_row_agree_under_left_padding():
    """A left-padded row is edited exactly as the same row alone."""
    model = tiny_model("llama", seed=4)
    config = build_caa_config(model, {1: torch.randn(32) * 4}, position_policy="from_position", position_start=1)
    pvm = intervenable(model, config)
    kwargs = dict(unit_locations=None, intervene_on_prompt=True, max_new_tokens=5, do_sample=False, pad_token_id=0)
    _, batch = pvm.generate({"input_ids": IDS[:, :N_PROMPT], "attention_mask": MASK[:, :N_PROMPT]}, **kwargs)
    _, alone = pvm.generate({"input_ids": IDS[:1, 2:N_PROMPT], "attention_mask": MASK[:1, 2:N_PROMPT]}, **kwargs)
    assert torch.equal(batch[0, 2:], alone[0])


def test_position_mask_fallback_without_tracker():
    mask = position_mask(PositionPolicy.LAST, 0, 2, 5)
    assert mask.tolist() == [[False] * 4 + [True]] * 2
    # shapes that do not match the tracked call (explicit unit_locations): every given position
    call = CallPositions.unpadded(2, 7)
    assert position_mask(PositionPolicy.PROMPT, 0, 2, 1, call=call).all()


def test_policy_parsing():
    assert PositionPolicy.parse("from-position") == PositionPolicy.FROM_POSITION
    assert PositionPolicy.parse(5) == PositionPolicy.LAST
    with pytest.raises(ValueError, match="Unknown position policy"):
        PositionPolicy.parse("everywhere")
    with pytest.raises(ValueError, match="Unknown position policy"):
        CAAIntervention(embed_dim=4, position_policy="sometimes")


def test_actadd_default_is_prompt_pass_only():
    assert ActAddIntervention(embed_dim=4).policy == PositionPolicy.PROMPT


def test_stock_generate_defaults_follow_the_policy():
    """pyvene's defaults (intervene_on_prompt=False) would skip the prompt pass; actedit's policies decide."""
    model = tiny_model("llama", seed=3)
    config = build_caa_config(model, {1: torch.randn(32) * 4}, position_policy="prompt")
    pvm = intervenable(model, config)
    inputs = {"input_ids": IDS[:, :N_PROMPT], "attention_mask": MASK[:, :N_PROMPT]}
    _, default = pvm.generate(inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    _, explicit = pvm.generate(inputs, unit_locations=None, intervene_on_prompt=True, max_new_tokens=5,
                               do_sample=False, pad_token_id=0)
    base = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(default, explicit) and not torch.equal(default, base)
