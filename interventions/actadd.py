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

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import pyvene as pv
import torch

from .base import ActEditIntervention
from .checks import check_layer_map, check_matrix, check_number
from .edits import edit_config, site_width
from .positions import CallPositions, PolicyLike, PositionPolicy, current_call
from .registry import FitContext, FitResult, MethodSettings, MethodSpec, register_method
from .settings import keyword_checked


@dataclass
class ActAddSettings(MethodSettings):
    """ActAdd's settings (a study's ``methods.actadd.settings`` block).

    Attributes:
        layers: the block whose input is steered (Turner et al.: one layer, e.g. 6 of GPT-2-XL's
            48). Required: it never means every layer.
        coefficient: c in X = c · (a(prompt₁) − a(prompt₂)).
        position_policy: ``prompt`` (the paper: the prompt pass only).
    """

    coefficient: float = 1.0
    position_policy: str = "prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.coefficient = check_number(self.coefficient, "ActAdd coefficient")


class ActAddIntervention(ActEditIntervention):
    """Add a per-position steering matrix to the first n prompt positions; see the module docstring.

    Args:
        embed_dim: hidden size d.
        steering: (n, d) x-vector, coefficient already applied; default zero rows (n = 0).
    """

    default_policy = PositionPolicy.PROMPT
    method_name = "actadd"

    steering: torch.Tensor

    def __init__(self, embed_dim: Optional[int] = None, steering: Optional[torch.Tensor] = None, **kwargs: Any) -> None:
        super().__init__(embed_dim=embed_dim, **kwargs)
        steering = torch.zeros(0, self.d) if steering is None else torch.as_tensor(steering, dtype=torch.float32)
        if steering.dim() != 2 or steering.shape[1] != self.d:
            raise ValueError(f"steering must have shape (n, d={self.d}), got {tuple(steering.shape)}.")
        if not torch.isfinite(steering).all():
            raise ValueError("ActAdd steering matrix contains NaN or inf values.")
        self.register_buffer("steering", steering.contiguous())

    def resizable_buffers(self) -> Tuple[str, ...]:
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


@dataclass
class ActAddSteering:
    """Result of :func:`fit_actadd`.

    Attributes:
        steering: layer → X (n, d), coefficient applied, float32.
        coefficient: the coefficient c.
    """

    steering: Dict[int, torch.Tensor]
    coefficient: float = 1.0

    def __post_init__(self) -> None:
        if not self.steering:
            raise ValueError("ActAddSteering needs a steering matrix for at least one layer.")
        self.coefficient = check_number(self.coefficient, "coefficient")

    @property
    def length(self) -> int:
        """n, the number of steered prompt positions."""
        return int(next(iter(self.steering.values())).shape[0])

    def config(
        self,
        model: Any,
        *,
        position_policy: Optional[PolicyLike] = None,
        component: str = "block_input",
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> pv.IntervenableConfig:
        """The ``IntervenableConfig`` of this fit (one ActAdd module per layer)."""
        return build_actadd_config(
            model,
            self.steering,
            coefficient=self.coefficient,
            position_policy=position_policy,
            component=component,
            metadata=metadata,
        )


def fit_actadd(
    prompt1: Mapping[int, Any],
    prompt2: Mapping[int, Any],
    *,
    coefficient: float = 1.0,
    allow_length_mismatch: bool = False,
) -> ActAddSteering:
    """ActAdd x-vectors X = c · (A₁ − A₂) per layer.

    Args:
        prompt1, prompt2: layer → (n, d) activations at ``block_input`` of every position of each
            steering prompt (BOS included). Pad the shorter *prompt* at tokenization (e.g. with
            a space token, as the paper) so both have n positions.
        coefficient: c.
        allow_length_mismatch: zero-extend the shorter matrix instead of raising.
    """
    coefficient = check_number(coefficient, "coefficient")
    layers = check_layer_map("prompt1", prompt1)
    check_layer_map("prompt2", prompt2, layers)
    steering = {}
    for layer in layers:
        a1 = check_matrix(prompt1[layer], f"prompt1[{layer}]")
        a2 = check_matrix(prompt2[layer], f"prompt2[{layer}]", width=a1.shape[1])
        if a1.shape[0] != a2.shape[0] and not allow_length_mismatch:
            raise ValueError(
                f"layer {layer}: the steering prompts have {a1.shape[0]} and {a2.shape[0]} positions. Right-pad "
                "the shorter prompt at tokenization (e.g. with a space token) or pass allow_length_mismatch=True."
            )
        n = max(a1.shape[0], a2.shape[0])
        a1 = torch.cat([a1, a1.new_zeros(n - a1.shape[0], a1.shape[1])])
        a2 = torch.cat([a2, a2.new_zeros(n - a2.shape[0], a2.shape[1])])
        steering[layer] = (coefficient * (a1 - a2)).to(torch.float32)
    return ActAddSteering(steering=steering, coefficient=coefficient)


@keyword_checked
def build_actadd_config(
    model: Any,
    steering: Mapping[int, torch.Tensor],
    *,
    coefficient: Optional[float] = None,
    position_policy: Optional[PolicyLike] = None,
    component: str = "block_input",
    metadata: Optional[Mapping[str, Any]] = None,
) -> pv.IntervenableConfig:
    """An ``IntervenableConfig`` with one ActAdd module per layer; ``steering`` maps layer → (n, d)
    x-vector with the coefficient applied (``coefficient`` is recorded as metadata only)."""
    modules = _modules(site_width(model, component), steering, position_policy)
    first = next(iter(modules.values()))
    hyper = {"coefficient": coefficient, "length": first.length, "position_policy": first.policy.name.lower()}
    return edit_config(model, "actadd", modules, component=component, hyperparameters=hyper, metadata=metadata)


def _modules(
    width: int, steering: Mapping[int, torch.Tensor], position_policy: Optional[PolicyLike]
) -> Dict[int, ActAddIntervention]:
    return {
        layer: ActAddIntervention(embed_dim=width, steering=x, position_policy=position_policy)
        for layer, x in steering.items()
    }


def _fit(inputs: Mapping[str, Any], config: ActAddSettings, context: FitContext) -> FitResult:
    result = fit_actadd(inputs["pos"], inputs["neg"], coefficient=config.coefficient)
    return FitResult(_modules(context.width, result.steering, config.position_policy), {"length": result.length})


SPEC = register_method(
    MethodSpec(
        name="actadd",
        title="Activation Addition (Turner et al., 2023)",
        intervention=ActAddIntervention,
        settings_class=ActAddSettings,
        site="block_input",
        order=0,
        format="actadd",
        reads="aligned",
        roles=("pos", "neg"),
        splits=(),
        fit=_fit,
        default_layers=None,
        strength="coefficient",
        not_bakeable=(
            "ActAdd adds its vectors to the first positions of the prompt only: a bias acts at every position"
        ),
    )
)
