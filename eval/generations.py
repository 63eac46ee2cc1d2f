"""Answers to questions before and after an edit, saved as JSON.

:func:`compare_generations` asks the base model and the edited model (a
``pyvene.IntervenableModel``) the same questions and returns a :class:`GenerationReport`
(question, prompt, base answer, edited answer per question; the settings; the edit's metadata),
which :meth:`GenerationReport.save` writes as JSON. Generation is :mod:`actedit.data.generate`'s;
base and edit sample from the same random stream per batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from tqdm.auto import tqdm

from actedit.data.generate import GenerationSettings, build_prompt, generate_texts, uses_chat_template
from actedit.interventions.edits import is_intervenable


@dataclass
class GenerationRecord:
    """One question's answers.

    Attributes:
        question: the question as given.
        prompt: the text fed to the model (formatted, chat template applied when used).
        base_answer: the base model's answer.
        edited_answer: the edited model's answer.
    """

    question: str
    prompt: str
    base_answer: str
    edited_answer: str

    @property
    def changed(self) -> bool:
        return self.base_answer != self.edited_answer


@dataclass
class GenerationReport:
    """Answers before/after an edit, with what produced them.

    Attributes:
        records: one :class:`GenerationRecord` per question, in input order.
        settings: the :class:`GenerationSettings` as a dict, plus ``chat_template`` (whether the
            template was applied).
        model: the base model's name or path, if known.
        edits: the edit's metadata (method, site, layers, hyperparameters per edit), if known.
        seconds: wall-clock time of both generations.
    """

    records: List[GenerationRecord]
    settings: Dict[str, Any]
    model: Optional[str] = None
    edits: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_changed(self) -> int:
        """Questions whose edited answer differs from the base answer."""
        return sum(r.changed for r in self.records)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "edits": self.edits,
            "settings": self.settings,
            "seconds": self.seconds,
            "n_questions": len(self.records),
            "n_changed": self.n_changed,
            "records": [asdict(r) for r in self.records],
        }

    def save(self, path: Union[str, Path]) -> Path:
        """Write the report as indented UTF-8 JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "GenerationReport":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            records=[GenerationRecord(**r) for r in data["records"]],
            settings=data["settings"],
            model=data.get("model"),
            edits=data.get("edits", []),
            seconds=data.get("seconds", 0.0),
        )


# ---------------------------------------------------------------------------------- prompts
def compare_generations(
    edited,
    tokenizer,
    questions: Sequence[str],
    settings: Optional[GenerationSettings] = None,
    *,
    base=None,
    progress: bool = True,
) -> GenerationReport:
    """Answers of the base model and of the edited model to ``questions``.

    Args:
        edited: the edited model, a ``pyvene.IntervenableModel``.
        tokenizer: the model's tokenizer (left padding is done here; the tokenizer is not changed).
        questions: the questions (strings).
        settings: :class:`GenerationSettings` (default: greedy, 64 new tokens, batches of 8).
        base: the base model (default ``edited.model``, without hooks).
        progress: show a progress bar (on stderr).
    """
    if not is_intervenable(edited):
        raise ValueError(f"edited must be a pyvene IntervenableModel, got {type(edited).__name__}.")
    settings = settings or GenerationSettings()
    questions = list(questions)
    if not questions:
        raise ValueError("compare_generations() needs at least one question.")
    base = edited.model if base is None else base
    chat = uses_chat_template(tokenizer, settings)
    prompts = [build_prompt(tokenizer, q, settings) for q in questions]
    start = time.perf_counter()
    base_answers, edited_answers = [], []
    bar = None
    if progress:
        bar = tqdm(total=len(prompts), desc="generating (base + edited)", unit="question")
    try:
        step = settings.batch_size
        for i in range(0, len(prompts), step):
            chunk = prompts[i : i + step]
            # the same seed per batch for base and edit: both sample from the same random stream
            batch_settings = GenerationSettings(**{**asdict(settings), "seed": settings.seed + i // step})
            base_answers += generate_texts(base, tokenizer, chunk, batch_settings, add_special_tokens=not chat)
            edited_answers += generate_texts(edited, tokenizer, chunk, batch_settings, add_special_tokens=not chat)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    records = [
        GenerationRecord(q, p, b, e)
        for q, p, b, e in zip(questions, prompts, base_answers, edited_answers, strict=True)
    ]
    info = getattr(edited.config, "actedit", None) or {}
    name = getattr(getattr(edited.model, "config", None), "_name_or_path", None) or None
    return GenerationReport(
        records=records,
        settings={**asdict(settings), "chat_template": chat},
        model=name,
        edits=list(info.get("edits", [])),
        seconds=seconds,
    )


__all__ = ["GenerationRecord", "GenerationReport", "compare_generations"]
