"""Answers to questions before and after an edit, saved as JSON.

:func:`compare_generations` asks the base model and the edited model (a
``pyvene.IntervenableModel``) the same questions and returns a :class:`GenerationReport`
(question, prompt, base answer, edited answer per question; the settings; the edit's metadata),
which :meth:`GenerationReport.save` writes as JSON. What is done:

* each question is formatted with ``settings.prompt_format`` and, when the tokenizer has a chat
  template (or ``use_chat_template=True``), wrapped as one user turn (after an optional system
  turn) with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; the rendered
  template is tokenised without adding special tokens again, a plain prompt with them;
* prompts are batched and **left-padded** (the tokenizer is not modified), so every row's last
  prompt token sits at the end of the batch and generation continues all rows at once;
* decoding is greedy by default; with ``do_sample=True`` the random generator is re-seeded with
  ``seed + batch index`` before each batch, the same for base and edit;
* the edited model generates with ``pvm.generate(inputs, unit_locations=None,
  intervene_on_prompt=True, ...)``: every intervention runs on every forward call (the prompt
  pass and each new token) and its stored position policy decides which positions it edits;
* answers are the new tokens only, cut at the first end-of-sequence token, decoded without
  special tokens and stripped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch


@dataclass
class GenerationSettings:
    """How answers are generated.

    Attributes:
        max_new_tokens: new tokens per answer at most.
        do_sample: sample instead of greedy decoding (default greedy).
        temperature: sampling temperature (only with ``do_sample``).
        top_p: nucleus sampling mass (only with ``do_sample``).
        seed: base seed of the sampler (batch ``i`` uses ``seed + i``).
        batch_size: prompts per ``generate`` call.
        use_chat_template: ``None`` = apply the tokenizer's chat template when it has one;
            ``True`` = require one; ``False`` = never.
        system_prompt: optional system turn (chat template only).
        prompt_format: how a question becomes the user's text; must contain ``{question}``.
        cache_implementation: passed to ``generate`` (None: the model's default, a dynamic KV
            cache that grows by concatenation; ``"static"`` preallocates it, see
            :func:`actedit.train.collect.generate_bases`).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    use_chat_template: Optional[bool] = None
    system_prompt: Optional[str] = None
    prompt_format: str = "{question}"
    cache_implementation: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}.")
        if "{question}" not in self.prompt_format:
            raise ValueError(f"prompt_format must contain '{{question}}', got {self.prompt_format!r}.")
        if self.use_chat_template not in (None, True, False):
            raise ValueError(f"use_chat_template must be None, True or False, got {self.use_chat_template!r}.")
        if self.cache_implementation is not None and not isinstance(self.cache_implementation, str):
            raise ValueError(f"cache_implementation must be None or a string such as 'static', "
                             f"got {self.cache_implementation!r}.")


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
        return {"model": self.model, "edits": self.edits, "settings": self.settings, "seconds": self.seconds,
                "n_questions": len(self.records), "n_changed": self.n_changed,
                "records": [asdict(r) for r in self.records]}

    def save(self, path: Union[str, Path]) -> Path:
        """Write the report as indented UTF-8 JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "GenerationReport":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(records=[GenerationRecord(**r) for r in data["records"]], settings=data["settings"],
                   model=data.get("model"), edits=data.get("edits", []), seconds=data.get("seconds", 0.0))


# ---------------------------------------------------------------------------------- prompts
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer, settings: GenerationSettings) -> bool:
    """Whether prompts get the chat template under ``settings``."""
    if settings.use_chat_template is None:
        return has_chat_template(tokenizer)
    if settings.use_chat_template and not has_chat_template(tokenizer):
        raise ValueError("use_chat_template=True but the tokenizer has no chat template.")
    return bool(settings.use_chat_template)


def build_prompt(tokenizer, question: str, settings: GenerationSettings) -> str:
    """The text fed to the model for ``question``."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"questions must be non-empty strings, got {question!r}.")
    text = settings.prompt_format.format(question=question)
    if not uses_chat_template(tokenizer, settings):
        return text
    messages = []
    if settings.system_prompt:
        messages.append({"role": "system", "content": settings.system_prompt})
    messages.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):  # some versions return a list when given one conversation
        rendered = rendered[0]
    return rendered


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_left_padded(tokenizer, prompts: Sequence[str], add_special_tokens: bool = True) -> Dict[str, torch.Tensor]:
    """Tokenise prompts one by one and left-pad them into ``input_ids``/``attention_mask``."""
    rows = [list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    if not rows or any(not r for r in rows):
        raise ValueError("every prompt needs at least one token.")
    width = max(len(r) for r in rows)
    pad = _pad_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _eos_ids(model, tokenizer) -> set:
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids


def _generate_kwargs(settings: GenerationSettings, pad_id: int) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample,
                              "pad_token_id": pad_id}
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:  # silence the "sampling flags set but do_sample=False" warnings of models' generation configs
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if settings.cache_implementation is not None:
        kwargs["cache_implementation"] = settings.cache_implementation
    return kwargs


def _is_intervenable(obj) -> bool:
    from pyvene.models.intervenable_base import BaseModel

    return isinstance(obj, BaseModel)


@torch.no_grad()
def _generate_batch(model_or_pvm, batch: Dict[str, torch.Tensor], kwargs: Dict[str, Any]) -> torch.Tensor:
    if _is_intervenable(model_or_pvm):
        device = next(model_or_pvm.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        _, out = model_or_pvm.generate(batch, unit_locations=None, intervene_on_prompt=True, **kwargs)
    else:
        device = next(model_or_pvm.parameters()).device
        out = model_or_pvm.generate(**{k: v.to(device) for k, v in batch.items()}, **kwargs)
    if not isinstance(out, torch.Tensor):  # return_dict_in_generate
        out = out.sequences
    return out.cpu()


def _decode(tokenizer, new_ids: torch.Tensor, eos: set) -> str:
    ids = new_ids.tolist()
    for i, token in enumerate(ids):
        if token in eos:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_texts(model_or_pvm, tokenizer, prompts: Sequence[str], settings: Optional[GenerationSettings] = None,
                   *, add_special_tokens: bool = True, progress: bool = False, desc: str = "generating",
                   sort_by_length: bool = False) -> List[str]:
    """Answers of one model (plain, or a ``pyvene.IntervenableModel`` with its edits) to ready prompts.

    ``prompts`` are final texts (see :func:`build_prompt`); ``add_special_tokens`` should be
    False for prompts rendered by a chat template. ``sort_by_length``: batch prompts of similar
    token length together (less left padding to run; answers come back in the given order, and a
    prompt's answer may then differ in float rounding from the one it gets in another batch).
    """
    settings = settings or GenerationSettings()
    prompts = list(prompts)
    if sort_by_length and len(prompts) > settings.batch_size:
        lengths = [len(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        answers = generate_texts(model_or_pvm, tokenizer, [prompts[i] for i in order], settings,
                                 add_special_tokens=add_special_tokens, progress=progress, desc=desc)
        result: List[str] = [""] * len(prompts)
        for answer, i in zip(answers, order):
            result[i] = answer
        return result
    model = model_or_pvm.model if _is_intervenable(model_or_pvm) else model_or_pvm
    model.eval()
    pad = _pad_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    kwargs = _generate_kwargs(settings, pad)
    answers: List[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    try:
        for b, start in enumerate(range(0, len(prompts), settings.batch_size)):
            chunk = prompts[start:start + settings.batch_size]
            batch = encode_left_padded(tokenizer, chunk, add_special_tokens=add_special_tokens)
            if settings.do_sample:
                torch.manual_seed(settings.seed + b)
            out = _generate_batch(model_or_pvm, batch, kwargs)
            width = batch["input_ids"].shape[1]
            answers += [_decode(tokenizer, row[width:], eos) for row in out]
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return answers


def compare_generations(edited, tokenizer, questions: Sequence[str], settings: Optional[GenerationSettings] = None,
                        *, base=None, progress: bool = True) -> GenerationReport:
    """Answers of the base model and of the edited model to ``questions``.

    Args:
        edited: the edited model, a ``pyvene.IntervenableModel``.
        tokenizer: the model's tokenizer (left padding is done here; the tokenizer is not changed).
        questions: the questions (strings).
        settings: :class:`GenerationSettings` (default: greedy, 64 new tokens, batches of 8).
        base: the base model (default ``edited.model``, without hooks).
        progress: show a progress bar (on stderr).
    """
    if not _is_intervenable(edited):
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
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generating (base + edited)", unit="question")
    try:
        step = settings.batch_size
        for i in range(0, len(prompts), step):
            chunk = prompts[i:i + step]
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
    records = [GenerationRecord(q, p, b, e) for q, p, b, e in zip(questions, prompts, base_answers, edited_answers)]
    info = getattr(edited.config, "actedit", None) or {}
    name = getattr(getattr(edited.model, "config", None), "_name_or_path", None) or None
    return GenerationReport(records=records, settings={**asdict(settings), "chat_template": chat},
                            model=name, edits=list(info.get("edits", [])), seconds=seconds)


__all__ = ["GenerationRecord", "GenerationReport", "GenerationSettings", "build_prompt", "compare_generations",
           "encode_left_padded", "generate_texts", "has_chat_template", "uses_chat_template"]
