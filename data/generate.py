"""Text generation with a model or an edited model, batched and left-padded.

* each prompt is formatted with ``settings.prompt_format`` and, when the tokenizer has a chat
  template (or ``use_chat_template=True``), wrapped as one user turn (after an optional system
  turn) with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; the rendered
  template is tokenised without adding special tokens again, a plain prompt with them;
* prompts are batched and **left-padded** (the tokenizer is not modified), so every row's last
  prompt token sits at the end of the batch and generation continues all rows at once;
* decoding is greedy by default; with ``do_sample=True`` the random generator is re-seeded with
  ``seed + batch index`` before each batch;
* an edited model generates with ``pvm.generate(inputs, unit_locations=None,
  intervene_on_prompt=True, ...)``: every intervention runs on every forward call (the prompt
  pass and each new token) and its stored position policy decides which positions it edits;
* answers are the new tokens only, cut at the first end-of-sequence token, decoded without
  special tokens and stripped.

:func:`generate_bases` gives SEA its base demonstrations (the model's own answers); answers
before and after an edit side by side are :func:`actedit.eval.generations.compare_generations`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Union

import torch
from tqdm.auto import tqdm

from actedit.interventions import compat, devices
from actedit.interventions.edits import base_model_of, is_intervenable, model_signature
from actedit.interventions.files import write_json

from .contrast import ContrastDataset, as_dataset, with_bases
from .distributed import run_on_main
from .formats import PromptFormat, SEAFormat, chat_text, get_format, has_chat_template, pad_id, tokenizer_fingerprint
from .models import weights_digest


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
            :func:`generate_bases`).
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
            raise ValueError(
                f"cache_implementation must be None or a string such as 'static', got {self.cache_implementation!r}."
            )


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
    return chat_text(tokenizer, messages, add_generation_prompt=True)


def encode_left_padded(tokenizer, prompts: Sequence[str], add_special_tokens: bool = True) -> Dict[str, torch.Tensor]:
    """Tokenise prompts one by one and left-pad them into ``input_ids``/``attention_mask``."""
    rows = [list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    if not rows or any(not r for r in rows):
        raise ValueError("every prompt needs at least one token.")
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _eos_ids(model, tokenizer) -> set:
    ids: Set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids


def _generate_kwargs(settings: GenerationSettings, pad: int) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "pad_token_id": pad,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:  # silence the "sampling flags set but do_sample=False" warnings of models' generation configs
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if settings.cache_implementation is not None:
        kwargs["cache_implementation"] = settings.cache_implementation
    return kwargs


@torch.no_grad()
def _generate_batch(model_or_pvm, batch: Dict[str, torch.Tensor], kwargs: Dict[str, Any]) -> torch.Tensor:
    device = devices.input_device(base_model_of(model_or_pvm))  # a device_map model: its embedding's
    if is_intervenable(model_or_pvm):
        batch = {k: v.to(device) for k, v in batch.items()}
        _, out = model_or_pvm.generate(batch, unit_locations=None, intervene_on_prompt=True, **kwargs)
    else:
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


def generate_texts(
    model_or_pvm,
    tokenizer,
    prompts: Sequence[str],
    settings: Optional[GenerationSettings] = None,
    *,
    add_special_tokens: bool = True,
    progress: bool = False,
    desc: str = "generating",
    sort_by_length: bool = False,
) -> List[str]:
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
        answers = generate_texts(
            model_or_pvm,
            tokenizer,
            [prompts[i] for i in order],
            settings,
            add_special_tokens=add_special_tokens,
            progress=progress,
            desc=desc,
        )
        result: List[str] = [""] * len(prompts)
        for answer, i in zip(answers, order, strict=True):
            result[i] = answer
        return result
    model = base_model_of(model_or_pvm)
    model.eval()
    compat.contiguous_head_input(model)  # frozen bf16 weights: see the function
    pad = pad_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    kwargs = _generate_kwargs(settings, pad)
    answers = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    try:
        for b, start in enumerate(range(0, len(prompts), settings.batch_size)):
            chunk = prompts[start : start + settings.batch_size]
            batch = encode_left_padded(tokenizer, chunk, add_special_tokens=add_special_tokens)
            if settings.do_sample:
                torch.manual_seed(settings.seed + b)
            out = _generate_batch(model_or_pvm, batch, kwargs)
            width = batch["input_ids"].shape[1]
            answers += [_decode(tokenizer, row[width:], eos) for row in out]
            bar.update(len(chunk))
    finally:
        bar.close()
    return answers


def generate_bases(
    model,
    tokenizer,
    dataset: ContrastDataset,
    format: Union[str, PromptFormat] = "sea",
    *,
    max_new_tokens: int = 32,
    batch_size: int = 128,
    cache_path: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> ContrastDataset:
    """SEA's base demonstrations: the model's own greedy completion of each example's prompt.

    The prompt is what ``format`` (a :class:`~actedit.data.formats.SEAFormat`) puts before the
    separator; the completion is cut at its first newline and stripped, and becomes the example's
    only base (:func:`actedit.data.contrast.with_bases`). With ``cache_path`` the completions are
    written there atomically (JSON, keyed by the model, tokenizer, format, settings and dataset)
    and reused by a later call with the same inputs.

    Prompts are generated in batches of similar length with a preallocated (static) KV cache
    (faster than batches in dataset order with a dynamic cache, with the same first lines).

    Under a launcher (:mod:`actedit.data.distributed`) rank 0 generates (or reads the cache) and
    hands the completions to every rank, so that all collect from the same dataset.
    """
    fmt, _ = get_format(format).for_tokenizer(tokenizer)
    if not isinstance(fmt, SEAFormat):
        raise ValueError(f"base completions are generated for SEA's format, got {fmt.name!r}.")
    data = as_dataset(dataset)
    bases = run_on_main(
        _base_completions, model, tokenizer, data, fmt, max_new_tokens, batch_size, cache_path, progress
    )
    return with_bases(data, bases)


def _base_completions(
    model,
    tokenizer,
    data: ContrastDataset,
    fmt: SEAFormat,
    max_new_tokens: int,
    batch_size: int,
    cache_path: Optional[Union[str, os.PathLike]],
    progress: bool,
) -> List[str]:
    """:func:`generate_bases`' completions, read from ``cache_path`` when it holds them."""
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, batch_size=batch_size, use_chat_template=False, cache_implementation="static"
    )
    path = Path(cache_path).expanduser() if cache_path is not None else None
    key = (
        None
        if path is None
        else {
            "model": model_signature(model),
            "weights_sha256": weights_digest(model),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "format": fmt.params(),
            "max_new_tokens": max_new_tokens,
            "dataset": data.digest(),
            "batches": "length-sorted, static cache",
        }
    )
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key and len(saved.get("bases", [])) == len(data):
            return list(saved["bases"])
    prompts = [fmt.prompt_text(example.prompt, tokenizer)[0] for example in data]
    answers = generate_texts(
        model,
        tokenizer,
        prompts,
        settings,
        add_special_tokens=not fmt.chat,
        progress=progress,
        desc="base completions",
        sort_by_length=True,
    )
    bases = [answer.split("\n", 1)[0].strip() or answer.strip() or "." for answer in answers]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "bases": bases}, ensure_ascii=False)
    return bases


__all__ = [
    "GenerationSettings",
    "build_prompt",
    "encode_left_padded",
    "generate_bases",
    "generate_texts",
    "uses_chat_template",
]
