"""actedit.data: contrast data, tasks, prompt formats, models, activation collection and stores.

Importing it registers the tasks (:mod:`actedit.data.tasks`): TruthfulQA, BBQ, SEQ, ToxiGen.
"""

from actedit import interventions as _interventions  # noqa: F401  (pyvene imported quietly, methods registered)

from . import bbq, seq, toxigen, truthfulqa  # noqa: E402,F401  (each registers its task)
