"""ActAdd — Activation Addition (Turner et al., 2023; "Steering Language Models With Activation
Engineering").

A steering vector is a *matrix*: the residual-stream activations at the input of block L
(``block_input``) of a steering prompt, one row per token position (BOS included), scaled by a
coefficient c. The x-vector is a(prompt₁) − a(prompt₂), the shorter prompt right-padded (e.g.
with a space token) to the longer one's length n. It is added to the first n positions of the
user's prompt, in the prompt pass only:

    h_i ← h_i + X_i   for i < n (index among the row's real tokens; left padding skipped).

Buffer ``steering`` (n × d, c already applied; resized on load). Position policy ``prompt``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .base import ActEditIntervention
from .layers import LayerSpec, check_layer_spec
from .positions import CallPositions, PositionPolicy, current_call
from .settings import Settings, keyword_checked


@dataclass
class ActAddConfig(Settings):
    """ActAdd's hyperparameters (a study's ``methods.actadd.fit`` block).

    Attributes:
        layer: the block whose input is steered (Turner et al.: one layer, e.g. 6 of GPT-2-XL's
            48); a layer spec of :mod:`actedit.interventions.layers`. Required unless exactly
            one layer was collected; it never defaults to every layer.
        coefficient: c in X = c · (a(prompt₁) − a(prompt₂)).
        position_policy: ``prompt`` (the paper: the prompt pass only).
    """

    layer: Optional[LayerSpec] = None
    coefficient: float = 1.0
    position_policy: str = "prompt"

    def __post_init__(self) -> None:
        check_layer_spec(self.layer, "ActAdd layer", single=True)
        c = self.coefficient
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"ActAdd coefficient must be a finite number, got {c!r}.")
        self.coefficient = float(c)
        self.position_policy = PositionPolicy.parse(self.position_policy).name.lower()


class ActAddIntervention(ActEditIntervention):
    """Add a per-position steering matrix to the first n prompt positions; see the module docstring.

    Args:
        embed_dim: hidden size d.
        steering: (n, d) x-vector, coefficient already applied; default zero rows (n = 0).
    """

    default_policy = PositionPolicy.PROMPT
    method_name = "actadd"

    def __init__(self, embed_dim: Optional[int] = None, steering: Optional[torch.Tensor] = None, **kwargs):
        super().__init__(embed_dim=embed_dim, **kwargs)
        steering = torch.zeros(0, self.d) if steering is None else torch.as_tensor(steering, dtype=torch.float32)
        if steering.dim() != 2 or steering.shape[1] != self.d:
            raise ValueError(f"steering must have shape (n, d={self.d}), got {tuple(steering.shape)}.")
        if not torch.isfinite(steering).all():
            raise ValueError("ActAdd steering matrix contains NaN or inf values.")
        self.register_buffer("steering", steering.contiguous())

    def resizable_buffers(self) -> tuple:
        return ("steering",)

    @property
    def length(self) -> int:
        return self.steering.shape[0]

    def edit(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = self.length
        if n == 0:
            return h
        call = current_call()
        if call is None or tuple(call.positions.shape) != tuple(h.shape[:2]):
            call = CallPositions.unpadded(h.shape[0], h.shape[1], h.device)
        pos = call.positions.to(h.device)
        inside = (pos >= 0) & (pos < n)
        rows = self.steering.to(h.dtype)[pos.clamp(0, n - 1)]
        return h + rows * inside.unsqueeze(-1).to(h.dtype)


def x_vector(acts_prompt1: torch.Tensor, acts_prompt2: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """c · (a(prompt₁) − a(prompt₂)) from two per-position activation matrices ``(n_i, d)``.

    The caller right-pads the shorter *prompt* (tokens) before collecting, as the paper does, so
    both matrices normally have the same length; if not, the shorter one is zero-extended.
    """
    a1, a2 = torch.as_tensor(acts_prompt1).double(), torch.as_tensor(acts_prompt2).double()
    if a1.dim() != 2 or a2.dim() != 2 or a1.shape[1] != a2.shape[1]:
        raise ValueError(f"need two (n, d) matrices of equal width, got {tuple(a1.shape)} and {tuple(a2.shape)}.")
    n = max(a1.shape[0], a2.shape[0])
    pad = lambda a: torch.cat([a, a.new_zeros(n - a.shape[0], a.shape[1])])  # noqa: E731
    return (coefficient * (pad(a1) - pad(a2))).float()


@keyword_checked
def build_actadd_config(model, steering: dict, *, coefficient: Optional[float] = None, position_policy=None,
                        component: str = "block_input", metadata: Optional[dict] = None):
    """An ``IntervenableConfig`` with one ActAdd module per layer; ``steering`` maps layer → (n, d)
    x-vector with the coefficient applied (``coefficient`` is recorded as metadata only)."""
    from .config import edit_config, site_width

    width = site_width(model, component)
    modules = {layer: ActAddIntervention(embed_dim=width, steering=x, position_policy=position_policy)
               for layer, x in steering.items()}
    first = next(iter(modules.values()))
    hyper = {"coefficient": coefficient, "length": first.length, "position_policy": first.policy.name.lower()}
    return edit_config(model, "actadd", modules, component=component, hyperparameters=hyper, metadata=metadata)
