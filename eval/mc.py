"""Multiple-choice scoring that reproduces lm-eval's ``multiple_choice`` log-likelihood protocol.

Any registered task (:mod:`actedit.data.tasks`; TruthfulQA's ``truthfulqa_mc1``/``mc2`` is the
first) gives each question a context and choices; this module scores every choice as a
continuation of its context and hands the scores back to the task for its metrics.

Protocol (lm-evaluation-harness 0.4.x; checked against lm-eval 0.4.13 on TruthfulQA):

* **Tokenisation** (lm-eval's ``_encode_pair`` for causal models, :func:`encode_pair`): trailing
  whitespace of the context is moved to the front of the continuation; ``whole =
  encode(context + continuation)``, ``ctx = encode(context)``, continuation tokens =
  ``whole[len(ctx):]``; the scored sequence is ``ctx + continuation tokens``. ``encode`` is
  lm-eval's ``HFLM.tok_encode``: with ``add_bos_token=None`` (the default of recent lm-eval, e.g.
  0.4.13) the tokenizer's own default for special tokens applies (Llama-2 adds BOS, SmolLM2/GPT-2
  add none); ``True``/``False`` force ``add_special_tokens`` (older 0.4.x releases always passed
  ``False`` unless told otherwise: no BOS); a string that already starts with the text of
  the BOS token (or of EOS when there is no BOS) is encoded without special tokens. Whether the
  context starts with BOS is recorded in :attr:`MCResult.protocol`.
* **Score** of a choice: the sum of the log-probabilities (log-softmax over the vocabulary) of its
  continuation tokens. No length normalisation. Each log-probability is ``logit - logsumexp``
  with the normaliser in the model's dtype (at least float32, as lm-eval's log-softmax); the
  difference and the sum are taken in float64.
* **Aggregate**: the mean of each per-question metric, with lm-eval's standard error
  ``std(ddof=1) / sqrt(n)``.

How it is computed (equal to scoring every ``ctx + continuation`` sequence on its own with one
full forward each, to float rounding):

1. the token prefix shared by every context (TruthfulQA's primer) runs **once**; its KV cache is
   shared by every question (copied per call; the original is never mutated);
2. ``mode="packed"`` (the fast path, the default where
   :func:`~actedit.interventions.packing.supports_packing` allows it): each question's own
   context tokens and all its distinct choices are laid out one after another in rows of up to
   512 tokens, several questions per row, with a block attention mask (a choice sees the primer,
   its question's context and itself) and explicit position ids
   (:mod:`actedit.interventions.packing`). No padding, no per-row cache copies, big matrix products.
   A question's choices are laid out as a token trie: leading tokens several choices share run
   once (a quarter of TruthfulQA's choice tokens), and each choice's last token is left out (it
   predicts nothing that is scored; lm-eval drops it too);
3. ``mode="full"`` (the reference): one full forward per scored sequence, the choices of a
   question in right-padded batches. It is also the fallback where packing is not possible and
   where the edits need whole sequences (below);
4. the vocabulary projection (the model's output-embedding module) is applied only to the
   positions whose log-probabilities are needed, each once (choices sharing leading tokens are
   predicted from the same positions): a forward pre-hook on that module gathers them, so models
   that post-process logits (soft-capping, scaling) keep doing so.

pyvene: a ``pyvene.IntervenableModel`` is called through its own forward
(``pvm(base, unit_locations=None)``), so interventions run exactly as in any pyvene call. actedit
interventions choose their positions through :mod:`actedit.interventions.positions`; the scorer
describes every forward call as a piece of the scored sequence: positions are indices among the
sequence's real tokens (packed rows mark them per token with
:func:`~actedit.interventions.positions.mark_packed`), the answer starts at the context length,
and the "prompt" is the whole scored sequence, exactly as in one plain full forward. So every
policy gives the scores of the full-sequence forward: ``all`` edits every token, ``answer`` only
the continuation, ``prompt`` everything, ``generated`` nothing, ``last`` only the final token.
Edits whose intervention says it needs whole sequences
(:meth:`~actedit.interventions.base.ActEditIntervention.full_sequence_reason`: SEA's ``feature``
norm, ``from_position`` with a start below -1) are scored in ``full`` mode by ``mode="auto"``.
Interventions that are not actedit's are assumed to act position by position (pass
``mode="full"`` otherwise).

PEFT: a ``peft.PeftModel`` (e.g. the LoRA baseline of :mod:`actedit.train.lora`) is scored like a
plain model, through its own forward, in ``packed`` mode where its transformers model packs (LoRA
acts token by token, so packing is exact). PEFT injects its adapter into the base model in place,
so the base model's own forward runs the adapter too: a plain or pyvene entry whose model carries
the adapter of a PeftModel passed in the same call is scored with that adapter disabled
(PEFT's ``disable_adapter()``, around each of its forward calls), and one whose model carries an
enabled adapter of a PeftModel *not* passed is refused (it would silently score the adapter).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from actedit.data.formats import pad_id
from actedit.data.tasks import MCItem, TaskSpec, mean_stderr, task_spec
from actedit.interventions import compat, devices
from actedit.interventions.base import ActEditIntervention
from actedit.interventions.edits import base_model_of, interventions_of, is_intervenable
from actedit.interventions.packing import (
    DEFAULT_PACK_TOKENS,
    PackedBatch,
    Tree,
    capture_layer_outputs,
    common_prefix_length,
    pack_trees,
    skip_layers,
    supports_packing,
)
from actedit.interventions.positions import mark_answer_starts, mark_packed, mark_prompt_lengths
from actedit.train.lora import (
    active_adapter_layers,
    adapter_owners,
    adapter_summary,
    adapters_disabled,
    is_peft_model,
    peft_base_model,
)

MODES = ("auto", "packed", "full")
"""Scoring paths: ``packed`` (fast), ``full`` (reference), ``auto`` (packed where exact)."""


# ------------------------------------------------------------------------------ tokenisation
def encode(tokenizer, text: str, add_bos_token: Optional[bool] = None) -> List[int]:
    """lm-eval's ``HFLM.tok_encode`` (causal models).

    ``add_bos_token=None`` keeps the tokenizer's default ``add_special_tokens``; a bool forces it.
    With ``None``, a text that already starts with the text of the BOS token (EOS when there is
    no BOS) is encoded without special tokens.
    """
    kwargs: Dict[str, Any] = {} if add_bos_token is None else {"add_special_tokens": bool(add_bos_token)}
    if add_bos_token is None:
        prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix_id is not None:
            prefix_text = tokenizer.decode(prefix_id)
            if prefix_text and text.startswith(prefix_text):
                kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(
    tokenizer, context: str, continuation: str, add_bos_token: Optional[bool] = None
) -> Tuple[List[int], List[int]]:
    """lm-eval's ``_encode_pair`` (causal models): ``(context tokens, continuation tokens)``.

    Trailing whitespace of ``context`` moves to the front of ``continuation``; the continuation
    tokens are those of ``encode(context + continuation)`` after the first ``len(encode(context))``.
    """
    ctx, (cont,) = _encode_request(tokenizer, context, [continuation], add_bos_token)
    return ctx, cont


def _encode_request(
    tokenizer, context: str, continuations: Sequence[str], add_bos_token: Optional[bool] = None
) -> Tuple[List[int], List[List[int]]]:
    """:func:`encode_pair` for several continuations of one context (the context encoded once)."""
    if not context:
        raise ValueError("the context must not be empty (lm-eval handles empty contexts differently).")
    n_spaces = len(context) - len(context.rstrip())
    moved, context = (context[-n_spaces:], context[:-n_spaces]) if n_spaces else ("", context)
    ctx = encode(tokenizer, context, add_bos_token)
    conts = [encode(tokenizer, context + moved + c, add_bos_token)[len(ctx) :] for c in continuations]
    return ctx, conts


# ---------------------------------------------------------------------------------- results
@dataclass
class MCRecord:
    """Scores of one question.

    Attributes:
        index: the question's index in its task.
        choices: the continuations scored (the task's delimiter included).
        scores: summed log-probability of each choice.
        values: the task's per-question metrics (TruthfulQA: ``mc1`` 0/1, ``mc2``).
    """

    index: int
    choices: List[str]
    scores: List[float]
    values: Dict[str, float]


@dataclass
class MCResult:
    """A task's metrics for a model (or an edited model) on a list of questions.

    Attributes:
        task: the task's name.
        records: one :class:`MCRecord` per question, in input order.
        metrics: metric → mean over questions.
        stderr: metric → lm-eval's standard error of that mean.
        seconds: wall-clock time of the scoring.
        protocol: what was computed (the task's protocol, whether a BOS token starts the
            context, mode, shared prefix length, model, dtype, interventions, ...).
    """

    task: str
    records: List[MCRecord]
    metrics: Dict[str, float]
    stderr: Dict[str, float]
    seconds: float
    protocol: Dict[str, Any] = field(default_factory=dict)

    @property
    def n_questions(self) -> int:
        return len(self.records)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MCResult":
        return cls(**{**data, "records": [MCRecord(**r) for r in data["records"]]})

    def summary(self) -> str:
        shown = ", ".join(f"{m.upper()} {v:.4f} ± {self.stderr[m]:.4f}" for m, v in self.metrics.items())
        return f"{self.task} n={self.n_questions}: {shown} ({self.seconds:.1f} s, {self.protocol.get('mode')})"


# ------------------------------------------------------------------------------- the runner
def needs_full_sequences(model_or_pvm) -> List[str]:
    """Reasons why the interventions of ``model_or_pvm`` cannot be scored from a shared context.

    Empty when caching and packing are exact (see the module docstring).
    """
    return [
        reason
        for module in interventions_of(model_or_pvm)
        if isinstance(module, ActEditIntervention)
        for reason in [module.full_sequence_reason()]
        if reason
    ]


class _ScoringRunner:
    """Runs forward calls of a model, a pyvene model or a PEFT model with position bookkeeping and
    gathered logits. ``without_adapters``: PeftModels whose adapter (injected into this model) is
    disabled during every forward call."""

    def __init__(self, model_or_pvm: Any, without_adapters: Sequence[Any] = ()) -> None:
        self.pvm = model_or_pvm if is_intervenable(model_or_pvm) else None
        self.model = self.pvm.model if self.pvm is not None else model_or_pvm
        self.peft = is_peft_model(self.model)
        self.network = peft_base_model(self.model)  # the transformers model that runs
        self.without_adapters = tuple(without_adapters)
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no output embeddings (lm_head): not a causal LM.")
        self.head = head
        self.device = devices.input_device(self.model)  # a device_map model: its embedding's execution device
        self._gather: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._gathered_in_head = False
        self._handles: list = []
        self.tokens_fed = 0  # real (non-padding) tokens given to the model, over every forward call

    # hooks ---------------------------------------------------------------------------------
    def _head_pre_hook(self, module, args):
        if self._gather is None or not args:
            return None
        hidden = args[0]
        rows, cols = self._gather
        rows, cols = rows.to(hidden.device), cols.to(hidden.device)  # the head may run on another device
        if hidden.dim() != 3 or (cols.numel() and int(cols.max()) >= hidden.shape[1]):
            return None  # not the shape we prepared for (e.g. logits_to_keep): gather afterwards
        self._gathered_in_head = True
        return (hidden[rows, cols].unsqueeze(0),) + tuple(args[1:])

    @contextlib.contextmanager
    def active(self) -> Iterator["_ScoringRunner"]:
        was_training = self.model.training
        self.model.eval()
        self._handles.append(self.head.register_forward_pre_hook(self._head_pre_hook))
        if self.pvm is not None:
            compat.apply()  # pyvene must not wipe the tracker's hooks
            compat.attach_tracker(self.model)  # no-op when pyvene's wrapper already attached it
        try:
            with torch.inference_mode():
                yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self.model.train(was_training)

    # forward -------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past=None,
        *,
        rows: torch.Tensor,
        cols: torch.Tensor,
        targets: torch.Tensor,
        target_rows: Optional[torch.Tensor] = None,
        prompt_lengths: Sequence[int] = (),
        answer_starts: Sequence[int] = (),
        position_ids: Optional[torch.Tensor] = None,
        packed: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    ):
        """One forward call; returns (log-probs of ``targets``, cache).

        The logits are computed at the positions ``(rows, cols)``; target ``i`` is predicted at
        position ``target_rows[i]`` of them (default: position ``i``).

        ``packed``: per-token (positions, prompt lengths, answer starts) of packed rows, given
        instead of ``prompt_lengths``/``answer_starts`` (see :func:`mark_packed`).
        """
        base = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention_mask.to(self.device),
            "use_cache": True,
        }
        if past is not None:
            base[compat.cache_keyword(self.network)] = past
        if position_ids is not None:
            base["position_ids"] = position_ids.to(self.device)
        rows, cols, targets = rows.to(self.device), cols.to(self.device), targets.to(self.device)
        if target_rows is None:
            target_rows = torch.arange(len(targets))
        target_rows = target_rows.to(self.device)
        self._gather = (rows, cols)
        self._gathered_in_head = False
        marks: contextlib.AbstractContextManager[Any]
        self.tokens_fed += int((packed[0] >= 0).sum()) if packed is not None else int(attention_mask.sum())
        if packed is not None:  # per-token positions of packed rows
            marks = mark_packed(*packed)
        else:  # positions are those of the whole scored sequence, as in one plain forward
            stack = contextlib.ExitStack()
            stack.enter_context(mark_answer_starts(list(answer_starts)))
            stack.enter_context(mark_prompt_lengths(list(prompt_lengths)))
            marks = stack
        try:
            with marks, adapters_disabled(self.without_adapters):
                if self.pvm is not None:
                    first, second = self.pvm(base, unit_locations=None)
                    output = second if second is not None else first
                else:
                    output = self.model(**base)
        finally:
            self._gather = None
        logits = output.logits
        logits = logits[0] if self._gathered_in_head else logits[rows, cols]
        if not targets.numel():
            return logits.new_zeros(0, dtype=torch.float64), compat.returned_cache(output)
        # log p(target) = logit − logsumexp(logits): the normaliser in the logits' dtype, at least
        # float32 (lm-eval takes the whole log-softmax in the model's dtype; float64 over the
        # vocabulary was slow), the difference and sums in float64
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        # by blocks of rows: one block's logits stay in cache through logsumexp's passes
        # (max, subtract, exp, sum), faster than one call over all rows
        normaliser = torch.cat([torch.logsumexp(block, dim=-1) for block in logits.split(LOGSUMEXP_ROWS)])
        picked = logits[target_rows, targets].double() - normaliser[target_rows].double()
        return picked, compat.returned_cache(output)


LOGSUMEXP_ROWS = 16
"""Rows of logits per logsumexp call (16 rows of a 49,152-token vocabulary in fp32 are 3 MB: the
temporaries stay in cache and below the allocator's mmap threshold, where 25 MB blocks paid a page
fault per page at every call)."""

CALL_COST_TOKENS = 8
"""Fixed cost of one extra forward call (cache copy, Python overhead), in padded-token units;
used to decide when splitting a question's continuations into several batches pays off."""


def _plan_batches(lengths: Sequence[int], batch_size: int, call_cost: int = CALL_COST_TOKENS) -> List[List[int]]:
    """Split continuation indices into right-padded batches with the least padded work.

    Sorted by length (longest first), contiguous groups of at most ``batch_size`` rows; minimises
    Σ rows·longest + ``call_cost`` per batch (dynamic programming; TruthfulQA has ≤ 20 rows).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[k]: cost of the first k rows
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - batch_size), end):
            cost = best[start] + (end - start) * max(lengths[order[start]], 1) + call_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], n
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def loglikelihoods(
    model_or_pvm,
    tokenizer,
    requests: Sequence[Tuple[str, Sequence[str]]],
    *,
    batch_size: int = 32,
    add_bos_token: Optional[bool] = None,
    mode: str = "auto",
    progress: bool = False,
    desc: str = "scoring",
    info: Optional[Dict[str, Any]] = None,
    pack_tokens: int = DEFAULT_PACK_TOKENS,
) -> List[List[float]]:
    """Summed continuation log-probabilities, lm-eval's ``loglikelihood`` for causal models.

    Args:
        model_or_pvm: a transformers causal LM or a ``pyvene.IntervenableModel`` wrapping one.
        tokenizer: its tokenizer.
        requests: ``(context, [continuation, ...])`` pairs; the continuations of one context are
            scored together.
        batch_size: most rows per forward (``full`` mode).
        add_bos_token: see :func:`encode`.
        mode: ``"packed"`` (shared prefix cached once; each request's context and all its
            continuations packed into rows of ``pack_tokens`` tokens with a block mask, see
            :mod:`actedit.interventions.packing`), ``"full"`` (one full forward per scored
            sequence, the choices of a context batched) or ``"auto"`` (``packed`` when
            :func:`~actedit.interventions.packing.supports_packing` allows it and
            :func:`needs_full_sequences` finds no reason against it, else ``full``).
        progress: show a tqdm bar over requests.
        info: if given, filled with what was done (mode, shared prefix length, BOS).
        pack_tokens: most tokens per packed row (``packed`` mode).

    Returns:
        One list of floats per request, in the order of its continuations.
    """
    infos: Dict[str, Dict[str, Any]] = {}
    scores = loglikelihoods_many(
        {"model": model_or_pvm},
        tokenizer,
        requests,
        batch_size=batch_size,
        add_bos_token=add_bos_token,
        mode=mode,
        progress=progress,
        desc=desc,
        info=infos,
        pack_tokens=pack_tokens,
    )["model"]
    if info is not None:
        info.update({k: v for k, v in infos["model"].items() if k != "seconds"})
    return scores


def _choose_mode(mode: str, runner: "_ScoringRunner", reasons: List[str], longest: int) -> str:
    no_packing = supports_packing(runner.network, longest)
    if mode == "auto":
        return "full" if reasons or no_packing else "packed"
    if mode == "packed" and no_packing:
        raise ValueError(f"mode='packed' is not available for this model: {no_packing}; use mode='full'.")
    if mode == "packed" and reasons:
        raise ValueError(f"mode='packed' would not be exact: {'; '.join(reasons)}; use mode='full'.")
    return mode


def loglikelihoods_many(
    models: Dict[str, Any],
    tokenizer,
    requests: Sequence[Tuple[str, Sequence[str]]],
    *,
    batch_size: int = 32,
    add_bos_token: Optional[bool] = None,
    mode: str = "auto",
    progress: bool = False,
    desc: str = "scoring",
    info: Optional[Dict[str, Dict[str, Any]]] = None,
    pack_tokens: int = DEFAULT_PACK_TOKENS,
    share_lower_layers: bool = True,
) -> Dict[str, List[List[float]]]:
    """:func:`loglikelihoods` of several models (or edits of one model) on the same requests.

    Models scored in ``packed`` mode run batch by batch together. When ``share_lower_layers``
    is set and one entry is a plain model that the pyvene models wrap, each packed batch runs
    that model first, keeping the residual stream that leaves the decoder layer below each edit's
    lowest edited layer; every edit then skips its unedited lower layers and starts from it.
    The skipped layers would compute exactly the same tensors (same model, same inputs, same
    shapes), so the scores are those of separate runs.

    Args:
        models: name → model, pyvene model or PEFT model, scored in this order.
        info: if given, filled per name with what was done (mode, shared prefix length, BOS,
            seconds spent in that model's forward calls, layers skipped, tokens fed).
        share_lower_layers: reuse the plain model's lower layers for the edits (see above).
        Others: as in :func:`loglikelihoods`.

    Returns:
        name → one list of floats per request, in the order of its continuations.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1.")
    if not models:
        raise ValueError("loglikelihoods_many needs at least one model.")
    encoded = []
    for context, continuations in requests:
        if not continuations:
            raise ValueError("every request needs at least one continuation.")
        encoded.append(_encode_request(tokenizer, context, continuations, add_bos_token))
    runners, modes = {}, {}
    info = info if info is not None else {}
    bos = getattr(tokenizer, "bos_token_id", None)
    longest = max((len(ctx) + max(len(c) for c in conts) for ctx, conts in encoded), default=0)
    for name, model_or_pvm in models.items():
        reasons = needs_full_sequences(model_or_pvm)
        runner = runners[name] = _ScoringRunner(model_or_pvm, _adapters_to_disable(name, model_or_pvm, models))
        modes[name] = _choose_mode(mode, runner, reasons, longest)
        info[name] = dict(
            mode=modes[name],
            full_sequence_reasons=reasons,
            seconds=0.0,
            skipped_layers=0,
            bos=bool(encoded and bos is not None and encoded[0][0][:1] == [bos]),
        )
        max_len = getattr(getattr(runner.network, "config", None), "max_position_embeddings", None)
        if max_len and longest > max_len:
            raise ValueError(
                f"a scored sequence has {longest} tokens, more than the model's {max_len} "
                "positions (lm-eval would truncate it from the left; not supported)."
            )
    if not encoded:
        return {name: [] for name in models}
    pad = pad_id(tokenizer)
    # Keep at least one context token per request for its own pass: its last position predicts
    # the first continuation token.
    prefix_len = max(0, min(common_prefix_length([ctx for ctx, _ in encoded]), min(len(ctx) for ctx, _ in encoded) - 1))
    results: Dict[str, List[List[float]]] = {name: [] for name in models}
    packed = [name for name in models if modes[name] == "packed"]
    bar = tqdm(total=len(encoded) * len(models), desc=desc, disable=not progress, unit="q")
    with contextlib.ExitStack() as stack:
        for name in packed:
            stack.enter_context(runners[name].active())
        if packed:
            _score_packed_models(
                {n: runners[n] for n in packed},
                encoded,
                prefix_len,
                pack_tokens,
                pad,
                share_lower_layers,
                results,
                info,
                bar,
            )
    for name in models:
        if modes[name] != "full":
            continue
        runner, t0 = runners[name], time.perf_counter()
        with runner.active():
            for ctx, conts in encoded:
                results[name].append(_score_full(runner, ctx, conts, batch_size, pad))
                bar.update(1)
        info[name]["seconds"] += time.perf_counter() - t0
    bar.close()
    for name in models:
        info[name]["shared_prefix_tokens"] = prefix_len if modes[name] == "packed" else 0
        info[name]["tokens_fed"] = runners[name].tokens_fed
    return results


def _adapters_to_disable(name: str, model_or_pvm, models: Dict[str, Any]) -> List[Any]:
    """The PeftModels of ``models`` whose adapter is injected into the model of entry ``name``
    (not itself a PeftModel): their adapter is off while that entry runs. An enabled adapter
    without its PeftModel among ``models`` is an error (the entry would score the adapter)."""
    if is_peft_model(model_or_pvm):
        return []
    network = base_model_of(model_or_pvm)
    owners = adapter_owners(network, models.values())
    if not owners and active_adapter_layers(network):
        raise ValueError(
            f"the model of {name!r} carries an enabled PEFT adapter (PEFT injects it into the base model "
            "in place), so it would score the adapter, not the base model. Pass the PeftModel in the same "
            "call (its base is then scored without it), score inside `with peft_model.disable_adapter():`, "
            "or remove the adapter with peft_model.unload()."
        )
    return owners


def _prefix_cache(runner: "_ScoringRunner", encoded, prefix_len: int):
    """The KV cache of the prefix shared by every context (None when there is none)."""
    if prefix_len <= 0:
        return None
    ids = torch.tensor([encoded[0][0][:prefix_len]])
    empty = torch.zeros(0, dtype=torch.long)
    _, cache = runner.forward(
        ids,
        torch.ones_like(ids),
        None,
        rows=empty,
        cols=empty,
        targets=empty,
        prompt_lengths=[prefix_len + 1],
        answer_starts=[prefix_len],
    )
    return cache


def lowest_edited_layer(model_or_pvm) -> Optional[int]:
    """The lowest decoder layer an intervention of ``model_or_pvm`` acts in (None: no interventions).

    Every pyvene component of a layer (``block_input``, ``mlp_output``, heads, ...) is computed
    inside or at the entry of that decoder layer, so the layers below it run unedited.
    """
    if not is_intervenable(model_or_pvm):
        return None
    layers = [int(rep.layer) for rep in getattr(model_or_pvm.config, "representations", [])]
    return min(layers) if layers else None


def _score_packed_models(
    runners: Dict[str, "_ScoringRunner"],
    encoded,
    prefix_len: int,
    pack_tokens: int,
    pad: int,
    share_lower_layers: bool,
    results,
    info,
    bar,
) -> None:
    """Packed scoring of several models, batch by batch (see :func:`loglikelihoods_many`)."""
    reference = None
    if share_lower_layers:
        plain = [n for n, r in runners.items() if r.pvm is None and not r.peft]
        reference = plain[0] if plain else None
    starts: Dict[str, int] = {}
    if reference is not None:
        for name, runner in runners.items():
            first = lowest_edited_layer(runner.pvm) if runner.pvm is not None else None
            if first and runner.model is runners[reference].model:
                starts[name] = first
    order = ([reference] if reference is not None else []) + [n for n in runners if n != reference]
    caches = {}
    for name in order:
        t0 = time.perf_counter()
        caches[name] = _prefix_cache(runners[name], encoded, prefix_len)
        info[name]["seconds"] += time.perf_counter() - t0
    # A choice's last token predicts nothing that is scored and no other token sees it (lm-eval
    # drops it too): each branch holds the choice without its last token.
    trees = [Tree(ctx[prefix_len:], [cont[:-1] for cont in conts], offset=prefix_len) for ctx, conts in encoded]
    for batch in pack_trees(trees, pack_tokens, pad_id=pad, share_prefixes=True):
        group = [encoded[i] for i in batch.trees]
        call = _packed_call(batch, group, prefix_len)  # laid out once, used by every model
        kept: Dict[int, Any] = {}
        for name in order:
            runner, t0 = runners[name], time.perf_counter()
            if name == reference and starts:
                with capture_layer_outputs(runner.model, sorted({s - 1 for s in starts.values()}), kept):
                    scores = _score_packed(runner, call, group, caches[name])
            elif name in starts:
                with skip_layers(runner.model, starts[name], kept[starts[name] - 1]):
                    scores = _score_packed(runner, call, group, caches[name])
                info[name]["skipped_layers"] = starts[name]
            else:
                scores = _score_packed(runner, call, group, caches[name])
            results[name].extend(scores)
            info[name]["seconds"] += time.perf_counter() - t0
            bar.update(len(batch.trees))


@dataclass
class _PackedCall:
    """What one packed forward needs besides the model: the same for every model scored on it.

    ``rows``/``cols``: the positions whose logits are needed, each once; ``targets``: every
    continuation token, predicted at position ``target_rows`` of them; ``positions``,
    ``prompt``, ``answer``: per-token marks for the position policies (:func:`mark_packed`);
    ``masks``: the attention mask per model dtype, built on first use.
    """

    batch: PackedBatch
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    target_rows: torch.Tensor
    positions: torch.Tensor
    prompt: torch.Tensor
    answer: torch.Tensor
    past_length: int
    masks: Dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.masks:
            self.masks[dtype] = self.batch.attention_mask(self.past_length, dtype=dtype)
        return self.masks[dtype]


def _packed_call(
    batch: PackedBatch, requests: Sequence[Tuple[List[int], List[List[int]]]], past_length: int
) -> _PackedCall:
    """The layout of ``requests`` packed in ``batch`` (cached prefix of ``past_length`` tokens).

    Continuation token j of a choice is predicted at the position before it: the last context
    token for j = 0, else the choice's own token j - 1; the branches hold each choice without its
    last token (:func:`_score_packed_models`). Positions for the interventions are those of each
    scored sequence (context + choice), as in one plain forward: the prompt is the whole scored
    sequence and the answer starts at the context length. A token that several choices share
    (the trie of :func:`~actedit.interventions.packing.pack_trees`) is marked with the prompt
    length of the last of them; every position policy decides the same for each, since no fed
    token is among the last two of its sequence (``prompt``: all fed tokens; ``generated``,
    ``last``, ``from_position`` -1: none; ``answer`` reads the answer start, the same for all).
    """
    rows: List[int] = []
    cols: List[int] = []
    targets: List[int] = []
    target_rows: List[int] = []
    position_of: Dict[Tuple[int, int], int] = {}
    answer = torch.zeros(batch.shape, dtype=torch.long)
    prompt = torch.zeros(batch.shape, dtype=torch.long)
    for k, (ctx, conts) in enumerate(requests):
        r, c = batch.trunk_at[k]
        n_own = len(ctx) - int(batch.position_ids[r, c])
        answer[r, c : c + n_own] = len(ctx)
        prompt[r, c : c + n_own] = len(ctx) + 1
        last_ctx = c + n_own - 1
        for columns, tokens in zip(batch.branch_columns[k], conts, strict=True):
            answer[r, columns] = len(ctx)
            prompt[r, columns] = len(ctx) + len(tokens)
            for j, token in enumerate(tokens):
                at = (r, last_ctx if j == 0 else columns[j - 1])
                if at not in position_of:
                    position_of[at] = len(rows)
                    rows.append(at[0])
                    cols.append(at[1])
                target_rows.append(position_of[at])
                targets.append(token)
    positions = torch.where(batch.real, batch.position_ids, torch.full_like(batch.position_ids, -1))
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return _PackedCall(
        batch,
        as_long(rows),
        as_long(cols),
        as_long(targets),
        as_long(target_rows),
        positions,
        prompt,
        answer,
        past_length,
    )


def _score_packed(
    runner: _ScoringRunner, call: _PackedCall, requests: Sequence[Tuple[List[int], List[List[int]]]], prefix_cache
) -> List[List[float]]:
    """Score the requests laid out in ``call`` with one forward call on the shared prefix's cache."""
    batch = call.batch
    past = (
        compat.select_cache_rows(prefix_cache, torch.zeros(batch.shape[0], dtype=torch.long, device=runner.device))
        if prefix_cache is not None
        else None
    )
    picked, _ = runner.forward(
        batch.input_ids,
        call.mask(next(runner.model.parameters()).dtype),
        past,
        rows=call.rows,
        cols=call.cols,
        targets=call.targets,
        target_rows=call.target_rows,
        position_ids=batch.position_ids,
        packed=(call.positions, call.prompt, call.answer),
    )
    picked = picked.cpu()
    scores, offset = [], 0
    for _, conts in requests:
        row = []
        for tokens in conts:
            row.append(float(picked[offset : offset + len(tokens)].sum()) if tokens else 0.0)
            offset += len(tokens)
        scores.append(row)
    return scores


def _score_full(
    runner: _ScoringRunner, ctx: List[int], conts: List[List[int]], batch_size: int, pad: int
) -> List[float]:
    n_ctx = len(ctx)
    scores: List[Optional[float]] = [None] * len(conts)
    for chunk in _plan_batches([len(c) for c in conts], batch_size):
        n = len(chunk)
        lengths = [len(conts[i]) for i in chunk]
        width = n_ctx + max(lengths)
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, i in enumerate(chunk):
            seq = ctx + conts[i]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            for j, token in enumerate(conts[i]):  # position n_ctx+j-1 predicts continuation token j
                rows.append(r)
                cols.append(n_ctx + j - 1)
                targets.append(token)
        picked, _ = runner.forward(
            ids,
            mask,
            None,
            rows=torch.tensor(rows, dtype=torch.long),
            cols=torch.tensor(cols, dtype=torch.long),
            targets=torch.tensor(targets, dtype=torch.long),
            prompt_lengths=[n_ctx + length for length in lengths],
            answer_starts=[n_ctx] * n,
        )
        offset = 0
        for i in chunk:
            k = len(conts[i])
            scores[i] = float(picked[offset : offset + k].sum()) if k else 0.0
            offset += k
    return [float(cast(float, s)) for s in scores]  # every score was set above


# -------------------------------------------------------------------------------------- tasks
def _model_name(model_or_pvm) -> Optional[str]:
    config = getattr(peft_base_model(base_model_of(model_or_pvm)), "config", None)
    return getattr(config, "_name_or_path", None) or None


def score_mc(
    model_or_pvm,
    tokenizer,
    questions: Sequence,
    *,
    task="truthfulqa",
    batch_size: int = 32,
    progress: bool = True,
    add_bos_token: Optional[bool] = None,
    mode: str = "auto",
    pack_tokens: int = DEFAULT_PACK_TOKENS,
    **task_options,
) -> MCResult:
    """A task's metrics for one model or edit (TruthfulQA MC1/MC2 by default); see :func:`score_mc_many`."""
    return score_mc_many(
        {"model": model_or_pvm},
        tokenizer,
        questions,
        task=task,
        batch_size=batch_size,
        progress=progress,
        add_bos_token=add_bos_token,
        mode=mode,
        pack_tokens=pack_tokens,
        **task_options,
    )["model"]


def score_mc_many(
    models: Dict[str, Any],
    tokenizer,
    questions: Sequence,
    *,
    task="truthfulqa",
    batch_size: int = 32,
    progress: bool = True,
    add_bos_token: Optional[bool] = None,
    mode: str = "auto",
    pack_tokens: int = DEFAULT_PACK_TOKENS,
    share_lower_layers: bool = True,
    **task_options,
) -> Dict[str, MCResult]:
    """A task's metrics for several models or edits of one model, scored together.

    Args:
        models: name → transformers causal LM, ``pyvene.IntervenableModel`` or ``peft.PeftModel``.
            Put the plain model first and its pyvene edits after it: every edit then skips the
            decoder layers below its lowest edited layer and starts from the plain model's residual
            stream (:func:`loglikelihoods_many`); the scores equal those of separate runs. A base
            model passed next to a PeftModel that wraps it in place is scored without the adapter
            (module docstring).
        tokenizer: the model's tokenizer.
        questions: the task's questions (what its ``load`` returns, e.g.
            :class:`~actedit.data.truthfulqa.MCQuestion`).
        task: a registered task name or :class:`~actedit.data.tasks.TaskSpec`.
        batch_size: most continuation rows per forward (``full`` mode).
        progress: show a tqdm progress bar.
        add_bos_token: ``None`` = the tokenizer's default (recent lm-eval); ``False``/``True``
            force it (older lm-eval 0.4.x releases behaved as ``False``).
        mode: ``"auto"``, ``"packed"`` or ``"full"`` (see :func:`loglikelihoods`).
        pack_tokens: most tokens per packed row (``packed`` mode).
        task_options: the task's options (TruthfulQA: ``mc2_rule``, ``primer``); unknown ones
            are errors.

    Returns:
        name → :class:`MCResult`; ``MCResult.seconds`` is each model's own share of the time.
    """
    spec: TaskSpec = task if isinstance(task, TaskSpec) else task_spec(task)
    options = spec.options(task_options)
    questions = list(questions)
    if not questions:
        raise ValueError(f"scoring {spec.name} needs at least one question.")
    items: List[MCItem] = [spec.item(q, options) for q in questions]
    requests = [(item.context, list(item.choices)) for item in items]
    start = time.perf_counter()
    infos: Dict[str, Dict[str, Any]] = {}
    scores = loglikelihoods_many(
        models,
        tokenizer,
        requests,
        batch_size=batch_size,
        add_bos_token=add_bos_token,
        mode=mode,
        progress=progress,
        desc=spec.name,
        info=infos,
        pack_tokens=pack_tokens,
        share_lower_layers=share_lower_layers,
    )
    overhead = (time.perf_counter() - start - sum(i["seconds"] for i in infos.values())) / len(models)
    return {
        name: _result(spec, options, model_or_pvm, questions, items, scores[name], infos[name], overhead, add_bos_token)
        for name, model_or_pvm in models.items()
    }


def record_metrics(spec: TaskSpec, records: Sequence[MCRecord]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """``(metric → mean over the questions, metric → lm-eval's standard error of that mean)``."""
    metrics = {m: float(np.mean([r.values[m] for r in records])) for m in spec.metrics}
    stderr = {m: mean_stderr([r.values[m] for r in records]) for m in spec.metrics}
    return metrics, stderr


def _result(
    spec: TaskSpec,
    options,
    model_or_pvm,
    questions,
    items: List[MCItem],
    scores,
    info: Dict[str, Any],
    overhead: float,
    add_bos_token: Optional[bool],
) -> MCResult:
    records = [
        MCRecord(
            index=item.index,
            choices=list(item.choices),
            scores=[float(s) for s in values],
            values=spec.score(q, item, values, options),
        )
        for q, item, values in zip(questions, items, scores, strict=True)
    ]
    metrics, stderr = record_metrics(spec, records)
    model = base_model_of(model_or_pvm)
    protocol = {
        **spec.protocol(options),
        "task": spec.name,
        "add_bos_token": add_bos_token,
        "bos": info.get("bos"),
        "mode": info.get("mode"),
        "full_sequence_reasons": info.get("full_sequence_reasons", []),
        "shared_prefix_tokens": info.get("shared_prefix_tokens"),
        "tokens_fed": info.get("tokens_fed"),
        "shared_lower_layers": info.get("skipped_layers", 0),
        "n_questions": len(records),
        "model": _model_name(model_or_pvm),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "interventions": [type(m).__name__ for m in interventions_of(model_or_pvm)],
        "logprob_dtype": "float64",
    }
    if is_peft_model(model_or_pvm):
        protocol["peft"] = adapter_summary(model_or_pvm)
    return MCResult(
        task=spec.name,
        records=records,
        metrics=metrics,
        stderr=stderr,
        seconds=info.get("seconds", 0.0) + overhead,
        protocol=protocol,
    )


__all__ = [
    "MCRecord",
    "MCResult",
    "MODES",
    "encode",
    "encode_pair",
    "loglikelihoods",
    "loglikelihoods_many",
    "lowest_edited_layer",
    "needs_full_sequences",
    "record_metrics",
    "score_mc",
    "score_mc_many",
]
