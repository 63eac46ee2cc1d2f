"""Contrast datasets: the typed data model every fitting method reads, and its loaders.

Data model
----------
* :class:`ContrastExample` — one prompt with desirable (``positives``) and undesirable
  (``negatives``) responses, optional ``bases`` (the model's own completions, SEA's third matrix)
  and free ``metadata`` (``id``, ``split``, source fields). Every (positive, negative) pair of an
  example is one training pair for HPR and CAA.
* :class:`ContrastDataset` — a named, list-like, non-empty sequence of examples.
* :class:`PromptPair` / :class:`PromptPairDataset` — ActAdd's two steering prompts.

Loaders (each returns a :class:`ContrastDataset` unless said otherwise)
-----------------------------------------------------------------------
* :func:`load_contrast_jsonl` / :func:`load_prompt_pairs_jsonl` — a user's own JSONL files.
* :func:`load_contrast_file` — a JSONL file of either kind. Tasks (TruthfulQA, BBQ, SEQ,
  ToxiGen: each task module's ``contrast``) are found by name through
  :func:`actedit.data.tasks.load_contrast`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union, overload

from actedit.interventions.files import write_atomic

PathLike = Union[str, os.PathLike]

ROLES = ("pos", "neg", "base")
"""Roles of the sequences built from an example: positives, negatives, base completions."""


# ------------------------------------------------------------------------------- validation
def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__} ({value!r:.60}).")
    if not value.strip():
        raise ValueError(f"{what} is empty.")
    return value


def _check_texts(values: Any, what: str, where: str) -> List[str]:
    if isinstance(values, str):
        values = [values]
    if values is None:
        values = []
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{where}: {what} must be a list of strings, got {type(values).__name__}.")
    return [_check_text(v, f"{where}: {what}[{i}]") for i, v in enumerate(values)]


def _check_metadata(metadata: Any, where: str) -> Dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{where}: metadata must be a dict, got {type(metadata).__name__}.")
    try:
        json.dumps(metadata, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{where}: metadata must be JSON-serialisable (it is written into activation stores): {exc}"
        ) from None
    return dict(metadata)


# ------------------------------------------------------------------------------- data model
class _MetadataFields:
    """``id`` and ``split`` read from an item's ``metadata`` dict."""

    metadata: Dict[str, Any]

    @property
    def id(self) -> Optional[Any]:
        """``metadata['id']`` if present."""
        return self.metadata.get("id")

    @property
    def split(self) -> Optional[str]:
        """``metadata['split']`` if present."""
        return self.metadata.get("split")


@dataclass
class ContrastExample(_MetadataFields):
    """One prompt with desirable and undesirable responses.

    Attributes:
        prompt: the prompt or question (the formats in :mod:`actedit.data.formats` decide how it
            is rendered: lettered choices for HPR, "Q: ... A: ..." for ITI, ...).
        positives: desirable responses (truthful, unbiased, ...); at least one.
        negatives: undesirable responses; at least one. No text may be both.
        metadata: JSON-serialisable facts about the example. Conventional keys: ``id`` (stable
            identifier, also seeds HPR's choice shuffle), ``split`` (``train``/``eval``/``test``,
            read by :class:`~actedit.data.collect.ActivationStore` to filter rows), ``source``.
        bases: the model's own completions of the prompt (SEA's base demonstrations); optional.
    """

    prompt: str
    positives: List[str]
    negatives: List[str]
    metadata: Dict[str, Any] = field(default_factory=dict)
    bases: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        where = (
            f"example {self.metadata.get('id')!r}"
            if isinstance(self.metadata, dict) and "id" in self.metadata
            else "example"
        )
        self.prompt = _check_text(self.prompt, f"{where}: prompt")
        self.positives = _check_texts(self.positives, "positives", where)
        self.negatives = _check_texts(self.negatives, "negatives", where)
        self.bases = _check_texts(self.bases, "bases", where)
        self.metadata = _check_metadata(self.metadata, where)
        if not self.positives:
            raise ValueError(
                f"{where} has no positive response; every example needs at least one (prompt: {self.prompt[:80]!r})."
            )
        if not self.negatives:
            raise ValueError(
                f"{where} has no negative response; every example needs at least one (prompt: {self.prompt[:80]!r})."
            )
        both = sorted(set(self.positives) & set(self.negatives))
        if both:
            raise ValueError(f"{where}: {both[0]!r} is listed as both a positive and a negative response.")

    def responses(self) -> Iterator[Tuple[str, int, str]]:
        """``(role, index, text)`` of every positive (role ``"pos"``), then every negative (``"neg"``)."""
        for role, texts in (("pos", self.positives), ("neg", self.negatives)):
            for index, text in enumerate(texts):
                yield role, index, text

    def pairs(self) -> Iterator[Tuple[str, str]]:
        """Every (positive, negative) response pair, positives outer."""
        for pos in self.positives:
            for neg in self.negatives:
                yield pos, neg

    @property
    def num_pairs(self) -> int:
        return len(self.positives) * len(self.negatives)

    def to_dict(self) -> Dict[str, Any]:
        """The JSONL record :func:`load_contrast_jsonl` reads back."""
        out: Dict[str, Any] = {
            "prompt": self.prompt,
            "positives": list(self.positives),
            "negatives": list(self.negatives),
        }
        if self.bases:
            out["bases"] = list(self.bases)
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out


@dataclass
class PromptPair(_MetadataFields):
    """ActAdd's steering prompts: the edit adds activations of ``prompt1`` minus ``prompt2``.

    Attributes:
        prompt1: the prompt whose activations are added ("Love").
        prompt2: the prompt whose activations are subtracted ("Hate"); may be a single space.
        metadata: JSON-serialisable facts (``id``, ...).
    """

    prompt1: str
    prompt2: str
    metadata: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = (
            f"prompt pair {self.metadata.get('id')!r}"
            if isinstance(self.metadata, dict) and "id" in self.metadata
            else "prompt pair"
        )
        for name in ("prompt1", "prompt2"):
            value = getattr(self, name)
            if not isinstance(value, str) or value == "":
                raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r:.60}.")
        if self.prompt1 == self.prompt2:
            raise ValueError(
                f"{where}: prompt1 and prompt2 are identical ({self.prompt1!r:.60}); their difference would be zero."
            )
        self.metadata = _check_metadata(self.metadata, where)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"prompt1": self.prompt1, "prompt2": self.prompt2}
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        return out


class _Dataset:
    """Shared list behaviour of :class:`ContrastDataset` and :class:`PromptPairDataset`."""

    item_type: type = object

    def __init__(self, items: Iterable[Any], name: str = "dataset") -> None:
        items = list(items)
        if not items:
            raise ValueError(f"dataset {name!r} is empty; it needs at least one example.")
        for i, item in enumerate(items):
            if not isinstance(item, self.item_type):
                raise ValueError(
                    f"dataset {name!r}: item {i} is a {type(item).__name__}, not a {self.item_type.__name__}."
                )
        self._items = items
        self.name = str(name)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return type(self)(self._items[index], name=self.name)
        return self._items[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, examples={len(self)})"

    @property
    def examples(self) -> List[Any]:
        return list(self._items)

    def select(self, indices: Sequence[int], name: Optional[str] = None):
        """A dataset of the items at ``indices`` (in that order)."""
        return type(self)([self._items[i] for i in indices], name=name or self.name)

    def filter(self, keep: Callable[[Any], bool], name: Optional[str] = None):
        """A dataset of the items for which ``keep(item)`` is true (error if none is)."""
        return type(self)([x for x in self._items if keep(x)], name=name or self.name)

    @property
    def splits(self) -> List[str]:
        """The distinct ``metadata['split']`` values, sorted."""
        return sorted({str(x.metadata["split"]) for x in self._items if "split" in x.metadata})

    def split(self, name: str):
        """The items whose ``metadata['split']`` is ``name``."""
        chosen = [x for x in self._items if x.metadata.get("split") == name]
        if not chosen:
            known = self.splits
            raise ValueError(
                f"dataset {self.name!r} has no example in split {name!r}; splits present: "
                f"{', '.join(known) if known else 'none (no split metadata)'}."
            )
        return type(self)(chosen, name=f"{self.name}/{name}")

    def with_split(self, name: str):
        """A copy whose items all carry ``metadata['split'] = name``."""
        return type(self)([_with_metadata(x, split=name) for x in self._items], name=self.name)

    def train_eval_split(self, eval_ratio: float = 0.1, seed: int = 0) -> Tuple[Any, Any]:
        """A seeded random (train, eval) partition, labelled in ``metadata['split']``.

        HPR splits the training sets of BBQ, SEQ and ToxiGen further into train and eval sets.
        ``eval`` gets ``round(len · eval_ratio)`` items (at least one, at most len − 1).
        """
        if not 0 < eval_ratio < 1:
            raise ValueError(f"eval_ratio must be in (0, 1), got {eval_ratio}.")
        if len(self) < 2:
            raise ValueError(f"dataset {self.name!r} has {len(self)} example(s); a train/eval split needs two.")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_eval = min(max(1, int(round(len(self) * eval_ratio))), len(self) - 1)
        eval_ids, train_ids = sorted(order[:n_eval]), sorted(order[n_eval:])
        train = type(self)(
            [_with_metadata(self._items[i], split="train") for i in train_ids], name=f"{self.name}/train"
        )
        evals = type(self)([_with_metadata(self._items[i], split="eval") for i in eval_ids], name=f"{self.name}/eval")
        return train, evals

    def digest(self) -> str:
        """SHA-256 of the items' canonical JSON (order-sensitive); identifies the data in stores."""
        h = hashlib.sha256(type(self).__name__.encode())
        for item in self._items:
            h.update(json.dumps(item.to_dict(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def to_jsonl(self, path: PathLike) -> Path:
        """Write one JSON record per line (atomically); the matching loader reads it back."""
        return write_atomic(
            path, "".join(json.dumps(item.to_dict(), ensure_ascii=False) + "\n" for item in self._items)
        )


def _with_metadata(item, **updates):
    meta = {**item.metadata, **updates}
    if isinstance(item, ContrastExample):
        return ContrastExample(item.prompt, list(item.positives), list(item.negatives), meta, list(item.bases))
    return PromptPair(item.prompt1, item.prompt2, meta)


class ContrastDataset(_Dataset):
    """A named, non-empty, list-like sequence of :class:`ContrastExample`.

    Indexing with an int gives an example, with a slice a dataset. :meth:`pairs` yields every
    ``(prompt, positive, negative)`` triple.
    """

    item_type = ContrastExample

    def pairs(self) -> Iterator[Tuple[str, str, str]]:
        """``(prompt, positive, negative)`` for every (positive, negative) pair of every example."""
        for example in self._items:
            for pos, neg in example.pairs():
                yield example.prompt, pos, neg

    @property
    def num_pairs(self) -> int:
        return sum(x.num_pairs for x in self._items)


class PromptPairDataset(_Dataset):
    """A named, non-empty, list-like sequence of :class:`PromptPair` (ActAdd)."""

    item_type = PromptPair


@overload
def as_dataset(dataset: ContrastDataset) -> ContrastDataset: ...


@overload
def as_dataset(dataset: PromptPairDataset) -> PromptPairDataset: ...


@overload
def as_dataset(dataset: Any) -> Union[ContrastDataset, PromptPairDataset]: ...


def as_dataset(dataset: Any) -> Union[ContrastDataset, PromptPairDataset]:
    """A dataset, or a list of contrast examples or prompt pairs (one kind) as one."""
    if isinstance(dataset, (ContrastDataset, PromptPairDataset)):
        return dataset
    items = list(dataset) if dataset is not None else []
    if not items:
        raise ValueError("the dataset is empty; nothing to collect.")
    if all(isinstance(x, ContrastExample) for x in items):
        return ContrastDataset(items, name="contrast")
    if all(isinstance(x, PromptPair) for x in items):
        return PromptPairDataset(items, name="prompt_pairs")
    raise ValueError("the dataset must hold ContrastExample or PromptPair items (one kind).")


# ----------------------------------------------------------------------------------- JSONL
def _read_jsonl(path: PathLike) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; errors name the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No such JSONL file: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: each line must be a JSON object, got {type(record).__name__}.")
            yield lineno, record


def _one_or_many(record: Dict[str, Any], one: str, many: str, where: str, required: bool = True) -> List[str]:
    if one in record and many in record:
        raise ValueError(f"{where}: give either {one!r} or {many!r}, not both.")
    if one in record:
        value = record[one]
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: {one!r} must be a string (use {many!r} for a list), got {type(value).__name__}."
            )
        return [value]
    if many in record:
        value = record[many]
        if not isinstance(value, list):
            raise ValueError(f"{where}: {many!r} must be a list of strings, got {type(value).__name__}.")
        return value
    if required:
        raise ValueError(f"{where}: missing {one!r} (a string) or {many!r} (a list of strings).")
    return []


_CONTRAST_KEYS = {"prompt", "positive", "positives", "negative", "negatives", "base", "bases", "metadata", "id"}


def load_contrast_jsonl(path: PathLike, name: Optional[str] = None) -> ContrastDataset:
    """Read a JSONL file of contrast examples.

    Each line: ``{"prompt": str, "positive": str | "positives": [str], "negative": str |
    "negatives": [str]}``, optionally ``"base"``/``"bases"`` (SEA), ``"id"`` and ``"metadata"``
    (a dict); any other key is kept in ``metadata``. Blank lines are skipped. Errors name the
    file and the line number.
    """
    examples = []
    for lineno, record in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if "prompt" not in record:
            raise ValueError(f"{where}: missing 'prompt'.")
        metadata = record.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ValueError(f"{where}: 'metadata' must be an object, got {type(metadata).__name__}.")
        metadata = dict(metadata)
        for key, value in record.items():
            if key not in _CONTRAST_KEYS:
                metadata.setdefault(key, value)
        if "id" in record:
            metadata["id"] = record["id"]
        metadata.setdefault("line", lineno)
        try:
            examples.append(
                ContrastExample(
                    prompt=record["prompt"],
                    positives=_one_or_many(record, "positive", "positives", where),
                    negatives=_one_or_many(record, "negative", "negatives", where),
                    metadata=metadata,
                    bases=_one_or_many(record, "base", "bases", where, required=False),
                )
            )
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None
    if not examples:
        raise ValueError(f"{path} holds no examples (the file is empty or blank).")
    return ContrastDataset(examples, name=name or Path(path).stem)


_PAIR_ALIASES = (("prompt1", "positive"), ("prompt2", "negative"))


def load_prompt_pairs_jsonl(path: PathLike, name: Optional[str] = None) -> PromptPairDataset:
    """Read a JSONL file of ActAdd prompt pairs.

    Each line: ``{"prompt1": str, "prompt2": str}`` (aliases ``"positive"``/``"negative"``),
    optionally ``"id"`` and ``"metadata"``; other keys are kept in ``metadata``.
    """
    pairs = []
    for lineno, record in _read_jsonl(path):
        where = f"{path}:{lineno}"
        values: List[Any] = []
        for key, alias in _PAIR_ALIASES:
            if key in record and alias in record:
                raise ValueError(f"{where}: give either {key!r} or {alias!r}, not both.")
            if key not in record and alias not in record:
                raise ValueError(f"{where}: missing {key!r} (or its alias {alias!r}).")
            values.append(record.get(key, record.get(alias)))
        metadata = record.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ValueError(f"{where}: 'metadata' must be an object, got {type(metadata).__name__}.")
        metadata = dict(metadata)
        for key, value in record.items():
            if key not in {"prompt1", "prompt2", "positive", "negative", "metadata", "id"}:
                metadata.setdefault(key, value)
        if "id" in record:
            metadata["id"] = record["id"]
        metadata.setdefault("line", lineno)
        try:
            pairs.append(PromptPair(values[0], values[1], metadata))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if not pairs:
        raise ValueError(f"{path} holds no prompt pairs (the file is empty or blank).")
    return PromptPairDataset(pairs, name=name or Path(path).stem)


def read_records(path: PathLike) -> List[Dict[str, Any]]:
    """The records of a local ``.jsonl``, ``.csv`` or ``.json`` (a list of objects) file; errors
    name the file (and the line, for JSONL)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [record for _, record in _read_jsonl(path)]
    with open(path, encoding="utf-8", newline="") as handle:
        if suffix == ".csv":
            return list(csv.DictReader(handle))
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}).") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of objects.")
    return data


# ----------------------------------------------------------------------------- conversions
AB_TEMPLATE = "{prompt}\n\n(A) {a}\n(B) {b}"
"""CAA's two-choice question (Rimsky et al.'s A/B datasets): the prompt, then the lettered choices."""


def _example_seed(seed: int, example: ContrastExample, index: int) -> int:
    key = f"{seed}/{example.id if example.id is not None else index}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def to_ab_questions(
    dataset: ContrastDataset, *, seed: int = 0, pairs_per_example: int = 1, template: str = AB_TEMPLATE
) -> ContrastDataset:
    """CAA's A/B format from any contrast dataset.

    Each example gives ``pairs_per_example`` two-choice questions: its first positive (TruthfulQA:
    the best answer) against negatives drawn without replacement, the letters of the two choices
    in random order; the positive response is the true choice's letter, e.g. ``"(B)"``, the
    negative the other one. Draws are seeded by ``(seed, example id)``, so a question converts the
    same way whatever else is in the dataset. Metadata is kept (the ``id`` gets ``/ab<j>``
    appended when an example gives several questions), plus ``ab_true`` (the true letter).
    """
    if not isinstance(pairs_per_example, int) or isinstance(pairs_per_example, bool) or pairs_per_example < 1:
        raise ValueError(f"pairs_per_example must be a positive integer, got {pairs_per_example!r}.")
    for name in ("prompt", "a", "b"):
        if "{" + name + "}" not in template:
            raise ValueError(f"the A/B template must contain {{{name}}}, got {template!r}.")
    out = []
    for i, example in enumerate(dataset):
        if not isinstance(example, ContrastExample):
            raise ValueError(f"to_ab_questions converts contrast examples, got {type(example).__name__}.")
        rng = random.Random(_example_seed(seed, example, i))
        negatives = rng.sample(list(example.negatives), min(pairs_per_example, len(example.negatives)))
        for j, negative in enumerate(negatives):
            true_first = rng.random() < 0.5
            a, b = (example.positives[0], negative) if true_first else (negative, example.positives[0])
            letters = ("(A)", "(B)") if true_first else ("(B)", "(A)")
            meta = dict(example.metadata, ab_true=letters[0][1])
            if len(negatives) > 1 and example.id is not None:
                meta["id"] = f"{example.id}/ab{j}"
            out.append(
                ContrastExample(template.format(prompt=example.prompt, a=a, b=b), [letters[0]], [letters[1]], meta)
            )
    return ContrastDataset(out, name=f"{dataset.name}/ab")


def first_responses(dataset: ContrastDataset) -> ContrastDataset:
    """Each example with only its first positive and first negative (TruthfulQA: the best
    answer and the first incorrect answer): one completion of each role per prompt, as SEA's
    aligned matrices H⁺, H⁻ need."""
    return ContrastDataset(
        [
            ContrastExample(ex.prompt, [ex.positives[0]], [ex.negatives[0]], dict(ex.metadata), list(ex.bases))
            for ex in dataset
        ],
        name=f"{dataset.name}/first",
    )


def with_bases(dataset: ContrastDataset, bases: Sequence[Union[str, Sequence[str]]]) -> ContrastDataset:
    """The dataset with each example's ``bases`` (SEA's base completions, e.g. the model's own
    answers from :func:`actedit.data.generate.generate_bases`) replaced by ``bases[i]``."""
    if len(bases) != len(dataset):
        raise ValueError(
            f"{len(bases)} base completions for {len(dataset)} examples; give one (or a list) per example."
        )
    out = []
    for example, base in zip(dataset, bases, strict=True):
        texts = [base] if isinstance(base, str) else list(base)
        out.append(
            ContrastExample(
                example.prompt, list(example.positives), list(example.negatives), dict(example.metadata), texts
            )
        )
    return ContrastDataset(out, name=dataset.name)


def load_contrast_file(
    spec: PathLike, known: Sequence[str] = (), **kwargs
) -> Union[ContrastDataset, PromptPairDataset]:
    """A dataset from a JSONL file: one whose first record has ``prompt1`` (or ``prompt2``) is
    read as ActAdd prompt pairs, any other as contrast examples. (Names of datasets and tasks are
    resolved by :func:`actedit.data.tasks.load_contrast`, which lists them as ``known``.)"""
    text = str(spec)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".jsonl" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"No such dataset file: {path}")
        first = next(iter(_read_jsonl(path)), (0, {}))[1]
        if "prompt1" in first or "prompt2" in first:
            return load_prompt_pairs_jsonl(path, **kwargs)
        return load_contrast_jsonl(path, **kwargs)
    raise ValueError(f"unknown dataset {text!r}: give a JSONL file or one of {', '.join(sorted(known))}.")


__all__ = [
    "AB_TEMPLATE",
    "as_dataset",
    "ROLES",
    "ContrastDataset",
    "ContrastExample",
    "PromptPair",
    "PromptPairDataset",
    "load_contrast_file",
    "load_contrast_jsonl",
    "load_prompt_pairs_jsonl",
    "read_records",
    "first_responses",
    "to_ab_questions",
    "with_bases",
]
