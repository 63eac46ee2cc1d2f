"""Diff — the difference-vector baseline of the HPR paper (Pham & Nguyen, EMNLP 2024, §4.1, Table 1).

The paper: "Given a positive or negative activation, this baseline employs a feedforward network
to directly predict the difference vector with the corresponding positive activation. At
inference time, we utilize the sum of the original activation vector and its predicted difference
vector to obtain the predicted positive activation." The released code has no Diff; what the
paper leaves open is chosen here as HPR's released code does for its own networks:

* where: ``block_output`` of every layer, a module per layer, the best ``top_layers`` enabled
  (as HPR; Diff has no probe, so layers are ranked by the eval loss of the network);
* the network f: d → d/4 → d, GELU between (``hidden_widths``; the paper gives no width, d/4 is
  chosen for the cost of training every layer), reading h̃ = h / σ, σ the RMS of
  the layer's training activations (the fixed parameter ``input_scale``, as HPR's
  ``input_norm: rms``; ``input_norm: none`` reads h itself);
* the training loss on a batch of aligned pairs (h⁺ᵢ, h⁻ᵢ), X = [h⁺; h⁻], targets
  D = [h⁺ − h⁺; h⁺ − h⁻] = [0; h⁺ − h⁻]:

      ℓ = (1 / 2n) Σᵢ ‖f(x̃ᵢ) − dᵢ / σ‖² / d      (mean squared error over rows and dimensions)

  so the loss is in units of the layer's own scale, and the eval losses of layers compare;
* the edit: h′ = h + α · σ · f(h / σ) at every position (α = ``alpha``, 1 by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import ActEditIntervention
from .checks import check_number
from .positions import PositionPolicy
from .registry import LossTerm, MethodSpec, TrainedMethodSettings, TrainingRecipe, register_method

INPUT_NORMS = ("rms", "none")
"""Diff's ``input_norm`` values: the network reads h / RMS of the training activations, or h."""


@dataclass
class DiffSettings(TrainedMethodSettings):
    """Diff's settings (a study's ``methods.<row>.settings`` block; its optimiser is ``train``).

    Attributes:
        layers: the layers a network is trained for (default all, as HPR).
        top_layers: layers enabled, those with the lowest eval loss.
        strategy: ``probe_first`` or ``joint``; with one loss term both train the same.
        alpha: scale α of the predicted difference at inference (1: the paper's sum).
        hidden_widths: hidden widths of the network; None: [d/4].
        input_norm: ``rms`` (default; the network reads h / σ and predicts in units of σ) or
            ``none`` (h itself).
        position_policy: positions edited (``all``, as HPR's published numbers).
    """

    INFERENCE_ONLY = ("alpha", "position_policy")

    alpha: float = 1.0
    hidden_widths: Optional[List[int]] = None
    input_norm: str = "rms"
    position_policy: str = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha = check_number(self.alpha, "Diff alpha")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"Diff input_norm must be one of {', '.join(INPUT_NORMS)}, got {self.input_norm!r}.")
        if self.hidden_widths is not None:
            widths = list(self.hidden_widths)
            if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
                raise ValueError(f"Diff hidden_widths must be a list of positive integers, got {widths!r}.")
            self.hidden_widths = widths

    def intervention_arguments(self) -> Dict[str, Any]:
        """The :class:`DiffIntervention` constructor's arguments these settings give."""
        return {
            "alpha": self.alpha,
            "hidden_widths": self.hidden_widths,
            "input_norm": self.input_norm,
            "position_policy": self.position_policy,
        }


def _network(d: int, hidden: Sequence[int]) -> nn.Sequential:
    """d → hidden… → d, GELU between the linear layers."""
    layers: List[nn.Module] = []
    width = d
    for w in hidden:
        layers += [nn.Linear(width, int(w)), nn.GELU()]
        width = int(w)
    layers.append(nn.Linear(width, d))
    return nn.Sequential(*layers)


class DiffIntervention(ActEditIntervention):
    """Diff at ``block_output``: h′ = h + α · σ · f(h / σ); see the module docstring.

    Args:
        embed_dim: hidden size d.
        alpha: scale α of the predicted difference (default 1).
        hidden_widths: hidden widths of f; default [d/4].
        input_norm: ``rms`` (default: :meth:`prepare` sets ``input_scale`` σ to the RMS of the
            training activations) or ``none`` (σ = 1).
        position_policy: positions edited (default ``all``).

    Public state (artifact format): ``net`` (f), the fixed parameter ``input_scale`` (d,)
    (σ·1), buffers ``alpha``, ``hidden``, ``input_norm`` (index into :data:`INPUT_NORMS`).
    """

    default_policy = PositionPolicy.ALL
    method_name = "diff"
    training_recipe = TrainingRecipe(terms=(LossTerm("diff_loss", trains="net"),), selection="eval_loss")
    """One loss term (f's MSE); no probe, so the layers with the lowest eval loss are enabled."""
    fixed_parameters = ("input_scale",)

    alpha: torch.Tensor
    hidden: torch.Tensor
    input_norm: torch.Tensor

    def __init__(
        self,
        embed_dim: Optional[int] = None,
        alpha: float = 1.0,
        hidden_widths: Optional[Sequence[int]] = None,
        input_norm: str = "rms",
        **kwargs: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, **kwargs)
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}.")
        d = self.d
        widths = tuple(int(w) for w in hidden_widths) if hidden_widths is not None else (max(1, d // 4),)
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"hidden_widths must be positive integers, got {widths}.")
        self.net = _network(d, widths)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("hidden", torch.tensor(list(widths), dtype=torch.long))
        self.register_buffer("input_norm", torch.tensor(INPUT_NORMS.index(input_norm), dtype=torch.long))
        self.input_scale = nn.Parameter(torch.ones(d), requires_grad=False)

    @torch.no_grad()
    def prepare(self, h: torch.Tensor) -> None:
        """Set σ (``input_scale``) to the RMS of every coordinate of training activations ``h``
        (n, d) (``input_norm="rms"``); ``none`` leaves it 1."""
        if INPUT_NORMS[int(self.host("input_norm"))] == "none":
            return
        h = torch.as_tensor(h)
        if h.dim() != 2 or h.shape[-1] != self.d or h.shape[0] == 0:
            raise ValueError(f"prepare needs training activations of shape (n > 0, {self.d}), got {tuple(h.shape)}.")
        rms = h.double().square().mean().sqrt()
        if not bool(torch.isfinite(rms)) or float(rms) <= 0:
            raise ValueError("the training activations are all zero, NaN or infinite: nothing to learn from.")
        self.input_scale.fill_(float(rms))

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """f(h / σ): the predicted difference to the positive activation, in units of σ."""
        out: torch.Tensor = self.net(h / self.input_scale.to(h.dtype))
        return out

    def edit(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        work = h.to(self.input_scale.dtype)
        return work + self.alpha * self.input_scale * self.predict(work)

    # -------------------------------------------------------------------------------- loss
    def diff_loss(self, h_pos: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
        """MSE(f(X / σ), D / σ), X = [h⁺; h⁻], D = [0; h⁺ − h⁻] (the module docstring's ℓ)."""
        if h_pos.shape != h_neg.shape:
            raise ValueError(f"h_pos {tuple(h_pos.shape)} and h_neg {tuple(h_neg.shape)} must have the same shape.")
        x = torch.cat([h_pos, h_neg], dim=0)
        target = torch.cat([torch.zeros_like(h_pos), h_pos - h_neg], dim=0) / self.input_scale.to(x.dtype)
        return F.mse_loss(self.predict(x), target)

    @staticmethod
    def stacked_diff_loss(
        weights: Mapping[str, torch.Tensor], h_pos: torch.Tensor, h_neg: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`diff_loss` of every layer: (L,) from h⁺, h⁻ (L, n, d); ``weights`` holds each
        parameter with a leading layer axis, matrices transposed ((L, in, out))."""
        x = torch.cat([h_pos, h_neg], dim=1)
        scale = weights["input_scale"].unsqueeze(1)
        target = torch.cat([torch.zeros_like(h_pos), h_pos - h_neg], dim=1) / scale
        out, i = x / scale, 0
        while f"net.{i}.weight" in weights:
            out = torch.baddbmm(weights[f"net.{i}.bias"].unsqueeze(1), out, weights[f"net.{i}.weight"])
            if f"net.{i + 2}.weight" in weights:
                out = F.gelu(out)
            i += 2
        return (out - target).square().mean(dim=(1, 2))

    # -------------------------------------------------------------------------- save/load
    def _prepare_load(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        widths = state_dict.get(prefix + "hidden")
        if widths is not None and widths.tolist() != self.hidden.tolist():
            device = self.input_scale.device
            self.net = _network(self.d, widths.tolist()).to(device)
            self._buffers["hidden"] = widths.clone().to(device)


SPEC = register_method(
    MethodSpec(
        name="diff",
        title="Diff, the difference-vector baseline (Pham & Nguyen, EMNLP 2024, §4.1)",
        intervention=DiffIntervention,
        settings_class=DiffSettings,
        site="block_output",
        order=5,
        format="hpr",
        reads="paired",
        splits=("train", "eval"),
        trained=True,
        strength="alpha",
        not_bakeable=("Diff adds what a network predicts from each activation: no bias reproduces it"),
    )
)
