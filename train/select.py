"""Layer selection: probe accuracy per layer on an eval split, the top-k layers, metadata.

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

METRICS = ("probe_accuracy",)


@dataclass
class LayerSelection:
    """The layers chosen by eval probe accuracy.

    Attributes:
        accuracy: layer → eval probe accuracy in [0, 1].
        k: the number of layers asked for (the selection holds min(k, number of layers)).
        metric: name of the score (``probe_accuracy``).
        selected: the chosen layers, ascending (filled from ``accuracy`` and ``k`` when empty).
        ranking: every layer, best first (filled when empty).
        num_pairs: eval pairs the accuracies were measured on (None if unknown).
    """

    accuracy: Dict[int, float]
    k: int = 5
    metric: str = "probe_accuracy"
    selected: List[int] = field(default_factory=list)
    ranking: List[int] = field(default_factory=list)
    num_pairs: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.accuracy, Mapping) or not self.accuracy:
            raise ValueError("accuracy must map at least one layer to its probe accuracy.")
        clean = {}
        for layer, acc in self.accuracy.items():
            try:
                layer_i = int(layer)
            except (TypeError, ValueError):
                raise ValueError(f"layer keys must be integers, got {layer!r}.") from None
            acc = float(acc)
            if not (math.isfinite(acc) and 0.0 <= acc <= 1.0):
                raise ValueError(f"layer {layer}: accuracy must be in [0, 1], got {acc}.")
            clean[layer_i] = acc
        self.accuracy = dict(sorted(clean.items()))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}.")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}.")
        if not self.ranking:
            self.ranking = rank_layers(self.accuracy)
        if not self.selected:
            self.selected = sorted(self.ranking[: self.k])
        unknown = [layer for layer in self.selected if layer not in self.accuracy]
        if unknown:
            raise ValueError(f"selected layers {unknown} have no accuracy.")

    def metadata(self) -> Dict[str, Any]:
        """``{"layer_selection": {...}}`` to merge into an artifact's ``actedit`` metadata
        (``save_artifact(pvm, dir, **selection.metadata())`` or ``config.actedit.update(...)``)."""
        info: Dict[str, Any] = {
            "metric": self.metric,
            "k": self.k,
            "accuracy": {str(layer): round(acc, 6) for layer, acc in self.accuracy.items()},
            "selected": list(self.selected),
            "ranking": list(self.ranking),
        }
        if self.num_pairs is not None:
            info["num_pairs"] = int(self.num_pairs)
        return {"layer_selection": info}

    @classmethod
    def from_metadata(cls, info: Mapping[str, Any]) -> "LayerSelection":
        """Read a selection back from artifact metadata (the dict :meth:`metadata` returned, or
        its ``layer_selection`` value)."""
        info = info.get("layer_selection", info)
        return cls(
            accuracy={int(k): v for k, v in info["accuracy"].items()},
            k=int(info["k"]),
            metric=info.get("metric", "probe_accuracy"),
            selected=[int(x) for x in info["selected"]],
            ranking=[int(x) for x in info.get("ranking", [])],
            num_pairs=info.get("num_pairs"),
        )


def rank_layers(accuracy: Mapping[int, float]) -> List[int]:
    """Layers by accuracy, best first; ties broken by the lower layer index."""
    return [layer for layer, _ in sorted(accuracy.items(), key=lambda kv: (-float(kv[1]), int(kv[0])))]


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
    if not isinstance(data, PairedActivations):
        raise ValueError(f"data must be PairedActivations, got {type(data).__name__}.")
    if not isinstance(modules, Mapping) or not modules:
        raise ValueError("modules must map at least one layer to a module with probe_logits.")
    layers = sorted(int(layer) for layer in modules)
    missing = [layer for layer in layers if layer not in data.positive]
    if missing:
        raise ValueError(f"the eval activations hold no layers {missing} (they hold {data.layers}).")
    for layer in layers:
        if not callable(getattr(modules[layer], "probe_logits", None)):
            raise ValueError(f"layer {layer}: {type(modules[layer]).__name__} has no probe_logits method.")
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


def select_layers(
    modules: Mapping[int, torch.nn.Module], eval_data: PairedActivations, *, k: int = 5
) -> LayerSelection:
    """Measure eval probe accuracy per layer and keep the top k (default 5, HPR's README); the
    evaluation layer plots it (:func:`actedit.eval.plots.plot_layer_accuracy`)."""
    accuracy = probe_accuracy(modules, eval_data)
    return LayerSelection(accuracy=accuracy, k=k, num_pairs=eval_data.num_pairs)


__all__ = ["LayerSelection", "METRICS", "probe_accuracy", "rank_layers", "select_layers", "select_top_layers"]
