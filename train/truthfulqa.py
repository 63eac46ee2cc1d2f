"""TruthfulQA multiple choice: questions, HPR's train/eval/test split, seeded splits.

Sources, in the order :func:`load_truthfulqa` tries them:

* a local directory holding ``mc_task.json`` (the original release, the same 817 questions in the
  same order as the Hub's ``truthful_qa``/``multiple_choice`` validation split);
* the Hugging Face Hub dataset ``truthful_qa`` (config ``multiple_choice``, split
  ``validation``), through ``datasets``.

The split file (``hpr_ids_splits.json`` from HPR, or one written by :func:`write_split`) maps
``train``/``eval``/``test`` to 0-based indices into those 817 questions.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

N_QUESTIONS = 817
HPR_SPLIT_FILE = "hpr_ids_splits.json"
SPLIT_NAMES = ("train", "eval", "test")
HUB_ID = "truthful_qa"


@dataclass
class MCQuestion:
    """One TruthfulQA question with its multiple-choice targets.

    Attributes:
        index: position among the 817 questions (the split files' index).
        question: the question text.
        mc1_choices: MC1 choices; exactly one is true, listed first in the release.
        mc1_labels: 1 for the true choice, 0 otherwise.
        mc2_choices: MC2 choices (several true ones, listed first).
        mc2_labels: 1 for true choices, 0 for false ones.
    """

    index: int
    question: str
    mc1_choices: List[str]
    mc1_labels: List[int]
    mc2_choices: List[str]
    mc2_labels: List[int]

    def __post_init__(self) -> None:
        for name in ("mc1", "mc2"):
            choices, labels = getattr(self, f"{name}_choices"), getattr(self, f"{name}_labels")
            if len(choices) != len(labels) or not choices:
                raise ValueError(f"question {self.index}: {name} needs one label per choice and at least one choice.")
            if not any(labels):
                raise ValueError(f"question {self.index}: {name} has no true choice.")
            if all(labels):
                raise ValueError(f"question {self.index}: {name} has no false choice.")
        if sum(self.mc1_labels) != 1:
            raise ValueError(f"question {self.index}: mc1 must have exactly one true choice.")

    @property
    def true_answers(self) -> List[str]:
        return [c for c, y in zip(self.mc2_choices, self.mc2_labels) if y]

    @property
    def false_answers(self) -> List[str]:
        return [c for c, y in zip(self.mc2_choices, self.mc2_labels) if not y]


def _from_records(records: Sequence[dict]) -> List[MCQuestion]:
    questions = []
    for i, rec in enumerate(records):
        q = {}
        for name in ("mc1", "mc2"):
            targets = rec[f"{name}_targets"]
            if isinstance(targets, dict) and "choices" in targets:  # Hub schema
                q[f"{name}_choices"], q[f"{name}_labels"] = list(targets["choices"]), [int(x) for x in targets["labels"]]
            else:  # original release: {choice: label}
                q[f"{name}_choices"], q[f"{name}_labels"] = list(targets), [int(v) for v in targets.values()]
        questions.append(MCQuestion(index=i, question=rec["question"], **q))
    if not questions:
        raise ValueError("the TruthfulQA source holds no questions.")
    return questions


def load_truthfulqa(source: Optional[Union[str, Path]] = None) -> List[MCQuestion]:
    """All TruthfulQA MC questions from a local directory/file or the Hub.

    ``source`` is a directory holding ``mc_task.json``, the file itself, or a Hub dataset id
    (default ``truthful_qa``). When neither works, the error says how to provide the data.
    """
    if source is not None:
        path = Path(str(source)).expanduser()
        if path.is_dir():
            path = path / "mc_task.json"
        if path.is_file():
            with open(path) as handle:
                return _from_records(json.load(handle))
        from actedit.interventions.artifacts import looks_like_local_path

        if looks_like_local_path(str(source), suffixes=(".json",)):
            raise FileNotFoundError(
                f"No TruthfulQA data at {source!r}: expected a directory holding mc_task.json (the original "
                "release) or the file itself."
            )
    hub_id = str(source) if source is not None else HUB_ID
    try:
        from datasets import load_dataset

        data = load_dataset(hub_id, "multiple_choice", split="validation")
    except Exception as exc:
        raise FileNotFoundError(
            f"TruthfulQA could not be loaded from the Hugging Face Hub ({hub_id!r}: {type(exc).__name__}: "
            f"{str(exc)[:200]}). Give a local directory holding mc_task.json instead, e.g. "
            "--data ../shared/data/truthfulqa (the original release from sylinrl/TruthfulQA, data/v0/)."
        ) from exc
    return _from_records(list(data))


def load_split(path: Union[str, Path], n_questions: int = N_QUESTIONS) -> Dict[str, List[int]]:
    """Read a split file (``{"train": [...], "eval": [...], "test": [...]}``) and validate it."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / HPR_SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No split file at {path}. Use HPR's hpr_ids_splits.json or write a seeded split with "
            "actedit.train.truthfulqa.write_split(path, seed=...)."
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


def seeded_split(n_questions: int = N_QUESTIONS, test_ratio: float = 0.5, eval_ratio: float = 0.1,
                 seed: int = 0) -> Dict[str, List[int]]:
    """A random train/eval/test split with HPR's ratios (test 0.5, eval 0.1 of the rest... as counts:
    test = round(n·test_ratio), eval = round(n·eval_ratio·(1 − test_ratio)))."""
    if not (0 < test_ratio < 1 and 0 <= eval_ratio < 1):
        raise ValueError("test_ratio must be in (0, 1) and eval_ratio in [0, 1).")
    order = list(range(n_questions))
    random.Random(seed).shuffle(order)
    n_test = int(round(n_questions * test_ratio))
    n_eval = int(round((n_questions - n_test) * eval_ratio))
    return {"train": order[n_test + n_eval:], "eval": order[n_test:n_test + n_eval], "test": order[:n_test]}


def write_split(path: Union[str, Path], splits: Optional[Dict[str, List[int]]] = None, **kwargs) -> Path:
    """Write a split file in HPR's format (a seeded split from ``kwargs`` if none is given)."""
    splits = splits or seeded_split(**kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(splits))
    os.replace(tmp, path)
    return path


def select(questions: Sequence[MCQuestion], split: str, splits: Optional[Dict[str, List[int]]] = None,
           limit: Optional[int] = None) -> List[MCQuestion]:
    """The questions of ``split`` (``train``/``eval``/``test``/``all``), in split-file order."""
    if split == "all":
        chosen = list(questions)
    else:
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; choose one of train, eval, test, all.")
        if splits is None:
            raise ValueError(f"split {split!r} needs a split file (e.g. {HPR_SPLIT_FILE}).")
        if len(questions) != N_QUESTIONS and max(splits[split], default=-1) >= len(questions):
            raise ValueError(f"the split indexes question {max(splits[split])} but only {len(questions)} are loaded.")
        chosen = [questions[i] for i in splits[split]]
    return chosen[:limit] if limit is not None else chosen


def split_questions(source: Optional[Union[str, Path]] = None, split: str = "all",
                    split_file: Optional[Union[str, Path]] = None, *, limit: Optional[int] = None) -> List[MCQuestion]:
    """The questions of ``split`` (``train``/``eval``/``test``/``all``) from ``source`` (see
    :func:`load_truthfulqa`), in split-file order. ``split_file`` defaults to ``source``'s
    :data:`HPR_SPLIT_FILE` when ``source`` is a directory holding one."""
    questions = load_truthfulqa(source)
    if split == "all":
        return select(questions, "all", limit=limit)
    if split_file is None:
        candidate = Path(str(source)).expanduser() / HPR_SPLIT_FILE if source is not None else None
        if candidate is None or not candidate.is_file():
            raise ValueError(f"split {split!r} needs a split file: give one (--split-file / data.split_file, e.g. "
                             f"HPR's {HPR_SPLIT_FILE}) or a TruthfulQA directory that holds it (--data), or use "
                             "split 'all'.")
        split_file = candidate
    return select(questions, split, load_split(split_file, n_questions=len(questions)), limit=limit)

