"""ITI — Inference-Time Intervention (Li et al., NeurIPS 2023; likenneth/honest_llama).

Site: the input of the attention output projection (``attention_value_output``: all heads
concatenated, d = n_heads · head_dim). For each selected head h with unit direction θ̂_h (mass
mean shift, default, or probe weight) and σ_h, the standard deviation of that head's activations
projected on θ̂_h, the edit is

    x_h ← x_h + α · σ_h · θ̂_h        (α = 15 in the paper)

on that head's slice only; other heads are untouched. One module per layer edits all its selected
heads, stored as buffers ``directions`` (n_heads × head_dim, unit rows, zero for unselected
heads), ``sigmas`` (n_heads) and ``head_mask`` (n_heads, bool), plus ``alpha``.

Positions (default ``answer``): answer tokens when scoring multiple choice; in plain generation
the last position of each forward call, as the official code.

Baking into weights: ``o_proj.bias = W_o · δ`` with δ the concatenated shifts is the exact
equivalent of this edit at every position (:meth:`ITIIntervention.o_proj_bias`); the official
repository's newer ``bias = δ`` is a different edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .base import ActEditIntervention
from .positions import PositionPolicy
from .settings import Settings, keyword_checked

ITI_DIRECTIONS = ("mass_mean", "probe")
"""How a head's direction θ̂ is chosen: the normalised mass-mean shift or the probe's weight."""


@dataclass
class ITIConfig(Settings):
    """ITI's hyperparameters (a study's ``methods.iti.fit`` block; defaults of honest_llama).

    Attributes:
        top_k: heads intervened on, ranked by validation accuracy of their probes (48).
        alpha: strength α of x_h ← x_h + α σ_h θ̂_h (15).
        direction: ``mass_mean`` (mean(true) − mean(false); the paper's best) or ``probe``.
        seed: ``random_state`` of every probe's ``LogisticRegression``.
        max_iter: iterations of each ``LogisticRegression`` (1000).
        position_policy: ``answer`` (the continuation when scoring; the last position of each
            forward call in generation, as the official code).
    """

    top_k: int = 48
    alpha: float = 15.0
    direction: str = "mass_mean"
    seed: int = 0
    max_iter: int = 1000
    position_policy: str = "answer"

    def __post_init__(self) -> None:
        for name in ("top_k", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ITI {name} must be a positive integer, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ITI seed must be a non-negative integer, got {self.seed!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f"ITI alpha must be a finite number, got {self.alpha!r}.")
        self.alpha = float(self.alpha)
        if self.direction not in ITI_DIRECTIONS:
            raise ValueError(f"ITI direction must be one of {', '.join(ITI_DIRECTIONS)}, got {self.direction!r}.")
        self.position_policy = PositionPolicy.parse(self.position_policy).name.lower()


class ITIIntervention(ActEditIntervention):
    """Per-head additive shift at the o_proj input; see the module docstring.

    Args:
        embed_dim: n_heads · head_dim of the site (pyvene passes it).
        num_heads: number of attention heads (default 1 until fitted; resized on load).
        directions: optional (n_heads, head_dim) unit directions.
        sigmas: optional (n_heads,) standard deviations along the directions.
        heads: indices of the selected heads (default: those with a non-zero direction).
        alpha: strength α (default 15).
    """

    default_policy = PositionPolicy.ANSWER
    method_name = "iti"

    def __init__(self, embed_dim: Optional[int] = None, num_heads: int = 1,
                 directions: Optional[torch.Tensor] = None, sigmas: Optional[torch.Tensor] = None,
                 heads: Optional[Sequence[int]] = None, alpha: float = 15.0, **kwargs):
        super().__init__(embed_dim=embed_dim, **kwargs)
        d = self.d
        if num_heads <= 0 or d % num_heads:
            raise ValueError(f"num_heads={num_heads} must be positive and divide the site width {d}.")
        head_dim = d // num_heads
        if directions is None:
            directions = torch.zeros(num_heads, head_dim)
        directions = torch.as_tensor(directions, dtype=torch.float32)
        if tuple(directions.shape) != (num_heads, head_dim):
            raise ValueError(f"directions must have shape (num_heads={num_heads}, head_dim={head_dim}), "
                             f"got {tuple(directions.shape)}.")
        sigmas = torch.ones(num_heads) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)
        if tuple(sigmas.shape) != (num_heads,):
            raise ValueError(f"sigmas must have shape ({num_heads},), got {tuple(sigmas.shape)}.")
        if heads is None:
            head_mask = directions.abs().sum(-1) > 0
        else:
            head_mask = torch.zeros(num_heads, dtype=torch.bool)
            for h in heads:
                if not 0 <= int(h) < num_heads:
                    raise ValueError(f"head index {h} is out of range for {num_heads} heads.")
                head_mask[int(h)] = True
        for name, t in (("directions", directions), ("sigmas", sigmas)):
            if not torch.isfinite(t).all():
                raise ValueError(f"ITI {name} contain NaN or inf values.")
        self.register_buffer("directions", directions.contiguous())
        self.register_buffer("sigmas", sigmas.contiguous())
        self.register_buffer("head_mask", head_mask)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def resizable_buffers(self) -> tuple:
        return ("directions", "sigmas", "head_mask")

    @property
    def num_heads(self) -> int:
        return self.directions.shape[0]

    @property
    def selected_heads(self) -> list:
        return torch.nonzero(self.head_mask).flatten().tolist()

    def shift(self) -> torch.Tensor:
        """δ ∈ R^d: α·σ_h·θ̂_h on each selected head's slice, zero elsewhere."""
        per_head = self.alpha * self.sigmas[:, None] * self.directions * self.head_mask[:, None]
        return per_head.reshape(-1)

    def edit(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return h + self.shift().to(h.dtype)

    def o_proj_bias(self, o_proj_weight: torch.Tensor) -> torch.Tensor:
        """The o_proj bias W_o·δ equivalent to this edit at every position."""
        return o_proj_weight @ self.shift().to(o_proj_weight.dtype)


def mass_mean_directions(acts: torch.Tensor, labels: torch.Tensor, num_heads: int) -> tuple:
    """Mass-mean directions and σ per head from activations ``(N, d)`` and labels ``(N,)``.

    θ̂_h = normalised mean(true) − mean(false) on head h's slice; σ_h = std of all activations of
    head h projected on θ̂_h (as the official code: over the training activations).
    """
    acts = torch.as_tensor(acts, dtype=torch.float64)
    labels = torch.as_tensor(labels).bool()
    if acts.dim() != 2 or acts.shape[0] != labels.shape[0]:
        raise ValueError("acts must be (N, d) with one label per row.")
    if labels.all() or (~labels).all():
        raise ValueError("mass-mean directions need both true and false examples.")
    n, d = acts.shape
    heads = acts.reshape(n, num_heads, d // num_heads)
    diff = heads[labels].mean(0) - heads[~labels].mean(0)
    directions = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    projections = torch.einsum("nhk,hk->nh", heads, directions)
    sigmas = projections.std(dim=0, correction=0)  # np.std (ddof=0), as the official code
    return directions.float(), sigmas.float()


@keyword_checked
def build_iti_config(model, heads: dict, *, alpha: float = 15.0, position_policy=None,
                     component: str = "attention_value_output", metadata: Optional[dict] = None):
    """An ``IntervenableConfig`` with one ITI module per layer.

    ``heads`` maps layer → ``{"directions": (n_heads, head_dim), "sigmas": (n_heads,),
    "heads": [selected head indices]}``.
    """
    from .config import edit_config, site_width

    width = site_width(model, component)
    num_heads = int(model.config.num_attention_heads)
    modules = {}
    for layer, spec in heads.items():
        unknown = set(spec) - {"directions", "sigmas", "heads"}
        if unknown:
            raise ValueError(f"unknown ITI head spec keys {sorted(unknown)} for layer {layer}.")
        modules[layer] = ITIIntervention(embed_dim=width, num_heads=num_heads, alpha=alpha,
                                         position_policy=position_policy, **spec)
    first = next(iter(modules.values()))
    hyper = {"alpha": float(alpha), "heads": {str(layer): m.selected_heads for layer, m in modules.items()},
             "position_policy": first.policy.name.lower()}
    return edit_config(model, "iti", modules, component=component, hyperparameters=hyper, metadata=metadata)
