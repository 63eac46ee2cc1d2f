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

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyvene as pv
import torch
from tqdm.auto import tqdm

from .base import ActEditIntervention, shift_edit
from .checks import check_int, check_labels, check_layer_map, check_matrix, check_number
from .edits import edit_config, site_width
from .positions import PolicyLike, PositionPolicy
from .registry import BakedBias, FitContext, FitResult, MethodSettings, MethodSpec, register_method
from .settings import keyword_checked

ITI_DIRECTIONS = ("mass_mean", "probe")
"""How a head's direction θ̂ is chosen: the normalised mass-mean shift or the probe's weight."""


@dataclass
class ITISettings(MethodSettings):
    """ITI's settings (a study's ``methods.iti.settings`` block; defaults of honest_llama).

    Attributes:
        layers: the layers whose heads are candidates (default all).
        top_heads: heads intervened on, ranked by validation accuracy of their probes (48).
        alpha: strength α of x_h ← x_h + α σ_h θ̂_h (15).
        direction: ``mass_mean`` (mean(true) − mean(false); the paper's best) or ``probe``.
        seed: ``random_state`` of every probe's ``LogisticRegression``.
        max_iter: iterations of each ``LogisticRegression`` (1000).
        position_policy: ``answer`` (the continuation when scoring; the last position of each
            forward call in generation, as the official code).
    """

    MOVED = {"top_k": "top_heads"}
    INFERENCE_ONLY = ("alpha", "position_policy")

    top_heads: int = 48
    alpha: float = 15.0
    direction: str = "mass_mean"
    seed: int = 0
    max_iter: int = 1000
    position_policy: str = "answer"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.top_heads = check_int(self.top_heads, "ITI top_heads")
        self.max_iter = check_int(self.max_iter, "ITI max_iter")
        self.seed = check_int(self.seed, "ITI seed", low=0)
        self.alpha = check_number(self.alpha, "ITI alpha")
        if self.direction not in ITI_DIRECTIONS:
            raise ValueError(f"ITI direction must be one of {', '.join(ITI_DIRECTIONS)}, got {self.direction!r}.")


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

    directions: torch.Tensor
    sigmas: torch.Tensor
    head_mask: torch.Tensor
    alpha: torch.Tensor

    def __init__(
        self,
        embed_dim: Optional[int] = None,
        num_heads: int = 1,
        directions: Optional[torch.Tensor] = None,
        sigmas: Optional[torch.Tensor] = None,
        heads: Optional[Sequence[int]] = None,
        alpha: float = 15.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(embed_dim=embed_dim, **kwargs)
        d = self.d
        if num_heads <= 0 or d % num_heads:
            raise ValueError(f"num_heads={num_heads} must be positive and divide the site width {d}.")
        head_dim = d // num_heads
        if directions is None:
            directions = torch.zeros(num_heads, head_dim)
        directions = torch.as_tensor(directions, dtype=torch.float32)
        if tuple(directions.shape) != (num_heads, head_dim):
            raise ValueError(
                f"directions must have shape (num_heads={num_heads}, head_dim={head_dim}), "
                f"got {tuple(directions.shape)}."
            )
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

    def resizable_buffers(self) -> Tuple[str, ...]:
        return ("directions", "sigmas", "head_mask")

    @property
    def num_heads(self) -> int:
        return self.directions.shape[0]

    @property
    def selected_heads(self) -> List[int]:
        heads: List[int] = torch.nonzero(self.head_mask).flatten().tolist()
        return heads

    def shift(self) -> torch.Tensor:
        """δ ∈ R^d: α·σ_h·θ̂_h on each selected head's slice, zero elsewhere."""
        per_head = self.alpha * self.sigmas[:, None] * self.directions * self.head_mask[:, None]
        return per_head.reshape(-1)

    def edit(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        inputs = (self.alpha, self.sigmas, self.directions, self.head_mask)
        shift: torch.Tensor = self.derived(f"shift {h.dtype}", inputs, lambda: self.shift().to(h.dtype))
        return h + shift

    def frozen_edit(self) -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
        """:meth:`edit` with δ built once (its fast path)."""
        return shift_edit(self.shift())

    def o_proj_bias(self, o_proj_weight: torch.Tensor) -> torch.Tensor:
        """The o_proj bias W_o·δ equivalent to this edit at every position."""
        return o_proj_weight @ self.shift().to(o_proj_weight.dtype)


def _bake(module: ITIIntervention, component: str, weight_of: Callable[[str], torch.Tensor]) -> List[BakedBias]:
    """ITI's shift δ of the heads' concatenated output (o_proj's input) is the bias W_o·δ of o_proj
    at every position, exactly (o_proj is linear), whatever the family does after o_proj."""
    if component != "attention_value_output":
        raise ValueError(
            f"ITI edits {component!r}; only a shift of attention_value_output (o_proj's input) is an o_proj bias."
        )
    return [BakedBias("o_proj", module.o_proj_bias(weight_of("o_proj").double()))]


def head_directions(acts: torch.Tensor, labels: torch.Tensor, num_heads: int) -> torch.Tensor:
    """θ̂_h = normalised mean(true) − mean(false) on each head's slice: (n_heads, head_dim), float64.

    ``acts`` (N, n_heads · head_dim) and boolean ``labels`` (N,) with both classes present.
    """
    acts = torch.as_tensor(acts, dtype=torch.float64)
    labels = torch.as_tensor(labels).bool()
    if acts.dim() != 2 or acts.shape[0] != labels.shape[0]:
        raise ValueError("acts must be (N, d) with one label per row.")
    if labels.all() or (~labels).all():
        raise ValueError("mass-mean directions need both true and false examples.")
    heads = acts.reshape(acts.shape[0], num_heads, acts.shape[1] // num_heads)
    diff = heads[labels].mean(0) - heads[~labels].mean(0)
    directions: torch.Tensor = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return directions


def head_sigmas(acts: torch.Tensor, directions: torch.Tensor, num_heads: int) -> torch.Tensor:
    """σ_h = std (ddof 0, ``np.std`` as the official code) of head h's activations projected on θ̂_h."""
    acts = torch.as_tensor(acts, dtype=torch.float64)
    heads = acts.reshape(acts.shape[0], num_heads, acts.shape[1] // num_heads)
    return torch.einsum("nhk,hk->nh", heads, directions.to(torch.float64)).std(dim=0, correction=0)


def mass_mean_directions(acts: torch.Tensor, labels: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mass-mean directions and σ of every head from activations ``(N, d)`` and labels ``(N,)``
    (σ over all of ``acts``, as the official code over its training activations); float32."""
    directions = head_directions(acts, labels, num_heads)
    return directions.float(), head_sigmas(acts, directions, num_heads).float()


@dataclass
class ITIHeads:
    """Result of :func:`fit_iti`.

    Attributes:
        heads: layer → ``{"directions": (n_heads, head_dim), "sigmas": (n_heads,), "heads": [...]}``
            for :func:`build_iti_config`; only layers with a selected head appear; unselected heads
            have zero direction and σ = 0.
        val_accuracy: layer → (n_heads,) validation accuracy of each head's probe.
        ranking: every (layer, head, accuracy), best first (ties: lower layer, then lower head).
        selected: the top-K (layer, head) pairs, best first.
        num_heads: heads per layer.
        alpha: intervention strength α.
        direction: ``mass_mean`` or ``probe``.
    """

    heads: Dict[int, Dict[str, Any]]
    val_accuracy: Dict[int, torch.Tensor]
    ranking: List[Tuple[int, int, float]]
    selected: List[Tuple[int, int]]
    num_heads: int
    alpha: float = 15.0
    direction: str = "mass_mean"

    def __post_init__(self) -> None:
        if self.direction not in ITI_DIRECTIONS:
            raise ValueError(f"direction must be one of {ITI_DIRECTIONS}, got {self.direction!r}.")
        if not self.heads or not self.selected:
            raise ValueError("ITIHeads needs at least one selected head.")
        self.alpha = check_number(self.alpha, "alpha")

    @property
    def record(self) -> Dict[str, Any]:
        """How the heads were chosen (the artifact's ``fit`` metadata)."""
        return {
            "direction": self.direction,
            "top_heads": len(self.selected),
            "selected": [
                [layer, head, round(float(self.val_accuracy[layer][head]), 6)] for layer, head in self.selected
            ],
        }

    def config(
        self,
        model: Any,
        *,
        alpha: Optional[float] = None,
        position_policy: Optional[PolicyLike] = None,
        component: str = "attention_value_output",
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> pv.IntervenableConfig:
        """The ``IntervenableConfig`` of this fit (one ITI module per layer with selected heads)."""
        n_model = int(model.config.num_attention_heads)
        if n_model != self.num_heads:
            raise ValueError(f"this ITI fit has {self.num_heads} heads per layer but the model has {n_model}.")
        return build_iti_config(
            model,
            self.heads,
            alpha=self.alpha if alpha is None else float(alpha),
            position_policy=position_policy,
            component=component,
            metadata={"fit": self.record, **(metadata or {})},
        )


def fit_iti(
    train_acts: Mapping[int, Any],
    train_labels: Any,
    val_acts: Mapping[int, Any],
    val_labels: Any,
    *,
    num_heads: int,
    top_heads: int = 48,
    direction: str = "mass_mean",
    alpha: float = 15.0,
    seed: int = 0,
    max_iter: int = 1000,
    tuning_acts: Optional[Mapping[int, Any]] = None,
    progress: bool = False,
) -> ITIHeads:
    """Fit ITI: probe every (layer, head), keep the top-K heads by validation accuracy.

    One scikit-learn ``LogisticRegression`` per (layer, head) on the head's slice of the o_proj
    input, trained on the train split; heads ranked by validation accuracy over all layers; the
    top K get θ̂_h and σ_h (:func:`head_directions`, :func:`head_sigmas`).

    Args:
        train_acts: layer → (N, n_heads·head_dim) o_proj inputs at the last token of
            "Q: {question} A: {choice}", rows of the train questions.
        train_labels: (N,) 1 = the choice is true.
        val_acts, val_labels: the same for the validation questions (split by question).
        num_heads: attention heads per layer (the width must divide evenly).
        top_heads: heads to intervene on (paper: 48), capped at the number of heads available.
        direction: ``mass_mean`` (default: mean(true) − mean(false) over train ∪ validation, as
            the official ``get_com_directions``) or ``probe`` (the train probe's weight).
            Both are normalised to unit length.
        alpha: α of the edit x_h ← x_h + α σ_h θ̂_h.
        seed: ``random_state`` of every ``LogisticRegression``.
        max_iter: iterations of each ``LogisticRegression`` (official: 1000).
        tuning_acts: layer → (M, d) activations whose projections give σ (default: train ∪
            validation; the official script used every question, test included).
        progress: show a tqdm bar over layers.
    """
    # lazy: scikit-learn is imported only by the one fit that needs it (about 1 s)
    from sklearn.linear_model import LogisticRegression

    if direction not in ITI_DIRECTIONS:
        raise ValueError(f"direction must be one of {ITI_DIRECTIONS}, got {direction!r}.")
    top_heads = check_int(top_heads, "top_heads")
    num_heads = check_int(num_heads, "num_heads")
    alpha = check_number(alpha, "alpha")
    layers = check_layer_map("train_acts", train_acts)
    check_layer_map("val_acts", val_acts, layers)
    if tuning_acts is not None:
        check_layer_map("tuning_acts", tuning_acts, layers)
    first = check_matrix(train_acts[layers[0]], f"train_acts[{layers[0]}]")
    width = first.shape[1]
    if width % num_heads:
        raise ValueError(f"the activation width {width} is not divisible by num_heads={num_heads}.")
    head_dim = width // num_heads
    y_train = check_labels(train_labels, first.shape[0], "train_labels")
    if bool(y_train.all()) or not bool(y_train.any()):
        raise ValueError("train_labels need both true and false examples to fit probes.")
    n_val = check_matrix(val_acts[layers[0]], f"val_acts[{layers[0]}]", width=width).shape[0]
    y_val = check_labels(val_labels, n_val, "val_labels")
    y_train_np, y_val_np = y_train.numpy().astype(np.int64), y_val.numpy().astype(np.int64)
    y_all = torch.cat([y_train, y_val])

    accuracy: Dict[int, torch.Tensor] = {}
    probes: Dict[Tuple[int, int], np.ndarray] = {}
    for layer in tqdm(layers, desc="ITI probes", unit="layer", disable=not progress):
        xt = check_matrix(train_acts[layer], f"train_acts[{layer}]", width=width, rows=len(y_train))
        xv = check_matrix(val_acts[layer], f"val_acts[{layer}]", width=width, rows=len(y_val))
        ht = xt.reshape(len(xt), num_heads, head_dim).numpy()
        hv = xv.reshape(len(xv), num_heads, head_dim).numpy()
        accs = torch.zeros(num_heads, dtype=torch.float64)
        for head in range(num_heads):
            clf = LogisticRegression(random_state=seed, max_iter=max_iter).fit(ht[:, head], y_train_np)
            accs[head] = float((clf.predict(hv[:, head]) == y_val_np).mean())
            probes[(layer, head)] = clf.coef_.reshape(-1).astype(np.float64)
        accuracy[layer] = accs

    ranking = sorted(
        ((layer, head, float(accuracy[layer][head])) for layer in layers for head in range(num_heads)),
        key=lambda t: (-t[2], t[0], t[1]),
    )
    k = min(int(top_heads), len(ranking))
    selected = [(layer, head) for layer, head, _ in ranking[:k]]

    heads: Dict[int, Dict[str, Any]] = {}
    for layer in sorted({layer for layer, _ in selected}):
        # read again rather than keep every layer in memory (32 layers x 4096 wide in float64 is GBs)
        xt = check_matrix(train_acts[layer], f"train_acts[{layer}]", width=width)
        xv = check_matrix(val_acts[layer], f"val_acts[{layer}]", width=width)
        usable = torch.cat([xt, xv])
        tuning = (
            usable if tuning_acts is None else check_matrix(tuning_acts[layer], f"tuning_acts[{layer}]", width=width)
        )
        chosen = sorted(head for l_, head in selected if l_ == layer)
        if direction == "mass_mean":
            candidates = head_directions(usable, y_all, num_heads)
        else:
            candidates = torch.stack([torch.from_numpy(probes[(layer, h)]) for h in range(num_heads)])
            candidates = candidates / candidates.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        directions = torch.zeros(num_heads, head_dim, dtype=torch.float64)
        for head in chosen:
            if not float(candidates[head].norm()) > 0:
                raise ValueError(
                    f"layer {layer} head {head}: the {direction} direction is zero; "
                    "true and false activations do not differ there."
                )
            directions[head] = candidates[head]
        sigmas = head_sigmas(tuning, directions, num_heads) * (directions.abs().sum(-1) > 0)
        heads[layer] = {"directions": directions.float(), "sigmas": sigmas.float(), "heads": chosen}
    return ITIHeads(
        heads=heads,
        val_accuracy=accuracy,
        ranking=ranking,
        selected=selected,
        num_heads=int(num_heads),
        alpha=float(alpha),
        direction=direction,
    )


@keyword_checked
def build_iti_config(
    model: Any,
    heads: Mapping[int, Mapping[str, Any]],
    *,
    alpha: float = 15.0,
    position_policy: Optional[PolicyLike] = None,
    component: str = "attention_value_output",
    metadata: Optional[Mapping[str, Any]] = None,
) -> pv.IntervenableConfig:
    """An ``IntervenableConfig`` with one ITI module per layer.

    ``heads`` maps layer → ``{"directions": (n_heads, head_dim), "sigmas": (n_heads,),
    "heads": [selected head indices]}``.
    """
    width = site_width(model, component)
    num_heads = int(model.config.num_attention_heads)
    modules = {layer: _module(width, num_heads, spec, layer, alpha, position_policy) for layer, spec in heads.items()}
    first = next(iter(modules.values()))
    hyper = {
        "alpha": float(alpha),
        "heads": {str(layer): m.selected_heads for layer, m in modules.items()},
        "position_policy": first.policy.name.lower(),
    }
    return edit_config(model, "iti", modules, component=component, hyperparameters=hyper, metadata=metadata)


def _module(
    width: int, num_heads: int, spec: Mapping[str, Any], layer: int, alpha: float, position_policy: Optional[PolicyLike]
) -> ITIIntervention:
    unknown = set(spec) - {"directions", "sigmas", "heads"}
    if unknown:
        raise ValueError(f"unknown ITI head spec keys {sorted(unknown)} for layer {layer}.")
    return ITIIntervention(embed_dim=width, num_heads=num_heads, alpha=alpha, position_policy=position_policy, **spec)


def _fit(inputs: Mapping[str, Any], config: ITISettings, context: FitContext) -> FitResult:
    (train_acts, train_labels), (val_acts, val_labels) = inputs["train"], inputs["eval"]
    result = fit_iti(
        train_acts,
        train_labels,
        val_acts,
        val_labels,
        num_heads=context.num_heads,
        top_heads=config.top_heads,
        direction=config.direction,
        alpha=config.alpha,
        seed=config.seed,
        max_iter=config.max_iter,
    )
    modules = {
        layer: _module(context.width, context.num_heads, spec, layer, config.alpha, config.position_policy)
        for layer, spec in result.heads.items()
    }
    return FitResult(modules, result.record)


SPEC = register_method(
    MethodSpec(
        name="iti",
        title="Inference-Time Intervention (Li et al., NeurIPS 2023)",
        intervention=ITIIntervention,
        settings_class=ITISettings,
        site="attention_value_output",
        order=2,
        format="iti",
        reads="labeled",
        splits=("train", "eval"),
        fit=_fit,
        strength="alpha",
        bake=_bake,
    )
)
