"""LoRA fine-tuning with PEFT: the "LoRA" baseline of the HPR paper's Table 1.

HPR (Pham & Nguyen, EMNLP 2024, Sec. 4.1) compares activation editing with "the base LLM [fine-tuned]
with LoRA adapter on the same training data as activation editing methods for a fair comparison".
This module is that baseline, built on PEFT (``pip install 'actedit[lora]'``).

Model (Hu et al., 2022). Every targeted linear map W ∈ R^{d_out×d_in} becomes
W′x = Wx + (α/r) · B A dropout(x), with A ∈ R^{r×d_in} (PEFT's default initialisation:
Kaiming-uniform), B ∈ R^{d_out×r} (initialised to 0, so the adapted model starts exactly at the base
model), rank r and scale α/r. Only A and B are trained; W stays frozen.

Data: exactly what HPR trains on. The examples are the ``train`` split of the contrast dataset
(TruthfulQA: HPR's 367 training questions, :func:`actedit.data.tasks.load_contrast`), rendered by
HPR's own prompt format (:class:`~actedit.data.formats.HPRFormat`, the text HPR's activations are
collected on): the user message ``"Question: {q}\\nChoices:\\nA. ...\\nB. ...\\nAnswer:\\n"`` with the
choices lettered in HPR's seeded shuffle, through the chat template, and each response
``"X. {choice}"`` followed by the template's end-of-turn tokens. One training sequence per *correct*
response (TruthfulQA train split, SmolLM2's tokenizer: 1,171 sequences, 199,868 tokens of which
17,094 are response tokens).

Loss: supervised fine-tuning (SFT) on the positive side of the pairs, the causal-LM cross-entropy of
the response tokens given the question prompt,

    L(θ) = −(1/|R|) Σ_{(x, R_x) ∈ batch} Σ_{t ∈ R_x} log p_θ(x_t | x_<t),

where R_x are the response positions of sequence x (the tokens HPR reads) and |R| their number in the
batch; prompt and padding tokens carry the label −100 and do not count (transformers' causal-LM loss
with ``labels``). Why SFT: the paper fine-tunes "on the same training data" without naming another
objective, and plain LoRA fine-tuning is SFT on the desirable outputs; the negative responses have no
role in it. A pairwise preference loss on the (positive, negative) pairs — e.g. DPO, −log σ(β[(log
π_θ(y⁺|x) − log π_ref(y⁺|x)) − (log π_θ(y⁻|x) − log π_ref(y⁻|x))]) — would use the negatives too, but
it is a different baseline (preference optimisation, not the paper's "fine-tune with LoRA") and needs
a reference model in every step; it is left out.

Training (:func:`train_lora`): a plain torch loop. AdamW on the LoRA parameters; a linear schedule
with linear warmup (transformers' ``get_linear_schedule_with_warmup``: ⌈warmup_ratio · T⌉ warmup
steps out of T = ⌈N / batch_size⌉ · epochs); gradient-norm clipping at ``max_grad_norm``; every
epoch a fresh order of the sequences drawn from ``(seed, epoch)`` only; LoRA initialisation and
dropout seeded by ``seed`` (in a forked RNG, so the caller's random state is untouched). After each
epoch the held-out loss — the same L on the correct responses of the ``eval`` split (HPR's 41
questions), averaged over all their response tokens — is measured, and the weights of the epoch with
the lowest held-out loss are kept (HPR keeps its best epoch on the same eval split; without eval data,
the last epoch). The loss before training (the base model's) is recorded too.

The base model. PEFT injects the LoRA layers into the model it wraps, in place. By default
(``in_place=False``) :func:`train_lora` trains a deep copy, so the model passed in is never touched:
it costs one more copy of the weights for the duration of the result (SmolLM2-135M in fp32: 0.54 GB,
0.2 s to copy; a 7B model in bf16: 13.5 GB), and nothing else (the training steps are the same).
``in_place=True`` saves that memory (models that fit once but not twice); the result then wraps the
caller's model, whose forward runs the adapter until ``result.model.unload()`` (PEFT: the original
modules are put back, their weights were never changed) or inside ``with result.model.disable_adapter():``;
:func:`actedit.eval.mc.score_mc_many` and :func:`actedit.eval.analysis.analyze_edits` score a base model
passed next to its PeftModel with the adapter disabled.

Saving: ``PeftModel.save_pretrained`` into a temporary sibling directory, then the metadata
(:data:`METADATA_FILE`: settings, data, base model, losses per epoch, seconds), then one rename into
place: an interrupted save leaves no directory that loads. Anyone loads the adapter with the stock
``peft.PeftModel.from_pretrained(base_model, directory)``; :func:`load_lora` does the same with checks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from actedit.data.contrast import ContrastDataset, ContrastExample
from actedit.data.formats import HPRFormat, pad_id
from actedit.interventions.artifacts import looks_like_local_path
from actedit.interventions.devices import input_device
from actedit.interventions.edits import model_signature
from actedit.interventions.files import directory_atomic, write_json
from actedit.interventions.settings import Settings

from .lm import IGNORE_INDEX, lm_examples

INSTALL_HINT = "pip install 'actedit[lora]'"
"""How to get PEFT, named in every error about it missing."""

METADATA_FILE = "actedit_lora.json"
"""actedit's record beside the adapter's own files (PEFT ignores it when loading)."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIGNATURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim")
"""The base-model facts an adapter must agree with to load (see :func:`load_lora`)."""


# --------------------------------------------------------------------------------- PEFT glue
def require_peft() -> Any:
    """The ``peft`` module, or an ``ImportError`` that names the fix."""
    try:
        import peft  # lazy: optional dependency (the 'lora' extra)
    except ImportError as exc:
        raise ImportError(f"LoRA fine-tuning needs PEFT, which is not installed: {INSTALL_HINT}") from exc
    return peft


def is_peft_model(obj: Any) -> bool:
    """Whether ``obj`` is a ``peft.PeftModel`` (without importing PEFT: none exists unless it was imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(obj, peft.PeftModel)


def peft_base_model(obj: Any) -> Any:
    """The transformers model a ``PeftModel`` wraps (its adapter layers injected), or ``obj`` itself."""
    return obj.get_base_model() if is_peft_model(obj) else obj


def active_adapter_layers(model: Any) -> int:
    """How many PEFT adapter layers injected into ``model`` are enabled (they change its forward)."""
    peft = sys.modules.get("peft")
    if peft is None:
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer  # lazy: optional dependency, imported already

    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters)


def adapter_owners(model: Any, candidates: Iterable[Any]) -> List[Any]:
    """The ``PeftModel``s among ``candidates`` whose adapter is injected into ``model`` (the same object)."""
    return [c for c in candidates if is_peft_model(c) and c.get_base_model() is model]


@contextlib.contextmanager
def requires_grad_kept(modules: Sequence[Any]) -> Iterator[None]:
    """Put the ``requires_grad`` flag of every parameter of ``modules`` back as it was on exit
    (PEFT marks adapter weights trainable when it enables them, pyvene freezes every weight of a
    model it wraps)."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def adapters_disabled(peft_models: Sequence[Any]) -> Iterator[None]:
    """Run the base models of ``peft_models`` without their adapters (PEFT's ``disable_adapter()``),
    the parameters' ``requires_grad`` flags kept (:func:`requires_grad_kept`)."""
    if not peft_models:
        yield
        return
    with requires_grad_kept(peft_models), contextlib.ExitStack() as stack:
        for peft_model in peft_models:
            stack.enter_context(peft_model.disable_adapter())
        yield


def adapter_summary(peft_model: Any) -> Dict[str, Any]:
    """The active adapter's name, PEFT type, rank, scale and target modules (recorded with scores)."""
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    targets = config.target_modules
    return {
        "adapter": name,
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "r": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
    }


# ---------------------------------------------------------------------------------- settings
@dataclass
class LoRASettings(Settings):
    """Hyperparameters of :func:`train_lora` (a study's ``settings`` block; unknown keys are errors).

    Attributes:
        r: LoRA rank r of every adapted matrix (8: the LoRA paper's and PEFT's usual value; HPR
            gives none).
        lora_alpha: α; the update is scaled by α/r (16, i.e. a scale of 2, the common α = 2r).
        dropout: dropout on the adapter's input x in B A dropout(x) (0.05).
        target_modules: names of the linear modules that get adapters (``("q_proj", "v_proj")``,
            the attention query and value projections: Hu et al. (2022, Sec. 7.1) found adapting
            W_q and W_v the best use of a fixed parameter budget, and it is PEFT's default for
            Llama, Mistral, Qwen2 and Gemma; GPT-2-style models name theirs ``c_attn``).
        learning_rate: peak AdamW learning rate (2e-4: the LoRA fine-tuning rate of the QLoRA
            paper, Dettmers et al. 2023, for models up to 13B, widely reused by SFT recipes; the paper
            under reproduction gives none).
        epochs: passes over the training sequences (3); the best epoch by held-out loss is kept.
        batch_size: training sequences per optimiser step (8).
        max_length: longest sequence in tokens (512; TruthfulQA with SmolLM2's chat template: 372 at
            most). Longer sequences are left out with a warning (truncating would cut the response).
        warmup_ratio: fraction of the optimiser steps with a linear warmup from 0 (0.05, as the
            repository's HPR trainer).
        weight_decay: AdamW decoupled weight decay on the LoRA parameters (0).
        max_grad_norm: clip the norm of the LoRA parameters' gradient to this value (1.0).
        seed: seeds the LoRA initialisation, dropout and the per-epoch order of the sequences.
        train_split: the split of the dataset to train on (``train``); a dataset without split
            metadata is used whole.
        eval_split: the held-out split for the per-epoch loss and the choice of the best epoch
            (``eval``); None, or a dataset without that split, keeps the last epoch.
        eval_batch_size: sequences per forward when measuring the held-out loss (16).
    """

    r: int = 8
    lora_alpha: float = 16
    dropout: float = 0.05
    target_modules: Tuple[str, ...] = ("q_proj", "v_proj")
    learning_rate: float = 2e-4
    epochs: int = 3
    batch_size: int = 8
    max_length: int = 512
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    train_split: str = "train"
    eval_split: Optional[str] = "eval"
    eval_batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("r", "epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer of at least 2 tokens, got {self.max_length!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        for name in ("lora_alpha", "learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        if not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}.")
        if any(not isinstance(t, str) or not t.strip() for t in targets):
            raise ValueError(f"target_modules must hold module names (strings), got {self.target_modules!r}.")
        self.target_modules = tuple(targets)
        if not isinstance(self.train_split, str) or not self.train_split:
            raise ValueError(f"train_split must be a split name, got {self.train_split!r}.")
        if self.eval_split is not None and (not isinstance(self.eval_split, str) or not self.eval_split):
            raise ValueError(f"eval_split must be a split name or None, got {self.eval_split!r}.")
        if self.eval_split is not None and self.eval_split == self.train_split:
            raise ValueError(f"eval_split and train_split are both {self.train_split!r}; held-out data must differ.")

    def lora_config(self) -> Any:
        """PEFT's ``LoraConfig`` for these settings (causal LM, no bias terms trained)."""
        peft = require_peft()
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


# -------------------------------------------------------------------------------------- data
@dataclass
class SFTSequences:
    """Tokenised SFT data: each sequence is a prompt followed by one correct response.

    Attributes:
        prompts: token ids of each prompt (the chat template's rendering of HPR's question, up to
            the assistant's turn).
        responses: token ids of each response (the labelled tokens: HPR's read positions).
        skipped: sequences left out for being longer than ``max_length``.
    """

    prompts: List[List[int]]
    responses: List[List[int]]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompts, self.responses, strict=True))

    @property
    def n_response_tokens(self) -> int:
        return sum(len(r) for r in self.responses)

    def batch(self, indices: Sequence[int], pad_token_id: int) -> Dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask``/``labels`` (−100 on prompt and padding)."""
        return lm_examples(
            [self.prompts[i] for i in indices], [self.responses[i] for i in indices], pad_token_id=pad_token_id
        )


def sft_sequences(
    dataset: Union[ContrastDataset, Sequence[ContrastExample]],
    tokenizer: Any,
    *,
    prompt_format: Optional[HPRFormat] = None,
    max_length: int = 512,
    what: str = "training",
) -> SFTSequences:
    """The correct responses of ``dataset`` as prompt + response token ids, in HPR's format.

    ``prompt_format`` defaults to :class:`~actedit.data.formats.HPRFormat` with its defaults
    (chat template when the tokenizer has one), the format HPR collects its activations with; the
    labelled tokens are exactly the positions it reads from a positive sequence. Sequences longer
    than ``max_length`` tokens are left out with a warning (``what`` names the data in it).
    """
    fmt, _ = (prompt_format if prompt_format is not None else HPRFormat()).for_tokenizer(tokenizer)
    if not isinstance(fmt, HPRFormat):
        raise ValueError(f"prompt_format must be an HPRFormat (HPR's training text), got {type(fmt).__name__}.")
    prompts: List[List[int]] = []
    responses: List[List[int]] = []
    skipped = 0
    for index, example in enumerate(dataset):
        for seq in fmt.encode(example, tokenizer, index).sequences:
            if seq.role != "pos":
                continue
            start, end = seq.read_positions[0], seq.read_positions[-1] + 1
            if seq.read_positions != list(range(start, end)) or start < 1:
                raise ValueError(
                    f"example {example.id or index}: the response tokens are not one block after the prompt "
                    f"(positions {seq.read_positions[:5]}...)."
                )
            if end > max_length:
                skipped += 1
                continue
            prompts.append(list(seq.ids[:start]))
            responses.append(list(seq.ids[start:end]))
    if skipped:
        warnings.warn(
            f"{skipped} {what} sequence(s) longer than max_length={max_length} tokens were left out; "
            "raise settings.max_length (up to the model's max_position_embeddings) to keep them.",
            stacklevel=3,
        )
    if not prompts:
        raise ValueError(
            f"no {what} sequence left: all {skipped} are longer than max_length={max_length} tokens."
            if skipped
            else "the data holds no correct response to train on."
        )
    return SFTSequences(prompts, responses, skipped)


def _as_dataset(dataset: Any) -> ContrastDataset:
    if isinstance(dataset, ContrastDataset):
        return dataset
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise ValueError("train_lora() got no training data (an empty list of examples).")
        return ContrastDataset(dataset, name="examples")
    raise ValueError(
        f"train_lora() reads a ContrastDataset (e.g. actedit.data.tasks.load_contrast('truthfulqa', ...)), "
        f"got {type(dataset).__name__}."
    )


def _splits(dataset: ContrastDataset, settings: LoRASettings) -> Tuple[ContrastDataset, Optional[ContrastDataset]]:
    """(training examples, held-out examples or None) as :class:`LoRASettings` describes."""
    present = dataset.splits
    if not present:
        return dataset, None
    train = dataset.split(settings.train_split)  # a clear error when the split is missing
    if settings.eval_split is None:
        return train, None
    if settings.eval_split not in present:
        warnings.warn(
            f"dataset {dataset.name!r} has no {settings.eval_split!r} split (splits: {', '.join(present)}); "
            "no held-out loss, the last epoch is kept.",
            stacklevel=3,
        )
        return train, None
    return train, dataset.split(settings.eval_split)


# ------------------------------------------------------------------------------------ result
@dataclass
class LoRAEpoch:
    """One epoch of :func:`train_lora`.

    Attributes:
        epoch: 1-based epoch number.
        train_loss: the mean SFT loss over this epoch's response tokens (dropout on, weights
            changing during the epoch).
        eval_loss: the held-out SFT loss after the epoch (None without eval data).
        seconds: wall-clock time of the epoch's training steps (evaluation excluded).
        steps: optimiser steps in the epoch.
    """

    epoch: int
    train_loss: float
    eval_loss: Optional[float]
    seconds: float
    steps: int


@dataclass
class LoRAResult:
    """What :func:`train_lora` returns.

    Attributes:
        model: the ``peft.PeftModel`` (eval mode) holding the best epoch's adapter.
        settings: the settings used.
        epochs: one :class:`LoRAEpoch` per epoch.
        best_epoch: the epoch whose weights ``model`` holds.
        initial_eval_loss: the held-out loss before training, i.e. the base model's (None without eval data).
        seconds: wall-clock time of the whole call (saving included).
        data: what was trained on (dataset name and digest, sequence and token counts).
        path: the saved adapter's directory (None when not saved).
        in_place: whether ``model`` wraps the caller's model (else a deep copy of it).
    """

    model: Any
    settings: LoRASettings
    epochs: List[LoRAEpoch]
    best_epoch: int
    initial_eval_loss: Optional[float]
    seconds: float
    data: Dict[str, Any]
    path: Optional[Path] = None
    in_place: bool = False
    base_model: Dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> Dict[str, Any]:
        """The JSON record written beside the adapter (:data:`METADATA_FILE`)."""
        peft = sys.modules.get("peft")
        return {
            "format": 1,
            "method": "lora",
            "objective": "sft: causal-LM cross-entropy on the correct responses, prompt tokens masked",
            "settings": self.settings.to_dict(),
            "data": self.data,
            "base_model": self.base_model,
            "epochs": [asdict(e) for e in self.epochs],
            "best_epoch": self.best_epoch,
            "initial_eval_loss": self.initial_eval_loss,
            "seconds": self.seconds,
            "peft_version": getattr(peft, "__version__", None),
            "torch_version": torch.__version__,
        }


# ---------------------------------------------------------------------------------- training
def sft_loss(model: Any, data: SFTSequences, batch_size: int, pad_token_id: int) -> float:
    """The mean SFT loss of ``model`` over every response token of ``data`` (no gradients, eval mode kept as is).

    Each batch's mean (transformers' loss with ``labels``) is weighted by its number of labelled
    tokens, so the result is the mean over all tokens, independent of the batching.
    """
    device = input_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))), pad_token_id)
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
            total += float(loss) * n
            count += n
    return total / count


def _epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """The order of the training sequences in ``epoch``: a function of (seed, epoch) only."""
    return [int(i) for i in np.random.default_rng([int(seed), int(epoch)]).permutation(n)]


def _peft_state(peft_model: Any) -> Dict[str, torch.Tensor]:
    peft = require_peft()
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(peft_model).items()}


def train_lora(
    model: Any,
    tokenizer: Any,
    dataset: Union[ContrastDataset, Sequence[ContrastExample]],
    settings: Union[LoRASettings, Dict[str, Any], None] = None,
    out_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    *,
    in_place: bool = False,
    prompt_format: Optional[HPRFormat] = None,
) -> LoRAResult:
    """Fine-tune ``model`` with a LoRA adapter on the correct responses of ``dataset`` (module docstring).

    Args:
        model: a transformers causal LM (not already a ``PeftModel``); it trains where it is
            (device and dtype as they are; PEFT keeps the adapter in float32 for half-precision models).
        tokenizer: its tokenizer.
        dataset: contrast examples with ``train``/``eval`` split metadata (TruthfulQA:
            ``load_contrast("truthfulqa", source=...)``); see :class:`LoRASettings` for the splits.
        settings: :class:`LoRASettings`, a mapping of them (unknown keys are errors), or None (defaults).
        out_dir: save the adapter here (atomically, replacing an existing one once complete); None: not saved.
        progress: show a tqdm progress bar with the running loss.
        in_place: wrap and train ``model`` itself instead of a deep copy (saves one copy of the
            weights; see the module docstring for how to get the base model back).
        prompt_format: HPR's format with other parameters (default: ``HPRFormat()``).

    Returns:
        A :class:`LoRAResult`; ``result.model`` is the ``PeftModel`` with the best epoch's adapter.
    """
    started = time.perf_counter()
    peft = require_peft()
    if not isinstance(settings, LoRASettings):
        settings = LoRASettings.from_mapping(settings, "lora settings")
    if is_peft_model(model):
        raise ValueError("model is already a PeftModel; pass its base model (peft_model.get_base_model()).")
    if model is None or not hasattr(model, "get_output_embeddings"):
        raise ValueError(f"train_lora() needs a transformers causal LM, got {type(model).__name__}.")
    dataset = _as_dataset(dataset)
    train_set, eval_set = _splits(dataset, settings)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_length = min(settings.max_length, positions) if isinstance(positions, int) else settings.max_length
    train_data = sft_sequences(train_set, tokenizer, prompt_format=prompt_format, max_length=max_length)
    eval_data = (
        sft_sequences(eval_set, tokenizer, prompt_format=prompt_format, max_length=max_length, what="held-out")
        if eval_set is not None
        else None
    )
    pad = pad_id(tokenizer)
    signature = model_signature(model)
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]  # PEFT freezes the base model's parameters
    target = model if in_place else copy.deepcopy(model)
    with torch.random.fork_rng(devices=_rng_devices(target)):
        torch.manual_seed(settings.seed)
        try:
            peft_model = peft.get_peft_model(target, settings.lora_config())
        except ValueError as exc:
            raise ValueError(
                f"LoRA cannot adapt {type(model).__name__} with target_modules={list(settings.target_modules)}: {exc}"
            ) from exc
        try:
            epochs, best_epoch, initial = _fit(peft_model, train_data, eval_data, settings, pad, progress)
        except BaseException:
            if in_place:  # give the caller its model back as it was
                peft_model.unload()
                model.train(was_training)
                for p, flag in flags:
                    p.requires_grad_(flag)
            raise
    peft_model.eval()
    result = LoRAResult(
        model=peft_model,
        settings=settings,
        epochs=epochs,
        best_epoch=best_epoch,
        initial_eval_loss=initial,
        seconds=0.0,
        data={
            "dataset": dataset.name,
            "digest": dataset.digest(),
            "train_split": settings.train_split if dataset.splits else None,
            "eval_split": settings.eval_split if eval_data is not None else None,
            "train_examples": len(train_set),
            "train_sequences": len(train_data),
            "train_tokens": train_data.n_tokens,
            "train_response_tokens": train_data.n_response_tokens,
            "eval_examples": len(eval_set) if eval_set is not None else 0,
            "eval_sequences": len(eval_data) if eval_data is not None else 0,
            "skipped_too_long": train_data.skipped + (eval_data.skipped if eval_data is not None else 0),
            "prompt_format": (prompt_format or HPRFormat()).for_tokenizer(tokenizer)[0].params(),
            "responses": "positives (correct responses) only",
        },
        in_place=in_place,
        base_model=signature,
    )
    result.seconds = time.perf_counter() - started
    if out_dir is not None:
        result.path = save_lora(result, out_dir)
        result.seconds = time.perf_counter() - started
    return result


def _rng_devices(model: Any) -> List[int]:
    """The CUDA devices whose RNG a seeded run on ``model`` uses (dropout on the GPU)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _fit(
    peft_model: Any,
    train_data: SFTSequences,
    eval_data: Optional[SFTSequences],
    settings: LoRASettings,
    pad: int,
    progress: bool,
) -> Tuple[List[LoRAEpoch], int, Optional[float]]:
    """The training loop; leaves the best epoch's adapter weights in ``peft_model``."""
    device = input_device(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the LoRA model has no trainable parameter (check target_modules).")
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(settings.warmup_ratio * total), total)
    initial = None
    if eval_data is not None:
        peft_model.eval()
        initial = sft_loss(peft_model, eval_data, settings.eval_batch_size, pad)
    epochs: List[LoRAEpoch] = []
    best: Tuple[float, int, Optional[Dict[str, torch.Tensor]]] = (math.inf, 0, None)
    bar = tqdm(total=total, desc="lora", disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(1, settings.epochs + 1):
            peft_model.train()
            t0 = time.perf_counter()
            order = _epoch_order(len(train_data), settings.seed, epoch - 1)
            loss_sum, token_sum = 0.0, 0
            for start in range(0, len(order), settings.batch_size):
                batch = train_data.batch(order[start : start + settings.batch_size], pad)
                n = int((batch["labels"] != IGNORE_INDEX).sum())
                loss = peft_model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += float(loss.detach()) * n
                token_sum += n
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum / token_sum:.4f}")
            seconds = time.perf_counter() - t0
            peft_model.eval()
            eval_loss = (
                sft_loss(peft_model, eval_data, settings.eval_batch_size, pad) if eval_data is not None else None
            )
            epochs.append(LoRAEpoch(epoch, loss_sum / token_sum, eval_loss, seconds, steps_per_epoch))
            if eval_loss is not None:
                bar.set_postfix(epoch=epoch, loss=f"{loss_sum / token_sum:.4f}", eval=f"{eval_loss:.4f}")
            if eval_loss is not None and eval_loss < best[0]:
                best = (eval_loss, epoch, _peft_state(peft_model))
    finally:
        bar.close()
    if best[2] is None:  # no eval data: the last epoch
        return epochs, settings.epochs, initial
    if best[1] != settings.epochs:
        require_peft().set_peft_model_state_dict(peft_model, best[2])
    return epochs, best[1], initial


# ---------------------------------------------------------------------------------- save/load
def save_lora(result: LoRAResult, directory: Union[str, os.PathLike]) -> Path:
    """Save ``result.model``'s adapter and :data:`METADATA_FILE` to ``directory`` atomically.

    Everything is written into a temporary sibling directory that is renamed into place once
    complete; an existing directory is replaced only then. Loads with the stock
    ``peft.PeftModel.from_pretrained(base_model, directory)``.
    """
    directory = Path(directory).expanduser().resolve()
    with directory_atomic(directory) as tmp:
        result.model.save_pretrained(str(tmp))
        write_json(tmp / METADATA_FILE, result.metadata(), default=str)
    return directory


def lora_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The :data:`METADATA_FILE` record of a saved adapter ({} when it has none: not saved by actedit)."""
    file = Path(path).expanduser() / METADATA_FILE
    if not file.is_file():
        return {}
    with open(file) as handle:
        data: Dict[str, Any] = json.load(handle)
    return data


def _check_adapter_fits(path: Path, model: Any) -> None:
    """Refuse an adapter whose recorded base model differs from ``model`` in family or size."""
    expected = lora_metadata(path).get("base_model") or {}
    actual = model_signature(model)
    problems = [
        f"{key}: adapter {expected[key]!r}, model {actual[key]!r}"
        for key in SIGNATURE_KEYS
        if expected.get(key) is not None and actual.get(key) is not None and expected[key] != actual[key]
    ]
    if problems:
        base = expected.get("name_or_path") or expected.get("model_class") or "another model"
        raise ValueError(
            f"The LoRA adapter at {path} was trained on {base} and does not fit the given "
            f"{type(model).__name__}: {'; '.join(problems)}. Load it into the base model it was trained on."
        )


def load_lora(model: Any, path: Union[str, os.PathLike], *, is_trainable: bool = False) -> Any:
    """The ``peft.PeftModel`` of ``model`` with the LoRA adapter saved at ``path`` (eval mode).

    As PEFT's ``PeftModel.from_pretrained`` (which this calls), the adapter layers are injected
    into ``model`` in place: ``model``'s own forward runs the adapter from now on, until
    ``peft_model.unload()``; run the base model inside ``with peft_model.disable_adapter():``
    (:func:`~actedit.eval.mc.score_mc_many` does so for a base model passed next to its PeftModel).

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no adapter (a local path is never
            turned into a Hub download; Hub ids look like ``owner/name``).
        ValueError: the adapter was trained on another model (family, width, depth, heads) or its
            weights do not match the model's modules.
        ImportError: PEFT is not installed (the fix is named).
    """
    peft = require_peft()
    if is_peft_model(model):
        raise ValueError("model is already a PeftModel; pass its base model (peft_model.get_base_model()).")
    text = str(path)
    local = Path(text).expanduser()
    if local.exists():
        if not (local / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(
                f"{local} holds no {ADAPTER_CONFIG}: not a saved PEFT adapter (or an interrupted save; "
                "train_lora writes the adapter into place only once it is complete)."
            )
        _check_adapter_fits(local, model)
        source = str(local)
    elif looks_like_local_path(text, hub_needs_owner=True):
        raise FileNotFoundError(
            f"No LoRA adapter directory at {text!r}. Check the path (PEFT would have tried to download "
            f"{text!r} from the Hugging Face Hub instead); Hub repo ids look like 'owner/name'."
        )
    else:
        source = text
    try:
        peft_model = peft.PeftModel.from_pretrained(model, source, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(f"The LoRA adapter at {text} does not fit {type(model).__name__}: {exc}") from exc
    weights = local / ADAPTER_WEIGHTS if local.exists() else None
    if weights is not None and weights.is_file():
        _check_all_weights_loaded(peft, peft_model, weights, model)
    return peft_model.eval()


def _check_all_weights_loaded(peft: Any, peft_model: Any, weights: Path, model: Any) -> None:
    """PEFT only warns about adapter weights without a module (a deeper model's layers) and leaves
    modules without weights at their initialisation; refuse both (the adapter is unloaded again)."""
    from safetensors import safe_open  # lazy: only to list the saved tensors' names

    with safe_open(str(weights), framework="pt") as handle:
        saved = set(handle.keys())
    expected = set(peft.get_peft_model_state_dict(peft_model).keys())
    if saved != expected:
        peft_model.unload()
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        raise ValueError(
            f"The LoRA adapter at {weights.parent} does not fit {type(model).__name__}: "
            + (f"{len(extra)} saved tensor(s) have no module in the model (e.g. {extra[0]}); " if extra else "")
            + (f"{len(missing)} adapted module(s) have no saved tensor (e.g. {missing[0]}); " if missing else "")
            + "load it into the base model it was trained on."
        )


__all__ = [
    "INSTALL_HINT",
    "LoRAEpoch",
    "LoRAResult",
    "LoRASettings",
    "METADATA_FILE",
    "SFTSequences",
    "active_adapter_layers",
    "adapter_owners",
    "adapter_summary",
    "adapters_disabled",
    "is_peft_model",
    "load_lora",
    "lora_metadata",
    "peft_base_model",
    "require_peft",
    "requires_grad_kept",
    "save_lora",
    "sft_loss",
    "sft_sequences",
    "train_lora",
]
