"""actedit.train: from activations to an edit: closed-form fits and training (the trainer, its
LM-loss objective), layer selection, the pipeline behind ``actedit collect/fit/train``, and the
one-call API (:mod:`actedit.train.api`)."""

from actedit import interventions as _interventions  # noqa: F401  (pyvene imported quietly, methods registered)
