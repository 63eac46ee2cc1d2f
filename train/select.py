"""Layer selection: a score per layer on an eval split (probe accuracy, or the eval loss of a
method without a probe), the top-k layers, metadata.

HPR trains a module for every layer and enables the k layers whose probe separates the eval
pairs best (the README's example: k = 5). For a module with a linear probe w (no bias), the
accuracy of layer l on n eval pairs is

    acc_l = (1 / 2n) Σ_i ( [w_l·h⁺_i > 0] + [w_l·h⁻_i ≤ 0] ),

i.e. ``probe_logits > 0`` compared with the labels [1; 0] of X = [h⁺; h⁻]. The top-k layers
are those with the highest accuracy (ties: the lower layer first). The selection is recorded in
the artifact metadata under ``layer_selection`` (layer keys as strings, the form JSON keeps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch

from actedit.data.store import PairedActivations

METRICS = {"probe_accuracy": True, "eval_loss": False, "fixed": True}
"""The selection scores (:data:`actedit.interventions.registry.SELECTIONS`) → whether higher is better."""


@dataclass
class LayerSelection:
    """The layers a trained method enables, chosen by a score per layer.

    Attributes:
        scores: layer → score: eval probe accuracy in [0, 1] (``probe_accuracy``, higher is
            better) or the selecting term's mean eval loss (``eval_loss``, lower is better); with
            ``fixed`` selection it may be empty.
        k: the number of layers asked for (the selection holds min(k, number of layers)).
        metric: the score's name, a key of :data:`METRICS`.
        selected: the chosen layers, ascending (filled from ``scores`` and ``k`` when empty).
        ranking: every layer, best first (filled when empty).
        num_pairs: eval pairs the scores were measured on (None if unknown).
    """

    scores: Dict[int, float]
    k: int = 5
    metric: str = "probe_accuracy"
    selected: List[int] = field(default_factory=list)
    ranking: List[int] = field(default_factory=list)
    num_pairs: Optional[int] = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}.")
        if not isinstance(self.scores, Mapping) or (not self.scores and self.metric != "fixed"):
            raise ValueError(f"scores must map at least one layer to its {self.metric}.")
        clean = {}
        for layer, score in self.scores.items():
            try:
                layer_i = int(layer)
            except (TypeError, ValueError):
                raise ValueError(f"layer keys must be integers, got {layer!r}.") from None
            score = float(score)
            if not math.isfinite(score) or (self.metric == "probe_accuracy" and not 0.0 <= score <= 1.0):
                bound = " in [0, 1]" if self.metric == "probe_accuracy" else ""
                raise ValueError(f"layer {layer}: {self.metric} must be a finite number{bound}, got {score}.")
            clean[layer_i] = score
        self.scores = dict(sorted(clean.items()))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}.")
        if not self.ranking:
            self.ranking = rank_layers(self.scores, higher_is_better=METRICS[self.metric])
        if not self.selected:
            if self.metric == "fixed":
                raise ValueError("a fixed selection lists its layers in selected.")
            self.selected = sorted(self.ranking[: self.k])
        self.selected = sorted(int(layer) for layer in self.selected)
        unknown = [layer for layer in self.selected if self.scores and layer not in self.scores]
        if unknown:
            raise ValueError(f"selected layers {unknown} have no {self.metric}.")

    @property
    def accuracy(self) -> Dict[int, float]:
        """The eval probe accuracy per layer (a ``probe_accuracy`` selection's scores)."""
        if self.metric != "probe_accuracy":
            raise ValueError(f"this selection scored layers by {self.metric}, not probe accuracy; read scores.")
        return self.scores

    def metadata(self) -> Dict[str, Any]:
        """``{"layer_selection": {...}}`` to merge into an artifact's ``actedit`` metadata
        (``save_artifact(pvm, dir, **selection.metadata())`` or ``config.actedit.update(...)``);
        a probe-accuracy selection also writes its scores under ``accuracy``, as before."""
        scores = {str(layer): round(score, 6) for layer, score in self.scores.items()}
        info: Dict[str, Any] = {
            "metric": self.metric,
            "k": self.k,
            "scores": scores,
            "selected": list(self.selected),
            "ranking": list(self.ranking),
        }
        if self.metric == "probe_accuracy":
            info["accuracy"] = scores
        if self.num_pairs is not None:
            info["num_pairs"] = int(self.num_pairs)
        return {"layer_selection": info}

    @classmethod
    def from_metadata(cls, info: Mapping[str, Any]) -> "LayerSelection":
        """Read a selection back from artifact metadata (the dict :meth:`metadata` returned, or
        its ``layer_selection`` value; artifacts of earlier releases hold ``accuracy`` only)."""
        info = info.get("layer_selection", info)
        scores = info.get("scores", info.get("accuracy", {}))
        return cls(
            scores={int(k): v for k, v in scores.items()},
            k=int(info["k"]),
            metric=info.get("metric", "probe_accuracy"),
            selected=[int(x) for x in info["selected"]],
            ranking=[int(x) for x in info.get("ranking", [])],
            num_pairs=info.get("num_pairs"),
        )


def rank_layers(scores: Mapping[int, float], *, higher_is_better: bool = True) -> List[int]:
    """Layers by score, best first; ties broken by the lower layer index."""
    sign = -1.0 if higher_is_better else 1.0
    return [layer for layer, _ in sorted(scores.items(), key=lambda kv: (sign * float(kv[1]), int(kv[0])))]


def select_top_layers(accuracy: Mapping[int, float], k: int = 5) -> List[int]:
    """The (at most) k best layers by accuracy, returned in ascending layer order."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if not accuracy:
        raise ValueError("no layer accuracies to select from.")
    return sorted(rank_layers(accuracy)[:k])


@torch.no_grad()
def probe_accuracy(
    modules: Mapping[int, torch.nn.Module], data: PairedActivations, *, batch_size: int = 4096
) -> Dict[int, float]:
    """Eval probe accuracy of each layer's module: ``probe_logits(h) > 0`` against [1 for h⁺; 0 for h⁻].

    Args:
        modules: layer → module with a ``probe_logits(h)`` method (e.g. a trained HPR module).
        data: eval pairs holding every layer of ``modules``.
        batch_size: pairs per chunk.
    """
    layers = _checked_layers(modules, data, "probe_logits", "")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    n = data.num_pairs
    correct = dict.fromkeys(layers, 0)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        for layer in layers:
            module: Any = modules[layer]  # has probe_logits (checked above)
            param = next(module.parameters())
            hp, hn = data.gather([layer], idx, device=param.device, dtype=param.dtype)
            correct[layer] += int((module.probe_logits(hp[0]) > 0).sum()) + int((module.probe_logits(hn[0]) <= 0).sum())
    return {layer: correct[layer] / (2 * n) for layer in layers}


@torch.no_grad()
def eval_losses(
    modules: Mapping[int, torch.nn.Module], data: PairedActivations, loss_method: str, *, batch_size: int = 4096
) -> Dict[int, float]:
    """Mean loss ``module.<loss_method>(h⁺, h⁻)`` of each layer's module over the eval pairs
    (each chunk's mean weighted by its pairs)."""
    layers = _checked_layers(modules, data, loss_method, "(h_pos, h_neg)")
    n = data.num_pairs
    total = dict.fromkeys(layers, 0.0)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        for layer in layers:
            module: Any = modules[layer]
            param = next(module.parameters())
            hp, hn = data.gather([layer], idx, device=param.device, dtype=param.dtype)
            total[layer] += float(getattr(module, loss_method)(hp[0], hn[0])) * len(idx)
    return {layer: total[layer] / n for layer in layers}


def _checked_layers(modules: Mapping[int, torch.nn.Module], data: Any, method: str, args: str) -> List[int]:
    if not isinstance(data, PairedActivations):
        raise ValueError(f"data must be PairedActivations, got {type(data).__name__}.")
    if not isinstance(modules, Mapping) or not modules:
        raise ValueError(f"modules must map at least one layer to a module with {method}.")
    layers = sorted(int(layer) for layer in modules)
    missing = [layer for layer in layers if layer not in data.positive]
    if missing:
        raise ValueError(f"the eval activations hold no layers {missing} (they hold {data.layers}).")
    for layer in layers:
        if not callable(getattr(modules[layer], method, None)):
            raise ValueError(f"layer {layer}: {type(modules[layer]).__name__} has no {method}{args} method.")
    return layers


def select_layers(
    modules: Mapping[int, torch.nn.Module],
    eval_data: Optional[PairedActivations],
    *,
    k: int = 5,
    metric: str = "probe_accuracy",
    loss_method: str = "loss",
) -> LayerSelection:
    """Score each layer on the eval pairs and keep the best k (default 5, HPR's README):
    ``probe_accuracy`` (:func:`probe_accuracy`), ``eval_loss`` (:func:`eval_losses` of
    ``loss_method``, lowest first), or ``fixed`` (every layer, with its eval loss recorded when
    there is eval data). The evaluation layer plots it (:func:`actedit.eval.plots.plot_layer_accuracy`)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}.")
    num_pairs = eval_data.num_pairs if isinstance(eval_data, PairedActivations) else None
    if metric == "fixed":
        scores = eval_losses(modules, eval_data, loss_method) if eval_data is not None else {}
        return LayerSelection(
            scores=scores, k=len(modules), metric=metric, selected=sorted(modules), num_pairs=num_pairs
        )
    if eval_data is None:
        raise ValueError(f"selecting layers by {metric} needs eval data (PairedActivations).")
    scores = (
        probe_accuracy(modules, eval_data)
        if metric == "probe_accuracy"
        else eval_losses(modules, eval_data, loss_method)
    )
    return LayerSelection(scores=scores, k=k, metric=metric, num_pairs=num_pairs)


__all__ = [
    "LayerSelection",
    "METRICS",
    "eval_losses",
    "probe_accuracy",
    "rank_layers",
    "select_layers",
    "select_top_layers",
]
