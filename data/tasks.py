"""The task registry: one :class:`TaskSpec` per multiple-choice evaluation task, found by its name.

A task says how to load its questions and splits, how a question becomes a context and choices
(lm-eval's ``multiple_choice`` protocol: each choice is a continuation of the context, scored by
the sum of its tokens' log-probabilities), which choices are correct and which metrics it
reports, and how its questions become contrast data to fit edits on. The scorer
(:mod:`actedit.eval.mc`), the study, ``actedit eval`` and the one-call API take any registered
task by name. Each task lives in its own module and registers itself once
(:mod:`actedit.data.truthfulqa`, :mod:`~actedit.data.bbq`, :mod:`~actedit.data.seq`,
:mod:`~actedit.data.toxigen`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import numpy as np

from actedit.interventions.settings import Settings

from .contrast import ContrastDataset, PromptPairDataset, load_contrast_file


@dataclass(frozen=True)
class MCItem:
    """One question as the scorer sees it.

    Attributes:
        index: the question's identity in its task (TruthfulQA: 0..816).
        context: the text every choice continues.
        choices: the distinct continuations scored (the task's target delimiter included).
    """

    index: int
    context: str
    choices: Tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    """Everything the scorer and the study need to know about one task.

    Attributes:
        name: the task's name (``truthfulqa``), as in configs (``eval.task``) and ``--task``.
        title: its full name and protocol, for reports.
        metrics: the metrics it reports, the first being the one prediction flips count on.
        settings: its options (a :class:`~actedit.interventions.settings.Settings` subclass;
            ``eval.task_options`` in a study).
        load: ``load(source, split, split_file, limit) -> records`` (the task's own question
            objects), in split order; ``split`` is ``train``, ``eval``, ``test`` or ``all``.
        item: ``item(record, settings) -> MCItem``.
        score: ``score(record, item, scores, settings) -> {metric: value}`` for one question,
            ``scores`` the summed log-probability of each of ``item.choices``.
        contrast: ``contrast(source, split_file, limit) -> ContrastDataset``: contrast examples
            to fit edits on, with ``train``/``eval`` split metadata.
        protocol: ``protocol(settings) -> dict``: what was computed, recorded with every score.
        text: ``text(record) -> str``: the question's own text (no few-shot primer), e.g. for
            norm measurements on in-domain text.
    """

    name: str
    title: str
    metrics: Tuple[str, ...]
    settings: Type[Settings]
    load: Callable[..., List[Any]]
    item: Callable[[Any, Any], MCItem]
    score: Callable[[Any, MCItem, Sequence[float], Any], Dict[str, float]]
    contrast: Callable[..., ContrastDataset]
    protocol: Callable[[Any], Dict[str, Any]]
    text: Callable[[Any], str]
    aliases: Tuple[str, ...] = ()
    """Other names the task answers to (configs written for earlier releases)."""
    splits: Optional[Callable[..., Dict[str, List[int]]]] = None
    """``splits(source, split_file) -> {"train": [...], "eval": [...], "test": [...]}``: the
    question indices of each split (saved next to a study's results); None where the task has no
    train/eval/test split of its own."""
    split_rule: Optional[Callable[[Any], str]] = None
    """``split_rule(split_file) -> str``: how the splits were made, in words (for reports)."""
    group: Optional[Callable[[Any], str]] = None
    """``group(record) -> str``: the subset a question belongs to where the task's own analysis
    reports metrics per subset (BBQ: ambiguous or disambiguated context)."""
    baselines: Optional[Callable[[Sequence[Any]], Dict[str, Dict[str, float]]]] = None
    """``baselines(records) -> {name: {metric: value}}``: what answering without a model scores on
    these questions (chance, always the first choice, ...), printed beside a study's scores."""

    def options(self, values: Optional[Dict[str, Any]] = None, where: str = "", **extra):
        """This task's settings from a mapping and keywords (unknown keys are errors)."""
        return self.settings.from_mapping(values, where or f"{self.name} options", **extra)


_TASKS: Dict[str, TaskSpec] = {}
_ALIASES: Dict[str, str] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task (once per name; registering the same spec again is a no-op)."""
    existing = _TASKS.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"a task named {spec.name!r} is already registered.")
    _TASKS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def task_names() -> List[str]:
    return sorted(_TASKS)


def _normal(name) -> str:
    """A task or loader name as keyed here: case-insensitive, ``-`` or ``_``."""
    return str(name).strip().lower().replace("-", "_")


def _task_key(name) -> str:
    """The task key ``name`` stands for (aliases resolved)."""
    key = _normal(name)
    return _ALIASES.get(key, key)


def task_spec(name: str) -> TaskSpec:
    """The spec of a task name (case-insensitive, ``-`` or ``_``), with a clear error for unknown names."""
    key = _task_key(name)
    if key not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}.")
    return _TASKS[key]


def is_task(name) -> bool:
    """Whether ``name`` is a registered task or one of its aliases."""
    return _task_key(name) in _TASKS


def contrast_names() -> List[str]:
    """Every name :func:`load_contrast` resolves without a file: tasks and their aliases."""
    return sorted(set(_TASKS) | set(_ALIASES))


def is_contrast_name(name) -> bool:
    """Whether :func:`load_contrast` reads ``name`` as a task (not a file)."""
    return is_task(name)


SPLIT_NAMES = ("train", "eval", "test")


def read_split_file(path, n_questions: int) -> Dict[str, List[int]]:
    """A split file (``{"train": [...], "eval": [...], "test": [...]}`` of 0-based question
    indices, disjoint, each below ``n_questions``), validated; errors name the file and the index."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"No split file at {path}: give a JSON object mapping train, eval and test to 0-based question indices."
        )
    with open(path) as handle:
        splits = json.load(handle)
    missing = [s for s in SPLIT_NAMES if s not in splits]
    if missing:
        raise ValueError(f"split file {path} lacks the splits {missing}; it needs train, eval and test.")
    seen: Dict[int, str] = {}
    for name in SPLIT_NAMES:
        for idx in splits[name]:
            if not isinstance(idx, int) or not 0 <= idx < n_questions:
                raise ValueError(f"split file {path}: index {idx!r} in '{name}' is out of range 0..{n_questions - 1}.")
            if idx in seen:
                raise ValueError(f"split file {path}: question {idx} is in both '{seen[idx]}' and '{name}'.")
            seen[idx] = name
    return {name: list(splits[name]) for name in SPLIT_NAMES}


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's standard error of a mean: sample std (ddof=1) / sqrt(n); NaN for n < 2."""
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        return float("nan")
    return float(array.std(ddof=1) / math.sqrt(array.size))


def load_contrast(name, *, source=None, split_file=None, limit: Optional[int] = None):
    """Contrast data (or ActAdd prompt pairs) by name or path.

    A registered task (or one of its aliases) gives its ``contrast`` data (``limit`` questions per
    split, ``source`` and ``split_file`` where its questions are); anything else is a JSONL file,
    of which ``limit`` keeps the first examples.
    """
    text = str(name)
    task = _TASKS.get(_task_key(text))
    if task is not None:
        return task.contrast(source=source, split_file=split_file, limit=limit)
    dataset: Union[ContrastDataset, PromptPairDataset] = load_contrast_file(text, known=contrast_names())
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


__all__ = [
    "MCItem",
    "TaskSpec",
    "contrast_names",
    "is_contrast_name",
    "is_task",
    "load_contrast",
    "mean_stderr",
    "read_split_file",
    "register_task",
    "task_names",
    "task_spec",
]
