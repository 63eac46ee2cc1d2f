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
