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
    compat,
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
            name = compat.cache_keyword(tiny_model("llama"))
            call({"input_ids": IDS[:, :N_PROMPT], "attention_mask": MASK[:, :N_PROMPT], name: cache, "use_cache": True})
            for t in range(N_PROMPT, IDS.shape[1]):
                call(
                    {"input_ids": IDS[:, t : t + 1], "attention_mask": MASK[:, : t + 1], name: cache, "use_cache": True}
                )
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


POLICIES = [
    ("all", 0),
    ("prompt", 0),
    ("generated", 0),
    ("from_position", 1),
    ("from_position", -1),
    ("last", 0),
    ("answer", 0),
]


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


def _oracle_mask(policy: str, start: int, n_tokens: int, n_prompt: int) -> torch.Tensor:
    """Positions a policy edits in one unpadded sequence of ``n_tokens`` whose prompt has ``n_prompt``."""
    pos = torch.arange(n_tokens)
    if policy == "all":
        return pos >= 0
    if policy == "prompt":
        return pos < n_prompt
    if policy == "generated":
        return pos >= n_prompt
    if policy == "from_position":
        return pos >= (start if start >= 0 else n_prompt + start)
    if policy in ("last", "answer"):
        return pos >= n_prompt - 1
    raise ValueError(policy)


def oracle_generate(
    model, prompt: torch.Tensor, layer: int, shift: torch.Tensor, policy: str, start: int, new_tokens: int
) -> torch.Tensor:
    """Greedy decoding of one unpadded prompt without pyvene, tracker or cache: every step re-runs
    the whole sequence with ``shift`` added to the output of decoder layer ``layer`` at the
    positions the policy edits, computed from the known prompt length."""
    ids = prompt.clone()

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mask = _oracle_mask(policy, start, hidden.shape[1], prompt.shape[0])
        hidden = hidden + shift * mask[None, :, None].to(hidden.dtype)
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[layer].register_forward_hook(add)
    try:
        with torch.no_grad():
            for _ in range(new_tokens):
                logits = model(input_ids=ids[None], use_cache=False).logits
                ids = torch.cat([ids, logits[0, -1].argmax().reshape(1)])
    finally:
        handle.remove()
    return ids


@pytest.mark.parametrize("policy,start", POLICIES)
def test_generation_is_identical_cached_uncached_batched_and_alone(policy, start):
    """Every policy, with and without KV cache, one prompt alone or left-padded in a batch: the
    tokens of an oracle that re-runs each whole sequence with the edit at the policy's positions.

    A single unpadded prompt is the case transformers 5.24 broke (the cache arrives as ``cache``,
    the all-ones mask is dropped): decode steps looked like new prompts."""
    model = tiny_model("llama", seed=4)
    shift = torch.randn(32) * 4
    config = build_caa_config(model, {1: shift}, position_policy=policy, position_start=start)
    pvm = intervenable(model, config)
    kwargs = dict(unit_locations=None, intervene_on_prompt=True, max_new_tokens=5, do_sample=False, pad_token_id=0)
    batch_inputs = {"input_ids": IDS[:, :N_PROMPT], "attention_mask": MASK[:, :N_PROMPT]}
    rows = [IDS[0, 2:N_PROMPT], IDS[1, :N_PROMPT]]  # the real tokens of each row
    expected = [oracle_generate(model, row, 1, shift, policy, start, 5) for row in rows]
    plain = [model.generate(input_ids=row[None], max_new_tokens=5, do_sample=False, pad_token_id=0)[0] for row in rows]
    assert any(not torch.equal(e, p) for e, p in zip(expected, plain, strict=True)), "the edit must change some tokens"
    for use_cache in (True, False):
        _, batch = pvm.generate(batch_inputs, use_cache=use_cache, **kwargs)
        assert torch.equal(batch[0, 2:], expected[0]), (use_cache, batch[0, 2:].tolist(), expected[0].tolist())
        assert torch.equal(batch[1], expected[1]), (use_cache, batch[1].tolist(), expected[1].tolist())
        for row, want in zip(rows, expected, strict=True):
            _, alone = pvm.generate({"input_ids": row[None]}, use_cache=use_cache, **kwargs)
            assert torch.equal(alone[0], want), (use_cache, alone[0].tolist(), want.tolist())
            _, masked = pvm.generate(
                {"input_ids": row[None], "attention_mask": torch.ones(1, len(row), dtype=torch.long)},
                use_cache=use_cache,
                **kwargs,
            )
            assert torch.equal(masked[0], want)


def test_real_positions_from_cache_length_and_mask():
    """The three facts a call can carry, alone and together."""
    from actedit.interventions.positions import real_positions

    # decode step of one row, no mask (transformers 5.24 drops an all-ones mask): from the cache
    pos, past = real_positions(1, 1, None, 6, None)
    assert pos.tolist() == [[6]] and past == 6
    # a left-padded batch: the mask covers past + new tokens
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, past = real_positions(2, 1, None, 4, mask)
    assert pos.tolist() == [[2], [4]] and past == 4
    # no cache information, but a mask longer than the new tokens: it tells the past length
    pos, past = real_positions(2, 1, None, None, mask)
    assert pos.tolist() == [[2], [4]] and past == 4
    # a mask covering only the new tokens: no padding assumed in the unseen past
    pos, past = real_positions(1, 2, None, 3, torch.tensor([[1, 1]]))
    assert pos.tolist() == [[3, 4]]
    # a prompt pass with padding, nothing cached
    pos, past = real_positions(2, 5, None, 0, mask)
    assert pos.tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]] and past == 0


def test_cache_is_found_under_any_name():
    """compat finds the cache under either transformers name, or as any cache-typed argument."""
    from actedit.interventions import compat

    cache = DynamicCache()
    for name in ("cache", "past_key_values", "kv_state"):
        assert compat.forward_cache({name: cache, "input_ids": IDS}) is cache
    assert compat.forward_cache({"input_ids": IDS}) is None
    assert compat.cached_length({"cache_position": torch.tensor([7, 8])}) == 7
    assert compat.cached_length({"input_ids": IDS}) is None
    legacy = ((torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)),)
    assert compat.cached_length({"past_key_values": legacy}) == 5


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
    _, explicit = pvm.generate(
        inputs, unit_locations=None, intervene_on_prompt=True, max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    base = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(default, explicit) and not torch.equal(default, base)
