"""actedit: activation editing for causal language models as pyvene interventions.

The one-call API (:mod:`actedit.api`)::

    import actedit
    pvm = actedit.fit("caa", model, tokenizer, pairs, layers=[12], multiplier=4.0)
    actedit.save(pvm, "caa-edit")

The layers, from the bottom: :mod:`actedit.interventions` (the methods, positions, packing,
pyvene/transformers fixes, artifacts) ← :mod:`actedit.train` (data, tasks, collection, fits and
training) ← :mod:`actedit.eval` (scoring, analyses) ← :mod:`actedit.study` and
:mod:`actedit.cli`. This package's own module, :mod:`actedit.api`, sits on :mod:`actedit.train`.
"""

from actedit import interventions  # first: pyvene is imported quietly and the methods are registered
from actedit.api import compose, fit, load, save  # noqa: E402
from actedit.interventions.registry import method_names, method_spec, methods  # noqa: E402
from actedit.train.models import load_model  # noqa: E402

__all__ = ["compose", "fit", "interventions", "load", "load_model", "method_names", "method_spec", "methods", "save"]
