"""Completions with and without an edit, side by side, and blind rating of them (``actedit compare``).

This is the ActAdd repository's ``print_n_comparisons`` and ``human_rating.py`` for any actedit
edit:

* :func:`sample_comparisons` samples ``n`` completions of each prompt from the base model and
  ``n`` from the edited model (a ``pyvene.IntervenableModel``) and returns a
  :class:`ComparisonReport` (JSON: :meth:`ComparisonReport.save` / :meth:`ComparisonReport.load`).
  By default prompts are raw text that the model continues ("I hate you because"), sampled with
  ActAdd's settings (temperature 1, top-p 0.3; :func:`comparison_settings`).
* :func:`render_side_by_side` (or :meth:`ComparisonReport.table`) prints them in two wrapped
  columns, ``base | edited``, one row per pair of samples.
* :func:`blind` pools both sides' completions of each prompt, shuffles them with a seed and
  labels them with opaque ids: a :class:`BlindSheet` for a rater (prompts, completions, empty
  ratings) and a :class:`BlindKey` (id → ``"base"`` / ``"edited"``) kept apart from it
  (:func:`write_blind` writes ``sheet.json`` and ``key.json``). The rater writes a number into
  each completion's ``"rating"`` field; :func:`score_sheet` / :func:`score_blind_dir` then give
  the mean rating of base and edited completions, per prompt and overall.

How the samples are drawn: prompt ``i``'s sample ``k`` is row ``i * n + k`` of one list of
prompts, generated in batches of ``settings.batch_size`` rows by
:func:`actedit.eval.generations.compare_generations`, which seeds batch ``b`` with
``settings.seed + b`` for the base model and for the edited model alike. So the k-th base and
the k-th edited completion of a prompt are drawn from the same random stream, an edit that
changes nothing gives identical columns, and the same seed gives the same report. A batch draws
its random numbers together, so the samples also depend on ``n``, the prompts and
``batch_size``: change any of them and the samples change too.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import textwrap
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from actedit.data.generate import GenerationSettings
from actedit.interventions.edits import is_intervenable
from actedit.interventions.files import PathLike, write_json

from .generations import compare_generations

REPORT_KIND = "actedit-comparison"
SHEET_KIND = "actedit-blind-sheet"
KEY_KIND = "actedit-blind-key"
LABELS = ("base", "edited")
SHEET_FILE = "sheet.json"
KEY_FILE = "key.json"
SHEET_INSTRUCTIONS = (
    "Rate every completion: replace null in its 'rating' field with a number (higher = more of what "
    "the question asks about; use one scale throughout). Leave null to skip a completion. Each "
    "completion continues its prompt; the completions of a prompt are in random order."
)


def comparison_settings(
    *,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    top_p: float = 0.3,
    seed: int = 0,
    batch_size: int = 8,
    use_chat_template: bool = False,
    system_prompt: Optional[str] = None,
) -> GenerationSettings:
    """ActAdd's sampling settings as :class:`GenerationSettings` (sampling on).

    Args:
        max_new_tokens: new tokens per completion (ActAdd's examples use 40 to 100).
        temperature: sampling temperature (ActAdd: 1).
        top_p: nucleus mass (ActAdd: 0.3).
        seed: base seed (batch ``b`` of rows uses ``seed + b``).
        batch_size: rows (prompt samples) per ``generate`` call.
        use_chat_template: wrap each prompt as a user turn with the tokenizer's chat template
            (default False: the model continues the raw prompt text, as in ActAdd).
        system_prompt: optional system turn (chat template only).

    ActAdd also sets ``freq_penalty=1`` (TransformerLens: subtract ``freq_penalty`` times the
    number of earlier occurrences of a token, prompt included, from its logit). transformers has
    no such penalty: its ``repetition_penalty`` divides the positive logits (multiplies the
    negative ones) of every token already present by one constant, whatever its count, which is a
    different distribution. It is left out rather than approximated.
    """
    return GenerationSettings(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        use_chat_template=use_chat_template,
        system_prompt=system_prompt,
    )


def describe_edits(edits: Sequence[Dict[str, Any]]) -> str:
    """One line naming each edit's method, site and layers (``"caa at block_output layers [1]"``)."""
    parts = [f"{e.get('method', '?')} at {e.get('component', '?')} layers {list(e.get('layers', []))}" for e in edits]
    return "; ".join(parts) or "unknown edit"


def _check_texts(values: Any, what: str) -> List[str]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{what} must be a list of strings, got {values!r}.")
    return list(values)


# ------------------------------------------------------------------------------- the report
@dataclass
class PromptComparison:
    """One prompt's samples from both models.

    Attributes:
        prompt: the prompt as given.
        model_input: the text fed to the model (the prompt itself, or the prompt rendered with the
            chat template when that was used).
        base: the base model's completions, sample 0 first (new text only, stripped).
        edited: the edited model's completions; ``edited[k]`` shares ``base[k]``'s seed.
    """

    prompt: str
    model_input: str
    base: List[str]
    edited: List[str]

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"a comparison's prompt must be a non-empty string, got {self.prompt!r}.")
        if not isinstance(self.model_input, str):
            raise ValueError(f"model_input must be a string, got {self.model_input!r}.")
        self.base = _check_texts(self.base, f"the base completions of {self.prompt!r}")
        self.edited = _check_texts(self.edited, f"the edited completions of {self.prompt!r}")
        if not self.base or len(self.base) != len(self.edited):
            raise ValueError(
                f"prompt {self.prompt!r} needs as many edited as base completions (at least one each), "
                f"got {len(self.base)} base and {len(self.edited)} edited."
            )

    @property
    def n_different(self) -> int:
        """Pairs (same seed) whose edited completion differs from the base one."""
        return sum(b != e for b, e in zip(self.base, self.edited, strict=True))


@dataclass
class ComparisonReport:
    """Completions of the base and the edited model, ``n`` per prompt, with what produced them.

    Attributes:
        comparisons: one :class:`PromptComparison` per prompt, in the given order; every prompt
            has the same number of samples.
        settings: the :class:`GenerationSettings` as a dict, plus ``chat_template`` (whether the
            template was applied).
        model: the base model's name or path, if known.
        edits: the edit's metadata from ``edited.config.actedit`` (method, component, layers,
            hyperparameters per edit), if known.
        seconds: wall-clock time of all the generation.
    """

    comparisons: List[PromptComparison]
    settings: Dict[str, Any]
    model: Optional[str] = None
    edits: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if not self.comparisons:
            raise ValueError("a comparison report needs at least one prompt.")
        if not all(isinstance(c, PromptComparison) for c in self.comparisons):
            raise ValueError("comparisons must be PromptComparison objects.")
        counts = sorted({len(c.base) for c in self.comparisons})
        if len(counts) != 1:
            raise ValueError(f"every prompt must have the same number of samples, got {counts}.")
        if not isinstance(self.settings, dict):
            raise ValueError(f"settings must be a dict, got {type(self.settings).__name__}.")

    @property
    def prompts(self) -> List[str]:
        """The prompts, in order."""
        return [c.prompt for c in self.comparisons]

    @property
    def n(self) -> int:
        """Samples per prompt and per model."""
        return len(self.comparisons[0].base)

    @property
    def edit_description(self) -> str:
        """The edit's methods, sites and layers in one line."""
        return describe_edits(self.edits)

    def table(self, width: int = 100) -> str:
        """The side-by-side rendering (:func:`render_side_by_side`)."""
        return render_side_by_side(self, width=width)

    def to_dict(self) -> Dict[str, Any]:
        """The report as JSON-ready data (what :meth:`save` writes)."""
        return {
            "kind": REPORT_KIND,
            "model": self.model,
            "edits": self.edits,
            "edit_description": self.edit_description,
            "settings": self.settings,
            "seconds": self.seconds,
            "n": self.n,
            "comparisons": [asdict(c) for c in self.comparisons],
        }

    def save(self, path: PathLike) -> Path:
        """Write the report as indented UTF-8 JSON, atomically; returns the path."""
        return write_json(path, self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def load(cls, path: PathLike) -> "ComparisonReport":
        """Read a report written by :meth:`save`."""
        data = _read_json(path, REPORT_KIND, "a comparison report (written by actedit compare --out)")
        try:
            return cls(
                comparisons=[PromptComparison(**c) for c in data["comparisons"]],
                settings=data["settings"],
                model=data.get("model"),
                edits=list(data.get("edits", [])),
                seconds=float(data.get("seconds", 0.0)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a complete comparison report ({type(exc).__name__}: {exc}).") from exc


def _read_json(path: PathLike, kind: str, what: str) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No file at {str(path)!r}; expected {what}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); expected {what}.") from exc
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not {what}: its 'kind' is {found!r}, expected {kind!r}.")
    return data


# ------------------------------------------------------------------------------- sampling
def sample_comparisons(
    edited,
    tokenizer,
    prompts: Union[str, Sequence[str]],
    n: int = 15,
    settings: Optional[GenerationSettings] = None,
    *,
    base=None,
    progress: bool = True,
) -> ComparisonReport:
    """``n`` completions of each prompt by the base model and ``n`` by the edited model.

    Args:
        edited: the edited model, a ``pyvene.IntervenableModel``.
        tokenizer: the model's tokenizer (not modified).
        prompts: the prompts (a single string counts as one prompt).
        n: samples per prompt and per model (ActAdd's ``num_comparisons``; default 15).
        settings: :class:`GenerationSettings`; default :func:`comparison_settings` (ActAdd's:
            sampling at temperature 1, top-p 0.3, 40 new tokens, raw prompt text, seed 0).
            Greedy settings (``do_sample=False``) give ``n`` identical samples (a warning says so).
        base: the base model (default ``edited.model`` without the edit's hooks).
        progress: show a progress bar (stderr).

    Returns:
        a :class:`ComparisonReport`; the k-th base and k-th edited completion of a prompt were
        sampled with the same seed (see the module docstring).
    """
    if not is_intervenable(edited):
        raise ValueError(
            f"edited must be a pyvene IntervenableModel (the base model with the edit), got "
            f"{type(edited).__name__}; load the edit with actedit.load(artifact, model) or "
            "actedit.interventions.load_artifact(artifact, model)."
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be a positive integer, got {n!r}; ActAdd uses 15.")
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("sample_comparisons() needs at least one prompt, e.g. ['I hate you because'].")
    for i, prompt in enumerate(prompt_list):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(
                f"prompt {i} is {prompt!r}; every prompt must be non-empty text for the model to continue, "
                "e.g. 'I hate you because'."
            )
    settings = settings or comparison_settings()
    if not isinstance(settings, GenerationSettings):
        raise ValueError(f"settings must be a GenerationSettings, got {type(settings).__name__}.")
    if not settings.do_sample and n > 1:
        warnings.warn(
            f"greedy decoding (do_sample=False) gives {n} identical completions per prompt; "
            "sample with comparison_settings() or GenerationSettings(do_sample=True).",
            stacklevel=2,
        )
    rows = [prompt for prompt in prompt_list for _ in range(n)]  # prompt i's sample k is row i * n + k
    generated = compare_generations(edited, tokenizer, rows, settings, base=base, progress=progress)
    records = generated.records
    comparisons = [
        PromptComparison(
            prompt=prompt,
            model_input=records[i * n].prompt,
            base=[r.base_answer for r in records[i * n : (i + 1) * n]],
            edited=[r.edited_answer for r in records[i * n : (i + 1) * n]],
        )
        for i, prompt in enumerate(prompt_list)
    ]
    return ComparisonReport(
        comparisons=comparisons,
        settings=generated.settings,
        model=generated.model,
        edits=generated.edits,
        seconds=generated.seconds,
    )


# ------------------------------------------------------------------------------- rendering
def _printable(text: str) -> str:
    """``text`` with control characters other than line breaks and tabs escaped (``\\x08``), so
    that they cannot move the cursor and break the columns."""
    return "".join(
        ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else ch.encode("unicode_escape").decode("ascii")
        for ch in text.replace("\r\n", "\n")
    )


def _wrap(text: str, width: int) -> List[str]:
    if not text.strip():
        return ["(empty)"]
    lines: List[str] = []
    for paragraph in _printable(text).split("\n"):  # keep the completion's own line breaks
        lines += textwrap.wrap(paragraph, width, break_long_words=True, break_on_hyphens=False) or [""]
    return lines


def render_side_by_side(report: ComparisonReport, width: int = 100) -> str:
    """The report as text in two wrapped columns, ``base | edited``.

    Per prompt: a title line (the prompt, how many of the ``n`` pairs differ), the header
    ``base | edited`` under a line of ``=``, then each pair of completions (same seed) side by
    side, pairs separated by a line of ``-``. Completions keep their own line breaks and are
    wrapped to the column width; an empty completion shows as ``(empty)`` and control characters
    are escaped (``\\x08``).

    Args:
        report: a :class:`ComparisonReport`.
        width: total width of a line in characters (at least 43: two columns of 20 and ``" | "``).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 43:
        raise ValueError(f"width must be an integer of at least 43 characters, got {width!r}.")
    column = (width - 3) // 2

    def row(left: str, right: str) -> str:
        return f"{left:<{column}} | {right}".rstrip()

    rule = "-" * column + "-+-" + "-" * column
    double = "=" * column + "=+=" + "=" * column
    out = [f"edit: {report.edit_description}" + (f" on {report.model}" if report.model else "")]
    for i, comparison in enumerate(report.comparisons, 1):
        out += [
            "",
            f"prompt {i}/{len(report.comparisons)}: {comparison.prompt!r} "
            f"({comparison.n_different} of {report.n} pairs differ)",
            row("base", "edited"),
            double,
        ]
        for k, (base, edited) in enumerate(zip(comparison.base, comparison.edited, strict=True)):
            if k:
                out.append(rule)
            left, right = _wrap(base, column), _wrap(edited, column)
            height = max(len(left), len(right))
            left += [""] * (height - len(left))
            right += [""] * (height - len(right))
            out += [row(a, b) for a, b in zip(left, right, strict=True)]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------- blind rating
@dataclass
class SheetCompletion:
    """One completion on a blind sheet.

    Attributes:
        id: an opaque id (8 hex digits) that only the key maps to ``"base"`` or ``"edited"``.
        text: the completion (it continues the prompt).
        rating: the rater's number (int or float); ``None`` (JSON ``null``) = not rated yet.
    """

    id: str
    text: str
    rating: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"a sheet completion needs a non-empty string id, got {self.id!r}.")
        if not isinstance(self.text, str):
            raise ValueError(f"completion {self.id}: text must be a string, got {self.text!r}.")
        rating = self.rating
        if rating is None:
            return
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
            raise ValueError(
                f"completion {self.id}: rating {rating!r} is not a number; write a number such as 3 or 4.5 "
                "(without quotes) in its 'rating' field, or null to leave it unrated."
            )


@dataclass
class SheetPrompt:
    """One prompt on a blind sheet and its pooled, shuffled completions.

    Attributes:
        prompt: the prompt the completions continue.
        completions: every completion of both models for this prompt, in shuffled order.
    """

    prompt: str
    completions: List[SheetCompletion]

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"a sheet prompt must be a string, got {self.prompt!r}.")
        if not self.completions:
            raise ValueError(f"prompt {self.prompt!r} has no completions on the sheet.")


@dataclass
class BlindSheet:
    """What a rater sees: prompts and completions under opaque ids, with empty ratings.

    Attributes:
        prompts: one :class:`SheetPrompt` per prompt.
        sheet_id: a digest of the prompts, ids and texts; its key records the same value.
        question: what to rate (ActAdd's example: "How happy is this completion?"), if given.
        instructions: how to fill in the sheet.
    """

    prompts: List[SheetPrompt]
    sheet_id: str
    question: Optional[str] = None
    instructions: str = SHEET_INSTRUCTIONS

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a blind sheet needs at least one prompt.")
        ids = self.ids
        if len(set(ids)) != len(ids):
            raise ValueError("the ids of a blind sheet must be unique; the sheet was edited by hand or is corrupted.")
        if self.question is not None and not isinstance(self.question, str):
            raise ValueError(f"question must be a string or None, got {self.question!r}.")

    @property
    def ids(self) -> List[str]:
        """Every completion id, in sheet order."""
        return [c.id for p in self.prompts for c in p.completions]

    def to_dict(self) -> Dict[str, Any]:
        """The sheet as JSON-ready data (what :meth:`save` writes)."""
        return {
            "kind": SHEET_KIND,
            "sheet_id": self.sheet_id,
            "question": self.question,
            "instructions": self.instructions,
            "prompts": [asdict(p) for p in self.prompts],
        }

    def save(self, path: PathLike) -> Path:
        """Write the sheet as indented UTF-8 JSON, atomically; returns the path."""
        return write_json(path, self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def load(cls, path: PathLike) -> "BlindSheet":
        """Read a (filled or empty) sheet; a rating that is not a number raises a ValueError naming its id."""
        data = _read_json(path, SHEET_KIND, "a blind rating sheet (sheet.json of actedit compare --blind)")
        try:
            prompts = [
                SheetPrompt(prompt=p["prompt"], completions=[SheetCompletion(**c) for c in p["completions"]])
                for p in data["prompts"]
            ]
            return cls(
                prompts=prompts,
                sheet_id=data["sheet_id"],
                question=data.get("question"),
                instructions=data.get("instructions", SHEET_INSTRUCTIONS),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"{path} is not a complete blind sheet ({type(exc).__name__}: {exc}); keep its structure and "
                "only change the 'rating' fields."
            ) from exc


@dataclass
class BlindKey:
    """Which model wrote each completion of a :class:`BlindSheet`; keep it from the rater.

    Attributes:
        sheet_id: the ``sheet_id`` of the sheet this key belongs to.
        labels: completion id → ``"base"`` or ``"edited"``.
        seed: the seed the sheet was shuffled with.
    """

    sheet_id: str
    labels: Dict[str, str]
    seed: int = 0

    def __post_init__(self) -> None:
        bad = {i: label for i, label in self.labels.items() if label not in LABELS}
        if bad:
            raise ValueError(f"a key maps ids to 'base' or 'edited'; got {bad}.")

    def to_dict(self) -> Dict[str, Any]:
        """The key as JSON-ready data (what :meth:`save` writes)."""
        return {"kind": KEY_KIND, "sheet_id": self.sheet_id, "seed": self.seed, "labels": dict(self.labels)}

    def save(self, path: PathLike) -> Path:
        """Write the key as indented JSON, atomically; returns the path."""
        return write_json(path, self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: PathLike) -> "BlindKey":
        """Read a key written by :meth:`save`."""
        data = _read_json(path, KEY_KIND, "a blind rating key (key.json of actedit compare --blind)")
        try:
            return cls(sheet_id=data["sheet_id"], labels=dict(data["labels"]), seed=int(data.get("seed", 0)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a complete blind key ({type(exc).__name__}: {exc}).") from exc


def _sheet_digest(prompts: Sequence[SheetPrompt]) -> str:
    content = [[p.prompt, [[c.id, c.text] for c in p.completions]] for p in prompts]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def blind(report: ComparisonReport, seed: int = 0, *, question: Optional[str] = None) -> Tuple[BlindSheet, BlindKey]:
    """A blind rating sheet of ``report`` and its key.

    Per prompt, the ``n`` base and ``n`` edited completions are pooled and shuffled with
    ``random.Random(seed)``; each gets an opaque id (8 random hex digits from the same generator,
    unique on the sheet). The sheet holds only prompts, ids, texts and empty ratings; the key maps
    each id to ``"base"`` or ``"edited"``. The same report and seed give the same sheet and key.

    Args:
        report: a :class:`ComparisonReport`.
        seed: the shuffling seed.
        question: what the rater should rate (e.g. "How happy is this completion?"), shown on the sheet.
    """
    if not isinstance(report, ComparisonReport):
        raise ValueError(f"blind() needs a ComparisonReport, got {type(report).__name__}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    rng = random.Random(seed)
    used: set = set()
    labels: Dict[str, str] = {}
    sheet_prompts = []
    for comparison in report.comparisons:
        pool = [("base", text) for text in comparison.base] + [("edited", text) for text in comparison.edited]
        rng.shuffle(pool)
        completions = []
        for label, text in pool:
            new_id = f"{rng.getrandbits(32):08x}"
            while new_id in used:
                new_id = f"{rng.getrandbits(32):08x}"
            used.add(new_id)
            labels[new_id] = label
            completions.append(SheetCompletion(id=new_id, text=text))
        sheet_prompts.append(SheetPrompt(prompt=comparison.prompt, completions=completions))
    sheet_id = _sheet_digest(sheet_prompts)
    return BlindSheet(prompts=sheet_prompts, sheet_id=sheet_id, question=question), BlindKey(sheet_id, labels, seed)


def write_blind(
    report: ComparisonReport, directory: PathLike, seed: int = 0, *, question: Optional[str] = None
) -> Tuple[Path, Path]:
    """:func:`blind` written to ``directory/sheet.json`` and ``directory/key.json``; returns both paths.

    Give the rater the sheet only. Existing files there are replaced.
    """
    sheet, key = blind(report, seed, question=question)
    directory = Path(directory)
    return sheet.save(directory / SHEET_FILE), key.save(directory / KEY_FILE)


@dataclass
class PromptScore:
    """Mean ratings of one prompt's completions.

    Attributes:
        prompt: the prompt.
        base_mean: mean rating of its rated base completions (None if none is rated).
        edited_mean: mean rating of its rated edited completions (None if none is rated).
        base_rated: how many base completions were rated.
        edited_rated: how many edited completions were rated.
        unrated: completions left without a rating (both models).
    """

    prompt: str
    base_mean: Optional[float]
    edited_mean: Optional[float]
    base_rated: int
    edited_rated: int
    unrated: int

    @property
    def difference(self) -> Optional[float]:
        """``edited_mean - base_mean`` (None if either is missing)."""
        if self.base_mean is None or self.edited_mean is None:
            return None
        return self.edited_mean - self.base_mean


@dataclass
class RatingScores:
    """Ratings of a filled blind sheet, unblinded with its key.

    Attributes:
        prompts: one :class:`PromptScore` per prompt of the sheet.
        overall: the same over every rated completion of the sheet (pooled: each rating counts
            once, so prompts with more rated completions weigh more); its ``prompt`` is ``"overall"``.
        question: the sheet's question, if any.
    """

    prompts: List[PromptScore]
    overall: PromptScore
    question: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready data (each score with its ``difference``)."""

        def one(score: PromptScore) -> Dict[str, Any]:
            return {**asdict(score), "difference": score.difference}

        return {"question": self.question, "overall": one(self.overall), "prompts": [one(s) for s in self.prompts]}

    def table(self) -> str:
        """A text table: per prompt and overall, base and edited mean (rated count) and their difference."""

        def cell(mean: Optional[float], count: int) -> str:
            return "-" if mean is None else f"{mean:.2f} ({count})"

        def diff(value: Optional[float]) -> str:
            return "-" if value is None else f"{value:+.2f}"

        rows = [(repr(s.prompt), s) for s in self.prompts] + [("overall", self.overall)]
        name_width = min(max(len(name) for name, _ in rows), 50)
        head = f"{'prompt':<{name_width}}  {'base mean (n)':>14}  {'edited mean (n)':>15}  {'edited - base':>13}"
        lines = [f"question: {self.question}"] if self.question else []
        lines += [head, "-" * len(head)]
        for name, s in rows:
            short = name if len(name) <= name_width else name[: name_width - 3] + "..."
            lines.append(
                f"{short:<{name_width}}  {cell(s.base_mean, s.base_rated):>14}  "
                f"{cell(s.edited_mean, s.edited_rated):>15}  {diff(s.difference):>13}"
            )
        if self.overall.unrated:
            lines.append(f"({self.overall.unrated} completions unrated, left out of the means)")
        return "\n".join(lines) + "\n"


def _score(prompt: str, rated: Dict[str, List[float]], unrated: int) -> PromptScore:
    def mean(values: List[float]) -> Optional[float]:
        return sum(values) / len(values) if values else None

    return PromptScore(
        prompt=prompt,
        base_mean=mean(rated["base"]),
        edited_mean=mean(rated["edited"]),
        base_rated=len(rated["base"]),
        edited_rated=len(rated["edited"]),
        unrated=unrated,
    )


def score_sheet(sheet: BlindSheet, key: BlindKey) -> RatingScores:
    """Unblind a filled sheet with its key: mean ratings of base vs edited, per prompt and overall.

    Completions whose rating is ``None`` are left out of the means and counted as unrated.

    Raises:
        ValueError: the key belongs to another sheet, or does not map exactly the sheet's ids.
    """
    if key.sheet_id != sheet.sheet_id:
        raise ValueError(
            f"the key does not match the sheet: it was written for sheet {key.sheet_id!r}, the sheet is "
            f"{sheet.sheet_id!r}. Use the key.json written together with this sheet.json (same blind() call)."
        )
    ids = set(sheet.ids)
    missing, extra = sorted(ids - set(key.labels)), sorted(set(key.labels) - ids)
    if missing or extra:
        raise ValueError(
            f"the key does not match the sheet: {len(missing)} sheet ids are not in the key {missing[:5]} and "
            f"{len(extra)} key ids are not on the sheet {extra[:5]}. Use the key.json written together with this "
            "sheet.json, and do not change the sheet's ids."
        )
    totals: Dict[str, List[float]] = {"base": [], "edited": []}
    total_unrated = 0
    scores = []
    for item in sheet.prompts:
        rated: Dict[str, List[float]] = {"base": [], "edited": []}
        unrated = 0
        for completion in item.completions:
            if completion.rating is None:
                unrated += 1
                continue
            rated[key.labels[completion.id]].append(float(completion.rating))
        for label in LABELS:
            totals[label] += rated[label]
        total_unrated += unrated
        scores.append(_score(item.prompt, rated, unrated))
    return RatingScores(prompts=scores, overall=_score("overall", totals, total_unrated), question=sheet.question)


def score_blind_dir(directory: PathLike) -> RatingScores:
    """:func:`score_sheet` of ``directory/sheet.json`` (filled in) with ``directory/key.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"No directory at {str(directory)!r}; give the folder holding {SHEET_FILE} and {KEY_FILE} "
            "(written by actedit compare --blind DIR)."
        )
    return score_sheet(BlindSheet.load(directory / SHEET_FILE), BlindKey.load(directory / KEY_FILE))


__all__ = [
    "BlindKey",
    "BlindSheet",
    "ComparisonReport",
    "PromptComparison",
    "PromptScore",
    "RatingScores",
    "SheetCompletion",
    "SheetPrompt",
    "blind",
    "comparison_settings",
    "describe_edits",
    "render_side_by_side",
    "sample_comparisons",
    "score_blind_dir",
    "score_sheet",
    "write_blind",
]
