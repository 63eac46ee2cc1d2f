"""actedit.train: datasets, prompt formats, activation collection, closed-form fits, HPR training, layer selection."""

from actedit import interventions as _interventions  # noqa: F401  (pyvene imported quietly, fixes applied)
