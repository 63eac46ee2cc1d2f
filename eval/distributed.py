"""Multiple-choice scoring split over the processes of a launcher (``torchrun``, ``accelerate launch``).

:func:`score_mc_many_split` is :func:`~actedit.eval.mc.score_mc_many` for N processes: each scores
its contiguous block of the questions (:func:`~actedit.data.distributed.shard_of`), the per-question
records are gathered on every process in the original order and :func:`merge_results` recomputes
the task's metrics and standard errors over all of them. In one process it is
:func:`~actedit.eval.mc.score_mc_many` itself.

Per-question scores equal one process's to float rounding: the scorer runs the prefix shared by
a process's questions once and packs its questions into rows, so a process that holds fewer
questions computes the same sums in other groupings. Metrics that compare scores (MC1, accuracy)
are equal unless two choices tie to that rounding.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, cast

from actedit.data.distributed import all_gather_objects, shard_of, world
from actedit.data.tasks import TaskSpec, task_spec

from .mc import MCResult, record_metrics, score_mc_many


def merge_results(parts: Sequence[MCResult], task: Any) -> MCResult:
    """One :class:`~actedit.eval.mc.MCResult` from the results of consecutive blocks of questions:
    the records concatenated in order, the task's metrics and stderr over all of them, the
    longest block's seconds (the processes ran side by side), the first block's protocol with
    the total number of questions, the shortest shared prefix and the tokens fed by all blocks."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge_results needs at least one result.")
    spec: TaskSpec = task if isinstance(task, TaskSpec) else task_spec(task)
    records = [record for part in parts for record in part.records]
    metrics, stderr = record_metrics(spec, records)
    protocol = dict(parts[0].protocol)
    protocol["n_questions"] = len(records)
    prefixes = [p.protocol.get("shared_prefix_tokens") for p in parts]
    known = [x for x in prefixes if isinstance(x, int)]
    if known and len(known) == len(prefixes):
        protocol["shared_prefix_tokens"] = min(known)
    fed = [p.protocol.get("tokens_fed") for p in parts]
    if all(isinstance(x, int) for x in fed):
        protocol["tokens_fed"] = sum(cast(int, x) for x in fed)
    if len(parts) > 1:
        protocol["processes"] = len(parts)
    return MCResult(
        task=parts[0].task,
        records=records,
        metrics=metrics,
        stderr=stderr,
        seconds=max(p.seconds for p in parts),
        protocol=protocol,
    )


def score_mc_many_split(
    models: Dict[str, Any], tokenizer, questions: Sequence, *, task: Any = "truthfulqa", **kwargs: Any
) -> Dict[str, MCResult]:
    """:func:`~actedit.eval.mc.score_mc_many` with the questions split over the launched processes;
    every process returns the results over all questions (same arguments as ``score_mc_many``).
    Every process must call it, with the same questions; a process left without questions (more
    processes than questions) scores nothing and waits."""
    w = world()
    questions = list(questions)
    if not w.distributed:
        return score_mc_many(models, tokenizer, questions, task=task, **kwargs)
    if not questions:
        raise ValueError("scoring needs at least one question.")
    block = shard_of(len(questions), w)
    mine: Optional[Dict[str, MCResult]] = None
    if len(block):
        if not w.is_main:
            kwargs = {**kwargs, "progress": False}
        mine = score_mc_many(models, tokenizer, questions[block.start : block.stop], task=task, **kwargs)
    parts: List[Optional[Dict[str, MCResult]]] = all_gather_objects(mine)
    scored = [p for p in parts if p is not None]
    return {name: merge_results([p[name] for p in scored], task) for name in models}


__all__ = ["merge_results", "score_mc_many_split"]
