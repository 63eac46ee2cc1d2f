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

from typing import Optional

import torch

from .base import ActEditIntervention
from .positions import PositionPolicy


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


def build_caa_config(model, vectors: dict, *, multiplier: float = 1.0, position_policy=None,
                     position_start: int = 0, component: str = "block_output", **metadata):
    """An ``IntervenableConfig`` with one CAA module per layer; ``vectors`` maps layer → v."""
    from .config import edit_config, site_width

    width = site_width(model, component)
    modules = {layer: CAAIntervention(embed_dim=width, vector=v, multiplier=multiplier,
                                      position_policy=position_policy, position_start=position_start)
               for layer, v in vectors.items()}
    first = next(iter(modules.values()))
    hyper = {"multiplier": float(multiplier), "position_policy": first.policy.name.lower(),
             "position_start": int(position_start)}
    return edit_config(model, "caa", modules, component=component, hyperparameters=hyper, **metadata)
