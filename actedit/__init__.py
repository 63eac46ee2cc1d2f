"""actedit: activation editing for causal language models as pyvene interventions.

The one-call API (:mod:`actedit.train.api`)::

    import actedit
    pvm = actedit.fit("caa", model, tokenizer, pairs, layers=[12], strength=1.0)
    print(actedit.measure_effect(pvm, tokenizer).table())  # warns on a no-op or a broken model
    actedit.save(pvm, "caa-edit")

The layers, one folder each, from the bottom: :mod:`actedit.interventions` (core: the methods,
positions, packing, pyvene/transformers fixes, artifacts) ← :mod:`actedit.data` (data, tasks,
prompt formats, models, collection, stores) ← :mod:`actedit.train` (fits, training, layer
selection, the one-call API) ← :mod:`actedit.eval` (scoring, analyses, plots) ←
:mod:`actedit.export` (checkpoints for other engines) ← :mod:`actedit.study` ← :mod:`actedit.cli`.

This package imports nothing itself: its names resolve on first use, so that importing an
intervention (what stock ``pyvene.IntervenableModel.load`` does to rebuild an edit) loads the
core only.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "compose": "actedit.train.api",
    "fit": "actedit.train.api",
    "load": "actedit.train.api",
    "save": "actedit.train.api",
    "load_model": "actedit.data.models",
    "measure_effect": "actedit.eval.effect",
    "method_names": "actedit.interventions.registry",
    "method_spec": "actedit.interventions.registry",
    "methods": "actedit.interventions.registry",
    "sweep": "actedit.study.sweep",
}
"""Public name → the module that defines it."""

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'actedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
