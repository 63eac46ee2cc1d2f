"""CAA — Contrastive Activation Addition (Rimsky et al., ACL 2024).

One steering vector v per layer at the residual stream after the block (``block_output``):
v = mean over contrast pairs of h(positive)[answer token] − h(negative)[answer token]. The edit
adds it with a multiplier m,

    h ← h + m · v,

at the positions "from the end of the instruction on", generated tokens included: position
policy ``from_position`` with ``position_start`` = the instruction length (or a negative start
counted from the end of the prompt). The class default start 0 steers every position.
Buffers: ``vector`` (d), ``multiplier``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .base import ActEditIntervention
from .layers import LayerSpec, check_layer_spec
from .positions import PositionPolicy
from .settings import Settings, keyword_checked


@dataclass
class CAAConfig(Settings):
    """CAA's hyperparameters (a study's ``methods.caa.fit`` block).

    Attributes:
        layer: the layer steered (Rimsky et al. steer one; a layer spec of
            :mod:`actedit.interventions.layers`, e.g. ``12`` or ``0.4`` of the depth). Unset, the
            collected layer is used when exactly one was collected; it is never "every layer".
        multiplier: m in h ← h + m·v.
        position_policy: ``from_position`` (default: from ``position_start`` on, generated tokens
            included) or e.g. ``answer`` (the scored continuation).
        position_start: the start of ``from_position`` (negative: counted from the prompt's end).
    """

    layer: Optional[LayerSpec] = None
    multiplier: float = 1.0
    position_policy: str = "from_position"
    position_start: int = 0

    def __post_init__(self) -> None:
        check_layer_spec(self.layer, "CAA layer", single=True)
        m = self.multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise ValueError(f"CAA multiplier must be a finite number, got {m!r}.")
        self.multiplier = float(m)
        self.position_policy = PositionPolicy.parse(self.position_policy).name.lower()
        if isinstance(self.position_start, bool) or not isinstance(self.position_start, int):
            raise ValueError(f"CAA position_start must be an integer, got {self.position_start!r}.")


class CAAIntervention(ActEditIntervention):
    """Add m·v from a given position on; see the module docstring.

    Args:
        embed_dim: hidden size d.
        vector: steering vector v (d,), default zeros.
        multiplier: m (default 1).
        position_policy / position_start: default ``from_position`` with start 0.
    """

    default_policy = PositionPolicy.FROM_POSITION
    method_name = "caa"

    def __init__(self, embed_dim: Optional[int] = None, vector: Optional[torch.Tensor] = None,
                 multiplier: float = 1.0, **kwargs):
        super().__init__(embed_dim=embed_dim, **kwargs)
        vector = torch.zeros(self.d) if vector is None else torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
        if vector.shape[0] != self.d:
            raise ValueError(f"CAA vector has length {vector.shape[0]} but the site width is {self.d}.")
        if not torch.isfinite(vector).all():
            raise ValueError("CAA vector contains NaN or inf values.")
        self.register_buffer("vector", vector.contiguous())
        self.register_buffer("multiplier", torch.tensor(float(multiplier)))

    def edit(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return h + (self.multiplier * self.vector).to(h.dtype)


def mean_difference(h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
    """v = mean_i (h⁺_i − h⁻_i) over paired activations ``(N, d)`` (computed in float64)."""
    h_pos, h_neg = torch.as_tensor(h_pos), torch.as_tensor(h_neg)
    if h_pos.shape != h_neg.shape or h_pos.dim() != 2 or h_pos.shape[0] == 0:
        raise ValueError(f"need two non-empty (N, d) matrices of equal shape, got {tuple(h_pos.shape)} "
                         f"and {tuple(h_neg.shape)}.")
    return (h_pos.double() - h_neg.double()).mean(0).float()


@keyword_checked
def build_caa_config(model, vectors: dict, *, multiplier: float = 1.0, position_policy=None,
                     position_start: int = 0, component: str = "block_output", metadata: Optional[dict] = None):
    """An ``IntervenableConfig`` with one CAA module per layer; ``vectors`` maps layer → v."""
    from .config import edit_config, site_width

    width = site_width(model, component)
    modules = {layer: CAAIntervention(embed_dim=width, vector=v, multiplier=multiplier,
                                      position_policy=position_policy, position_start=position_start)
               for layer, v in vectors.items()}
    first = next(iter(modules.values()))
    hyper = {"multiplier": float(multiplier), "position_policy": first.policy.name.lower(),
             "position_start": int(position_start)}
    return edit_config(model, "caa", modules, component=component, hyperparameters=hyper, metadata=metadata)
