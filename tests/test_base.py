"""The intervention base class's cached settings: ``host(name)`` reads a setting buffer from its
device once and sees every later change (in-place writes, a loaded state dict, a move)."""

from __future__ import annotations

import copy

import torch

from actedit.interventions.caa import CAAIntervention
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
