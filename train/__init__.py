"""actedit.train: data, tasks, prompt formats, activation collection and stores, fits and training.

Importing it registers the tasks (:mod:`actedit.train.tasks`): TruthfulQA.
"""

from actedit import interventions as _interventions  # noqa: F401  (pyvene imported quietly, methods registered)

from . import truthfulqa  # noqa: E402,F401  (registers the task)
