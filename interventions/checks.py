"""Input checks of the closed-form fits: activation matrices, layer maps and labels.

Every fit takes in-memory activations keyed by layer, ``{layer: (N, d)}`` (torch tensors or
numpy arrays); these helpers validate them up front so that an empty matrix, NaN/inf values,
mismatched shapes or layer sets and one-class labels raise a :class:`ValueError` naming the
offending input and layer, before any math runs.
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
import torch


def as_float64(x: Any, name: str) -> torch.Tensor:
    """``x`` as a float64 tensor (numpy arrays, memmaps and tensors accepted)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:  # noqa: BLE001 - any conversion failure is a bad input
            raise ValueError(f"{name} is not a numeric array ({type(x).__name__}): {exc}") from None
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must hold numbers, got dtype {t.dtype}.")
    return t.to(torch.float64)


def check_matrix(x: Any, name: str, *, width: Optional[int] = None, rows: Optional[int] = None) -> torch.Tensor:
    """One activation matrix: 2-D, non-empty, finite, optional width / row count; as float64."""
    t = as_float64(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) matrix, got shape {tuple(t.shape)}.")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); collect activations first.")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"{name} has width {t.shape[1]} but {width} was expected.")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows but {rows} were expected (rows must be paired).")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(
            f"{name} contains NaN or inf values in {bad} of {t.shape[0]} rows; "
            "check the collected activations (fp16 overflow?)."
        )
    return t


def check_layer_map(name: str, acts: Any, reference: Optional[Sequence[int]] = None) -> List[int]:
    """A ``{layer: matrix}`` mapping's layers, sorted; with ``reference`` it must hold exactly those."""
    if not isinstance(acts, Mapping):
        raise ValueError(f"{name} must map layer index -> (N, d) activations, got {type(acts).__name__}.")
    if len(acts) == 0:
        raise ValueError(f"{name} holds no layers.")
    layers = []
    for layer in acts:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) < 0:
            raise ValueError(f"{name}: layer keys must be non-negative integers, got {layer!r}.")
        layers.append(int(layer))
    layers.sort()
    if reference is not None and layers != sorted(reference):
        raise ValueError(f"{name} holds layers {layers} but {sorted(reference)} were expected.")
    return layers


def check_labels(labels: Any, n: int, name: str = "labels") -> torch.Tensor:
    """Binary labels (bool or 0/1) of length ``n`` as a bool tensor."""
    t = torch.as_tensor(np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels))
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array with one label per row ({n}), got shape {tuple(t.shape)}.")
    if t.dtype != torch.bool:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf values.")
        values = set(torch.unique(t).tolist())
        if not values <= {0, 1}:
            raise ValueError(f"{name} must be binary (0/1 or bool: 1 = true/positive), got values {sorted(values)}.")
        t = t != 0
    return t


def check_number(
    value: Any, name: str, *, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False
) -> float:
    """A finite real number (not a bool), optionally within [low, high] ((low, high] with ``low_open``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(float(value))
    ):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    value = float(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}.")
    return float(value)


def check_int(value: Any, name: str, *, low: int = 1) -> int:
    """An integer (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return int(value)
