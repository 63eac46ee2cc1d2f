"""Layer specs: which decoder layers a setting means, absolute or relative to the model's depth.

A config written for one model (SmolLM2's 30 layers) should run unchanged on another depth, and
a spec that cannot fit the model must fail before any work starts. A *layer spec* is one of:

* an integer, ``0`` the first layer; a negative integer counts from the end (``-1`` = the last);
* a fraction of the depth, ``0.4`` or ``"2/5"``: layer ``round(f · L)`` (halves up) of a model with
  L layers (``0.4`` is layer 12 of 30 and 13 of 32: CAA's choice for Llama-2-7B);
* a slice ``"a:b"`` (``b`` excluded; either end may be omitted, negative, or a fraction):
  ``"-20:"`` the last 20 layers, ``"1/3:"`` the last two thirds (10–29 of 30, 11–31 of 32: SEA's
  official 21 of 32);
* an inclusive range ``"10-29"`` of absolute indices;
* ``"all"``; or a list of integers and fractions.

:func:`check_layer_spec` checks the syntax alone (when a config is read, before a model is
loaded); :func:`resolve_layers` / :func:`resolve_layer` turn a spec into sorted layer indices for
a depth and raise an error naming the depth when the spec does not fit.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, List, Optional, Tuple, TypeGuard, Union

LayerSpec = Union[int, float, str, List[Union[int, float, str]]]

_HELP = (
    "a layer spec is an index (negative counts from the end), a fraction of the depth (0.4, '2/5'), "
    "a slice 'a:b' ('-20:', '1/3:'), an inclusive range '10-29', 'all', or a list of indices"
)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _fraction(value: Any) -> Optional[Fraction]:
    """A depth fraction in [0, 1] given as a float or a string ('0.4', '2/5'), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        f = Fraction(value).limit_denominator(10_000)
    elif isinstance(value, str) and any(c in value for c in "./"):
        try:
            f = Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            return None
    else:
        return None
    return f if 0 <= f <= 1 else None


def _index(part: Any, n_layers: int, where: str, spec: Any, *, end: bool = False) -> int:
    """One position of a spec for a model of ``n_layers`` layers (slice ends may reach n_layers)."""
    if _is_int(part):
        index = part + n_layers if part < 0 else part
    elif isinstance(part, str) and part.strip().lstrip("-").isdigit():
        return _index(int(part.strip()), n_layers, where, spec, end=end)
    else:
        f = _fraction(part)
        if f is None:
            raise ValueError(
                f"{where}: {part!r} in layer spec {spec!r} is not a layer index or a depth fraction; {_HELP}."
            )
        index = math.floor(f * n_layers + Fraction(1, 2))
    limit = n_layers if end else n_layers - 1
    if not 0 <= index <= limit:
        raise ValueError(
            f"{where}: layer spec {spec!r} does not fit the model: it has {n_layers} layers "
            f"(0..{n_layers - 1}), and {part!r} is out of range. Use indices below {n_layers}, "
            "or a depth-relative spec (negative indices such as '-20:', or fractions such as '1/3:')."
        )
    return int(index)


def _slice_bounds(spec: str, n_layers: int, where: str) -> Tuple[int, int]:
    """``(start, stop)`` of a slice spec ``"a:b"`` on a model of ``n_layers`` layers (not empty)."""
    lo, _, hi = spec.partition(":")
    start = _index(lo, n_layers, where, spec, end=True) if lo.strip() else 0
    stop = _index(hi, n_layers, where, spec, end=True) if hi.strip() else n_layers
    if start >= stop:
        raise ValueError(f"{where}: layer spec {spec!r} selects no layer of this {n_layers}-layer model.")
    return start, stop


def _is_all(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip().lower() == "all"


def resolve_layers(spec: LayerSpec, n_layers: int, where: str = "layers") -> List[int]:
    """The sorted, distinct layer indices ``spec`` means on a model of ``n_layers`` layers."""
    if not _is_int(n_layers) or n_layers < 1:
        raise ValueError(f"the model's depth must be a positive integer, got {n_layers!r}.")
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"{where}: the layer list is empty; {_HELP}.")
        layers = [_index(part, n_layers, where, spec) for part in spec]
    elif _is_all(spec):
        layers = list(range(n_layers))
    elif isinstance(spec, str) and ":" in spec:
        layers = list(range(*_slice_bounds(spec, n_layers, where)))
    elif isinstance(spec, str) and spec.count("-") == 1 and not spec.strip().startswith("-"):
        lo, _, hi = spec.partition("-")
        if not (lo.strip().isdigit() and hi.strip().isdigit()) or int(lo) > int(hi):
            raise ValueError(f"{where}: {spec!r} is not a layer range like '10-29'; {_HELP}.")
        layers = [_index(i, n_layers, where, spec) for i in range(int(lo), int(hi) + 1)]
    else:
        layers = [_index(spec, n_layers, where, spec)]
    if len(set(layers)) != len(layers):
        raise ValueError(
            f"{where}: layer spec {spec!r} names layer(s) "
            f"{sorted({x for x in layers if layers.count(x) > 1})} more than once on this "
            f"{n_layers}-layer model."
        )
    return sorted(layers)


def resolve_layer(spec: LayerSpec, n_layers: int, where: str = "layer") -> int:
    """The one layer index ``spec`` means (an index or a fraction; not a list or a slice)."""
    if isinstance(spec, (list, tuple)) or _is_all(spec) or (isinstance(spec, str) and ":" in spec):
        raise ValueError(f"{where} takes one layer (an index or a depth fraction), got {spec!r}.")
    layers = resolve_layers(spec, n_layers, where)
    if len(layers) != 1:
        raise ValueError(f"{where} takes one layer, got {spec!r} ({len(layers)} layers).")
    return layers[0]


def check_layer_spec(spec: Optional[LayerSpec], where: str = "layers", single: bool = False) -> None:
    """Check the syntax of a layer spec without knowing the depth (None passes)."""
    if spec is None:
        return
    depth = 10**6  # large enough that every syntactically valid spec fits
    if single:
        resolve_layer(spec, depth, where)
    elif _is_all(spec):
        return
    elif isinstance(spec, str) and ":" in spec:
        _slice_bounds(spec, depth, where)  # its ends alone: no list of a million layers
    else:
        resolve_layers(spec, depth, where)


def model_depth(model: Any) -> int:
    """The number of decoder layers of a transformers model (``config.num_hidden_layers``)."""
    config = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if _is_int(value) and value > 0:
            return value
    raise ValueError(f"cannot tell how many layers {type(model).__name__} has (no config.num_hidden_layers).")
