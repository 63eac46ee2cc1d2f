"""The intervention base class's caches: ``host(name)`` reads a setting buffer from its device once,
``derived(...)`` keeps a value made from the module's tensors (ITI's shift, HPR's hyperplane
normal); both see every later change (in-place writes, a loaded state dict, a move, training)."""

from __future__ import annotations

import copy

import pytest
import torch

from actedit.interventions.caa import CAAIntervention
from actedit.interventions.hpr import HPRIntervention
from actedit.interventions.iti import ITIIntervention
from actedit.interventions.positions import PositionPolicy


def test_cached_settings_follow_every_change():
    module = CAAIntervention(embed_dim=4, vector=torch.ones(4), position_policy="all")
    h = torch.zeros(1, 3, 4)
    assert module.is_enabled and module.policy == PositionPolicy.ALL and module.d == 4
    assert torch.equal(module(h), torch.ones(1, 3, 4))
    module.set_enabled(False)  # fill_: a new version of the same tensor
    assert not module.is_enabled and torch.equal(module(h), h)
    other = CAAIntervention(embed_dim=4, vector=torch.ones(4), position_policy="last")
    other.load_state_dict(module.state_dict())  # copy_ into the buffers
    assert not other.is_enabled and other.policy == PositionPolicy.ALL
    module.set_enabled(True).set_position_policy("prompt")
    assert module.is_enabled and module.policy == PositionPolicy.PROMPT
    moved = copy.deepcopy(module).to(torch.float64)  # new tensors
    moved.enabled = torch.tensor(False)  # a buffer replaced by another tensor
    assert not moved.is_enabled and module.is_enabled


def test_settings_of_a_module_built_in_inference_mode():
    """Inference tensors have no version counter: read afresh, never cached."""
    with torch.inference_mode():
        module = CAAIntervention(embed_dim=4, vector=torch.ones(4), position_policy="all")
        assert module.is_enabled and module.policy == PositionPolicy.ALL
        assert torch.equal(module(torch.zeros(1, 2, 4)), torch.ones(1, 2, 4))
        module.set_enabled(False)
        assert not module.is_enabled


def _iti(alpha: float) -> ITIIntervention:
    directions = torch.nn.functional.normalize(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    return ITIIntervention(
        embed_dim=6,
        num_heads=2,
        directions=directions,
        sigmas=torch.tensor([1.0, 2.0]),
        alpha=alpha,
        heads=[1],
        position_policy="all",
    )


def _iti_formula(module: ITIIntervention, h: torch.Tensor) -> torch.Tensor:
    shift = torch.zeros(6)
    shift[3:] = module.alpha * module.sigmas[1] * module.directions[1]
    return h + shift


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_iti_shift_follows_every_change(mode):
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    module, h = _iti(2.0), torch.randn(1, 3, 6)
    with context():
        assert torch.allclose(module(h), _iti_formula(module, h))
        module.alpha.fill_(5.0)  # in place
        assert torch.allclose(module(h), _iti_formula(module, h))
        module.load_state_dict(_iti(-1.0).state_dict())  # copy_ into the buffers
        assert torch.allclose(module(h), _iti_formula(module, h)) and float(module.alpha) == -1.0
        module.sigmas = torch.tensor([1.0, 7.0])  # a buffer replaced
        assert torch.allclose(module(h), _iti_formula(module, h))
        assert torch.allclose(module(h.double()), _iti_formula(module, h.double()))  # another dtype


def test_hpr_edit_follows_its_probe_and_trains_through_the_cache():
    torch.manual_seed(0)
    module = HPRIntervention(embed_dim=8)
    torch.nn.init.normal_(module.probe.weight)
    h = torch.randn(16, 8)
    with torch.no_grad():
        sides = module.probe_logits(h) > 0
        assert sides.any() and not sides.all()  # rows on both sides of the hyperplane
        before = module.edit(h)
        module.probe.weight.mul_(-1.0)  # in place, as an optimizer step
        after = module.edit(h)
        fresh = copy.deepcopy(module)
        fresh.__dict__.pop("_kept_values", None)
        assert torch.equal(after, fresh.edit(h)) and not torch.equal(before, after)
        scale = torch.linspace(0.5, 2.0, 8)  # no longer the identity: h ⊘ c is computed again
        module.rotation_scale.copy_(scale)
        fresh.rotation_scale.copy_(scale)
        fresh.__dict__.pop("_kept_values", None)
        assert torch.equal(module.edit(h), fresh.edit(h)) and not torch.equal(module.edit(h), after)
    module.rotate(h, torch.full((16,), 0.5)).sum().backward()  # autograd: computed afresh, with a graph
    assert module.probe.weight.grad is not None and module.probe.weight.grad.abs().sum() > 0
    trained = module.probe.weight.detach().clone()
    optimizer = torch.optim.AdamW([module.probe.weight], lr=0.5, fused=True)  # in place, same version
    version = module.probe.weight._version
    optimizer.step()
    assert not torch.equal(module.probe.weight.detach(), trained)
    with torch.no_grad():
        fresh = copy.deepcopy(module)
        fresh.__dict__.pop("_kept_values", None)
        assert torch.equal(module.edit(h), fresh.edit(h)), f"stale after an optimizer step (version {version})"


def test_a_deep_copy_and_the_setters_never_reuse_a_kept_value():
    """Kept values are keyed on tensor versions; a deep copy's buffers restart their counters, so the
    copy must not inherit them, and the setters drop them (a sweep copies a fit and sets a strength)."""
    module = ITIIntervention(
        embed_dim=4, num_heads=2, alpha=1.0, directions=torch.ones(2, 2), sigmas=torch.ones(2), heads=[0, 1]
    )
    module.set_position_policy("all")
    h = torch.zeros(1, 3, 4)

    def run(m):
        with torch.no_grad():  # kept values are used only where autograd does not record
            return m.edit(h, None)

    module.set_inference_setting("alpha", 3.0)
    module.set_inference_setting("alpha", 2.0)  # the buffer at version 2, where a copy's fill_ lands too
    assert torch.equal(run(module), torch.full((1, 3, 4), 2.0))
    raw = copy.deepcopy(module)
    with torch.no_grad():
        raw.alpha.fill_(10.0)  # bypassing the setter: only the copy's own (empty) cache can answer
    assert torch.equal(run(raw), torch.full((1, 3, 4), 10.0))
    copied = copy.deepcopy(module)
    copied.set_inference_setting("alpha", 5.0)
    assert torch.equal(run(copied), torch.full((1, 3, 4), 5.0))
    copied.set_enabled(False)
    assert not copied.is_enabled and module.is_enabled
    with pytest.raises(ValueError, match="keeps no numeric setting 'heads'"):
        module.set_inference_setting("heads", 1.0)


def test_a_frozen_module_reads_its_settings_once_and_thaws_on_exit():
    """:meth:`frozen` holds the settings and the shift read on entry (``generate`` holds it for one
    call); on exit, and in a deep copy made inside, the module reads its buffers again."""
    module = CAAIntervention(embed_dim=4, vector=torch.ones(4), multiplier=2.0, position_policy="all")
    h = torch.zeros(1, 3, 4)
    with torch.no_grad(), module.frozen():
        assert torch.equal(module(h), torch.full((1, 3, 4), 2.0))
        module.multiplier.fill_(3.0)
        assert torch.equal(module(h), torch.full((1, 3, 4), 2.0))  # frozen: read on entry
        copied = copy.deepcopy(module)
        assert torch.equal(copied(h), torch.full((1, 3, 4), 3.0))
        with module.frozen():  # nested: the inner block reads again, the outer plan comes back
            assert torch.equal(module(h), torch.full((1, 3, 4), 3.0))
        assert torch.equal(module(h), torch.full((1, 3, 4), 2.0))
    assert torch.equal(module(h), torch.full((1, 3, 4), 3.0))
    module.set_enabled(False)
    with module.frozen():
        assert module(h) is h


def test_frozen_additive_edits_are_bit_identical():
    iti = _iti(2.0)
    caa = CAAIntervention(embed_dim=6, vector=torch.randn(6), multiplier=1.5, position_policy="all")
    for module in (iti, caa):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            h = torch.randn(2, 3, 6).to(dtype)
            with torch.no_grad():
                reference = module(h)
                with module.frozen():
                    assert torch.equal(module(h), reference)
