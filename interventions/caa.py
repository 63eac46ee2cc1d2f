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

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

import pyvene as pv
import torch

from .base import ActEditIntervention, shift_edit
from .checks import check_layer_map, check_matrix, check_number
from .edits import edit_config, site_width
from .positions import PolicyLike, PositionPolicy
from .registry import BakedBias, FitContext, FitResult, MethodSettings, MethodSpec, register_method
from .settings import keyword_checked


@dataclass
class CAASettings(MethodSettings):
    """CAA's settings (a study's ``methods.caa.settings`` block).

    Attributes:
        layers: the layer(s) steered, one vector each (Rimsky et al. steer one layer: 13 of
            Llama-2-7B's 32, i.e. ``0.4`` of the depth). Required: it never means every layer.
        multiplier: m in h ← h + m·v.
        position_policy: ``from_position`` (default: from ``position_start`` on, generated tokens
            included) or e.g. ``answer`` (the scored continuation).
        position_start: the start of ``from_position`` (negative: counted from the prompt's end).
    """

    INFERENCE_ONLY = ("multiplier", "position_policy", "position_start")

    multiplier: float = 1.0
    position_policy: str = "from_position"
    position_start: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.multiplier = check_number(self.multiplier, "CAA multiplier")
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

    vector: torch.Tensor
    multiplier: torch.Tensor

    def __init__(
        self,
        embed_dim: Optional[int] = None,
        vector: Optional[torch.Tensor] = None,
        multiplier: float = 1.0,
        **kwargs: Any,
    ) -> None:
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

    def frozen_edit(self) -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        """:meth:`edit` with m·v built once (its fast path)."""
        return shift_edit(self.multiplier * self.vector)


@dataclass
class CAAVectors:
    """Result of :func:`fit_caa`.

    Attributes:
        vectors: layer → v (d,), float32.
        num_pairs: number of contrast pairs averaged.
    """

    vectors: Dict[int, torch.Tensor]
    num_pairs: int

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("CAAVectors needs a vector for at least one layer.")
        if self.num_pairs < 1:
            raise ValueError(f"num_pairs must be positive, got {self.num_pairs}.")

    def config(
        self,
        model: Any,
        *,
        multiplier: float = 1.0,
        position_policy: Optional[PolicyLike] = None,
        position_start: int = 0,
        component: str = "block_output",
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> pv.IntervenableConfig:
        """The ``IntervenableConfig`` of this fit (one CAA module per layer)."""
        return build_caa_config(
            model,
            self.vectors,
            multiplier=multiplier,
            position_policy=position_policy,
            position_start=position_start,
            component=component,
            metadata={"settings": {"num_pairs": self.num_pairs}, **(metadata or {})},
        )


def fit_caa(pos: Mapping[int, Any], neg: Mapping[int, Any]) -> CAAVectors:
    """CAA vectors v = mean_i (h⁺_i − h⁻_i) per layer (float64 accumulation).

    Args:
        pos: layer → (N, d) activations at the answer token of the positive completions.
        neg: layer → (N, d) activations of the paired negative completions (row i ↔ row i).
    """
    layers = check_layer_map("pos", pos)
    check_layer_map("neg", neg, layers)
    vectors = {}
    n = 0
    for layer in layers:
        p = check_matrix(pos[layer], f"pos[{layer}]")
        q = check_matrix(neg[layer], f"neg[{layer}]", width=p.shape[1], rows=p.shape[0])
        vectors[layer] = (p - q).mean(0).to(torch.float32)
        n = p.shape[0]
    return CAAVectors(vectors=vectors, num_pairs=int(n))


@keyword_checked
def build_caa_config(
    model: Any,
    vectors: Mapping[int, torch.Tensor],
    *,
    multiplier: float = 1.0,
    position_policy: Optional[PolicyLike] = None,
    position_start: int = 0,
    component: str = "block_output",
    metadata: Optional[Mapping[str, Any]] = None,
) -> pv.IntervenableConfig:
    """An ``IntervenableConfig`` with one CAA module per layer; ``vectors`` maps layer → v."""
    modules = _modules(site_width(model, component), vectors, multiplier, position_policy, position_start)
    first = next(iter(modules.values()))
    hyper = {
        "multiplier": float(multiplier),
        "position_policy": first.policy.name.lower(),
        "position_start": int(position_start),
    }
    return edit_config(model, "caa", modules, component=component, hyperparameters=hyper, metadata=metadata)


def _modules(
    width: int,
    vectors: Mapping[int, torch.Tensor],
    multiplier: float,
    position_policy: Optional[PolicyLike],
    position_start: int,
) -> Dict[int, CAAIntervention]:
    return {
        layer: CAAIntervention(
            embed_dim=width,
            vector=v,
            multiplier=multiplier,
            position_policy=position_policy,
            position_start=position_start,
        )
        for layer, v in vectors.items()
    }


def _fit(inputs: Mapping[str, Any], config: CAASettings, context: FitContext) -> FitResult:
    result = fit_caa(inputs["pos"], inputs["neg"])
    modules = _modules(context.width, result.vectors, config.multiplier, config.position_policy, config.position_start)
    return FitResult(modules, {"num_pairs": result.num_pairs})


def _bake(module: CAAIntervention, component: str, weight_of: Callable[[str], torch.Tensor]) -> List[BakedBias]:
    """CAA's m·v added to the block's output (or the MLP's output) at every position is the bias
    m·v of the MLP's down projection, whose output is the last term added to the block's residual
    stream (the export checks that the family adds it unchanged)."""
    if component not in ("block_output", "mlp_output"):
        raise ValueError(
            f"CAA edits {component!r}; only an addition to block_output or mlp_output is a down_proj bias."
        )
    return [BakedBias("down_proj", module.multiplier.double() * module.vector.double(), residual=True)]


SPEC = register_method(
    MethodSpec(
        name="caa",
        title="Contrastive Activation Addition (Rimsky et al., ACL 2024)",
        intervention=CAAIntervention,
        settings_class=CAASettings,
        site="block_output",
        order=1,
        format="caa",
        reads="paired",
        splits=("train",),
        fit=_fit,
        default_layers=None,
        strength="multiplier",
        bake=_bake,
    )
)
