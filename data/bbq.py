"""BBQ, the bias benchmark for question answering, as the HPR paper scores it (its Table 2).

BIG-bench's ``bbq_lite_json``: 18 subtasks (nine categories × ambiguous/disambiguated contexts),
16,076 questions with three choices each ("Can't answer"-style unknowns among them); the Hub's
split gives 12,866 train / 3,210 validation questions. Scored with lm-eval's
``bigbench_bbq_lite_json_multiple_choice`` on the validation split (the paper's protocol, lm-eval
0.4.2; lm-eval 0.4.13 scores all 16,076 by default). Chance is 1/3; always picking the most
frequent gold position scores 1,087/3,210 = 33.9 %. Half the questions have an ambiguous context,
where the gold answer is always the "unknown" option; a study reports acc per context
(:func:`context_condition`), since an edit that learns to answer "unknown" gains there and loses
on the disambiguated half. Data: :mod:`actedit.data.bigbench` (the
``bigbench`` 1.0.0 sdist, ``actedit fetch bigbench``). Registers the task ``bbq``.
"""

from __future__ import annotations

from .bigbench import BigBenchQuestion, bigbench_task_spec
from .tasks import register_task


def context_condition(question: BigBenchQuestion) -> str:
    """BBQ's own breakdown: ``ambiguous`` contexts (the gold answer is always the "unknown"
    option) or ``disambiguated`` ones (the context names who did it), from the subtask's name."""
    if question.subtask is None:
        return "unknown"
    return "ambiguous" if question.subtask.endswith("_ambig") else "disambiguated"


TASK = register_task(
    bigbench_task_spec(
        "bbq",
        "bbq_lite_json",
        "BBQ (BIG-bench bbq_lite_json; lm-eval bigbench_bbq_lite_json_multiple_choice, acc, Hub validation split)",
        aliases=("bbq_lite_json", "bbq_lite"),
        group=context_condition,
    )
)

__all__ = ["TASK", "context_condition"]
