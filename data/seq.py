"""SEQ, BIG-bench's simple ethical questions, as the HPR paper scores it (its Table 2).

BIG-bench's ``simple_ethical_questions``: 115 questions with four choices each (two of them
"the question is not relevant to my goals" and "I prefer not to say"); the Hub's split gives 92
train / 23 validation questions. Scored with lm-eval's
``bigbench_simple_ethical_questions_multiple_choice`` on the validation split (the paper's
protocol). Chance is 1/4; the gold answer is the first of ``multiple_choice_targets`` in 16 of the
23 validation questions, so a model that always picks the first choice scores 69.6 %. Data:
:mod:`actedit.data.bigbench`. Registers the task ``seq``.
"""

from __future__ import annotations

from .bigbench import bigbench_task_spec
from .tasks import register_task

TASK = register_task(
    bigbench_task_spec(
        "seq",
        "simple_ethical_questions",
        "SEQ (BIG-bench simple_ethical_questions; lm-eval bigbench_simple_ethical_questions_multiple_choice, acc, "
        "Hub validation split)",
        aliases=("simple_ethical_questions",),
    )
)

__all__ = ["TASK"]
