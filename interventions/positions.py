"""Position policies: which token positions an intervention edits, shared by every method.

pyvene hands an intervention the activations of *one forward call*: the whole prompt on the
first call of ``generate`` and one new token per later call (KV cache), or a whole scored
sequence. Position rules that span prompt and generated tokens (CAA "from the end of the
instruction on", ITI "answer tokens only") therefore cannot be expressed with pyvene's
``unit_locations`` (they select prompt *or* decode steps, never both). Instead every actedit
intervention is called with ``unit_locations=None`` and decides itself, per position, through a
:class:`PositionPolicy` stored in its buffers (so it survives save/load).

To decide, a policy needs to know, for the tokens of the current call, their index among the
real (non-padding) tokens of their row, how long each row's prompt is, and whether the call is
the prompt pass or a decode step. :class:`PositionTracker` derives this from three facts about
the model's own forward call: how many new tokens it runs, how many tokens its KV cache already
holds, and its attention mask (:func:`real_positions`), so the answer is identical with and
without KV cache, for one row or a left-padded batch. Which keyword arguments carry those facts
differs between transformers releases (the cache arrives as ``past_key_values`` up to 5.23 and
as ``cache`` from 5.24, ``cache_position`` only in 4.x, the mask is dropped when it is all
ones); reading them is :mod:`actedit.interventions.compat`'s job, which attaches the tracker to
every model wrapped by ``pyvene.IntervenableModel`` once actedit is imported. Without a tracker
(an intervention called directly on a tensor) the call is taken as a single un-padded prompt
pass.

Scorers mark where the answer starts in a scored sequence with :func:`mark_answer_starts`.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.types import Device

PolicyLike = Union["PositionPolicy", str, int]
"""A position policy, its name or its integer id (what :meth:`PositionPolicy.parse` accepts)."""

PerRow = Union[torch.Tensor, Sequence[int], int]
"""A per-row mark: one value per batch row (a single value applies to every row)."""


class PositionPolicy(IntEnum):
    """Which positions of a forward call an intervention edits.

    The integer values are stored in artifacts; never renumber them.
    """

    ALL = 0
    """Every real (non-padding) token of every call: the prompt and each generated token.
    HPR's published numbers edit every position of the scored sequence."""

    PROMPT = 1
    """Only tokens of the prompt pass (the first forward call of a generation, or a plain
    forward); decode steps are left untouched."""

    GENERATED = 2
    """Only generated tokens: positions at or after the prompt length of their row. A plain
    forward (prompt pass) is left untouched."""

    FROM_POSITION = 3
    """Tokens whose index among the row's real tokens is ``>= start``; a negative ``start``
    counts from the end of the prompt (``-1`` = the last prompt token and everything after it).
    CAA's "from the end of the instruction on" is ``start = instruction length``; generated
    tokens are always included when ``start`` lies inside the prompt."""

    ANSWER = 4
    """Answer tokens when scoring: positions at or after the answer start that the scorer marked
    with :func:`mark_answer_starts` (ITI's multiple-choice protocol). With no mark (plain
    generation) it falls back to :attr:`LAST`, which is what ITI's official generation code does
    (it edits the last position of each forward call)."""

    LAST = 5
    """The last prompt token and every generated token: with a KV cache, exactly the last real
    position of each forward call (HPR's demo and ITI's generation edit ``[:, -1]`` of every call);
    defined on positions so that it is the same without a cache. A plain forward edits its last
    real token."""

    @classmethod
    def parse(cls, value: "PositionPolicy | str | int") -> "PositionPolicy":
        """Accept a policy, its name (case-insensitive, ``-`` or ``_``) or its integer id."""
        if isinstance(value, PositionPolicy):
            return value
        if isinstance(value, int) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            try:
                return cls(int(value))
            except ValueError:
                pass
        elif isinstance(value, str):
            key = value.strip().upper().replace("-", "_")
            if key in cls.__members__:
                return cls[key]
        names = ", ".join(m.lower() for m in cls.__members__)
        raise ValueError(f"Unknown position policy {value!r}; choose one of: {names}.")


@dataclass
class CallPositions:
    """Where the tokens of one forward call sit in their sequences.

    Attributes:
        positions: ``(batch, seq)`` index of each token among the real tokens of its row
            (0 = first real token); ``-1`` marks padding.
        prompt_lengths: ``(batch,)`` number of real tokens in each row's prompt, or ``(batch, seq)``
            per token when a row packs several sequences (:func:`mark_packed`).
        is_prompt_pass: True when no earlier tokens are cached (first call of a generation or a
            plain forward).
        answer_starts: ``(batch,)`` (or per token, ``(batch, seq)``) index of the first answer
            token when a scorer marked it, else None.
    """

    positions: torch.Tensor
    prompt_lengths: torch.Tensor
    is_prompt_pass: bool
    answer_starts: Optional[torch.Tensor] = None
    masks: Dict[Tuple[int, int, str], Tuple[torch.Tensor, bool, bool]] = field(
        default_factory=dict, repr=False, compare=False
    )
    """What :func:`edit_positions` computed for this call: (policy, start, device) → (mask, any, all)."""

    @property
    def seq_len(self) -> int:
        return self.positions.shape[1]

    @classmethod
    def unpadded(cls, batch: int, seq: int, device: Device = None) -> "CallPositions":
        """The fallback when nothing is known: one un-padded prompt pass."""
        pos = torch.arange(seq, device=device).expand(batch, seq)
        return cls(pos, torch.full((batch,), seq, device=device), True, None)


_state = threading.local()


def _stack() -> List[Optional[CallPositions]]:
    if not hasattr(_state, "calls"):
        _state.calls = []
        _state.answer_starts = None
        _state.prompt_lengths = None
        _state.generation = None
        _state.packed = None
    calls: List[Optional[CallPositions]] = _state.calls
    return calls


def current_call() -> Optional[CallPositions]:
    """The :class:`CallPositions` of the innermost model forward now running, if tracked."""
    calls = _stack()
    return calls[-1] if calls else None


@contextlib.contextmanager
def _marked(name: str, per_row: PerRow) -> Iterator[None]:
    """Set the per-row mark ``name`` (read by :class:`PositionTracker`) for the block."""
    _stack()
    previous = getattr(_state, name)
    setattr(_state, name, torch.as_tensor(per_row, dtype=torch.long))
    try:
        yield
    finally:
        setattr(_state, name, previous)


def mark_answer_starts(answer_starts: PerRow) -> contextlib.AbstractContextManager[None]:
    """Mark, for the forward calls inside this block, where each row's answer begins.

    ``answer_starts`` holds one index per batch row, counted among the row's real tokens (the
    length of the context the answer continues). Used by multiple-choice scorers so that the
    :attr:`PositionPolicy.ANSWER` policy edits only the scored continuation.
    """
    return _marked("answer_starts", answer_starts)


def mark_prompt_lengths(prompt_lengths: PerRow) -> contextlib.AbstractContextManager[None]:
    """Mark, for the forward calls inside this block, each row's prompt length.

    ``prompt_lengths`` holds one count of real tokens per batch row; a marked call counts as the
    prompt pass. Used by scorers that feed a sequence in pieces (cached primer, then context,
    then choices) but define positions on the whole scored sequence, as one plain forward would.
    """
    return _marked("prompt_lengths", prompt_lengths)


@contextlib.contextmanager
def mark_packed(
    positions: torch.Tensor, prompt_lengths: torch.Tensor, answer_starts: Optional[torch.Tensor] = None
) -> Iterator[None]:
    """Mark, for the forward calls inside this block, per-token positions of packed rows.

    A packed row (:mod:`actedit.interventions.packing`) holds several sequences, so positions,
    prompt lengths and answer starts are given per token, each ``(batch, seq)``: the token's
    index in its own sequence (-1 for padding), the length of that sequence's prompt, and where
    its answer starts. Calls whose shape differs are tracked as usual.
    """
    _stack()
    previous = getattr(_state, "packed", None)
    _state.packed = (positions, prompt_lengths, answer_starts)
    try:
        yield
    finally:
        _state.packed = previous


@contextlib.contextmanager
def generation() -> Iterator[None]:
    """Mark a generation: its first forward call is the prompt pass, every later one a decode step.

    With a KV cache this is also what the cache says; without one (``use_cache=False``), each
    decode step re-runs the whole sequence and only this mark tells the prompt from the generated
    tokens. actedit wraps ``pyvene.IntervenableModel.generate`` in it (see ``compat``).
    """
    _stack()
    previous = getattr(_state, "generation", None)
    _state.generation = {"prompt_lengths": None}
    try:
        yield
    finally:
        _state.generation = previous


def _per_row(values: Optional[torch.Tensor], batch: int, device: Device, name: str) -> Optional[torch.Tensor]:
    """A marked per-row value (``mark_*``) broadcast to and checked against the call's batch."""
    if values is None:
        return None
    values = values.to(device)
    if values.dim() == 0:
        values = values.expand(batch)
    if values.shape[0] != batch:
        raise ValueError(
            f"{name} got {values.shape[0]} rows but the forward call has batch size {batch}; pass one value per row."
        )
    return values


def real_positions(
    batch: int, seq: int, device: Device, past_length: Optional[int], attention_mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, int]:
    """Index of each token of a forward call among the real tokens of its row, and the past length.

    ``past_length`` is the number of earlier tokens the call continues (from its cache), or None
    when the call did not say. ``attention_mask`` is the call's 2-D mask, covering the past and
    the new tokens, or None (no padding anywhere). A mask shorter than past + new tokens is taken
    to cover the newest columns (no padding in the rest); a mask longer than ``seq`` with no known
    past says how many tokens came before. Returns ``(positions (batch, seq), past)``, ``-1``
    marking padding.
    """
    mask = attention_mask
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch):
        mask = None
    if past_length is None:
        past_length = mask.shape[1] - seq if mask is not None and mask.shape[1] > seq else 0
    if mask is None:
        positions = torch.arange(past_length, past_length + seq, device=device).expand(batch, seq)
        return positions, past_length
    mask = mask.to(device=device, dtype=torch.long)
    total = past_length + seq
    if mask.shape[1] < total:
        mask = torch.cat([mask.new_ones(batch, total - mask.shape[1]), mask], dim=1)
    real_index = mask.cumsum(-1) - 1
    positions = torch.where(mask[:, -seq:] > 0, real_index[:, -seq:], -1)
    return positions, past_length


class PositionTracker:
    """Publishes the :class:`CallPositions` of each forward call of one model.

    :func:`actedit.interventions.compat.attach_tracker` registers hooks on the model that read
    what the call received (input shape, the cache's length, the attention mask; under whatever
    names the installed transformers passes them) and call :meth:`begin` before and :meth:`end`
    after the forward. Everything here is about positions, nothing about argument names.
    """

    def __init__(self) -> None:
        self._prompt_lengths: Optional[torch.Tensor] = None
        self.handles: List[Any] = []

    def begin_untracked(self) -> None:
        """A call whose inputs are not token sequences: no positions are known."""
        _stack().append(None)

    def begin(
        self,
        batch: int,
        seq: int,
        device: Device,
        *,
        past_length: Optional[int],
        attention_mask: Optional[torch.Tensor],
    ) -> CallPositions:
        """Record the positions of a call of ``batch`` rows of ``seq`` new tokens."""
        packed: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = getattr(_state, "packed", None)
        if packed is not None and tuple(packed[0].shape) == (batch, seq):
            positions, prompt_lengths, answer_starts = packed
            call = CallPositions(
                positions.to(device),
                prompt_lengths.to(device),
                True,
                answer_starts.to(device) if answer_starts is not None else None,
            )
            _stack().append(call)
            return call
        positions, past = real_positions(batch, seq, device, past_length, attention_mask)
        gen = getattr(_state, "generation", None)
        if gen is not None:  # inside generate(): the first call is the prompt pass
            is_prompt = gen["prompt_lengths"] is None
            if is_prompt:
                gen["prompt_lengths"] = positions.max(dim=1).values + 1
            prompt_lengths = gen["prompt_lengths"].to(device)
        else:
            is_prompt = past == 0
            if is_prompt or self._prompt_lengths is None or self._prompt_lengths.shape[0] != batch:
                self._prompt_lengths = positions.max(dim=1).values + 1
            prompt_lengths = self._prompt_lengths.to(device)
        marked_prompt = _per_row(getattr(_state, "prompt_lengths", None), batch, device, "mark_prompt_lengths")
        if marked_prompt is not None:
            prompt_lengths, is_prompt = marked_prompt, True
        answer_starts = _per_row(getattr(_state, "answer_starts", None), batch, device, "mark_answer_starts")
        call = CallPositions(positions, prompt_lengths, is_prompt, answer_starts)
        _stack().append(call)
        return call

    def end(self) -> None:
        calls = _stack()
        if calls:
            calls.pop()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _per_token(values: torch.Tensor, device: Device) -> torch.Tensor:
    """A per-row ``(batch,)`` value as ``(batch, 1)``; per-token ``(batch, seq)`` values as they are."""
    values = values.to(device)
    return values[:, None] if values.dim() == 1 else values


def edit_positions(
    policy: PositionPolicy, start: int, batch: int, seq: int, device: Device = None
) -> Tuple[torch.Tensor, bool, bool]:
    """``(mask, any, all)``: :func:`position_mask` of the current call and whether it marks any and
    every position. Every edited layer of a forward call asks the same, so it is computed once per
    call, policy and device: the two booleans read the mask back from the device once per call,
    not once per layer (on a GPU each read waits for every kernel queued before it)."""
    call = current_call()
    if call is None or tuple(call.positions.shape) != (batch, seq):
        mask = position_mask(policy, start, batch, seq, device, call)
        return mask, bool(mask.any()), bool(mask.all())
    key = (int(policy), int(start), str(device))
    cached = call.masks.get(key)
    if cached is None:
        mask = position_mask(policy, start, batch, seq, device, call)
        cached = call.masks[key] = (mask, bool(mask.any()), bool(mask.all()))
    return cached


def position_mask(
    policy: PositionPolicy,
    start: int,
    batch: int,
    seq: int,
    device: Device = None,
    call: Optional[CallPositions] = None,
) -> torch.Tensor:
    """Boolean ``(batch, seq)`` mask of the positions ``policy`` edits in the current call.

    ``call`` defaults to the tracked current call; if none is tracked, or its shape differs from
    ``(batch, seq)`` (the caller passed explicit pyvene ``unit_locations``), every given position
    is edited: explicit unit locations then act as the policy.
    """
    if call is None:
        call = current_call()
    if call is None:
        call = CallPositions.unpadded(batch, seq, device)
    elif tuple(call.positions.shape) != (batch, seq):
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    pos = call.positions.to(device)
    real = pos >= 0
    prompt_len = _per_token(call.prompt_lengths, device)
    if policy == PositionPolicy.ALL:
        mask = real
    elif policy == PositionPolicy.PROMPT:
        mask = real & (pos < prompt_len)
    elif policy == PositionPolicy.GENERATED:
        mask = real & (pos >= prompt_len)
    elif policy == PositionPolicy.FROM_POSITION:
        threshold = prompt_len + start if start < 0 else torch.full_like(prompt_len, start)
        mask = real & (pos >= threshold)
    elif policy == PositionPolicy.ANSWER and call.answer_starts is not None:
        mask = real & (pos >= _per_token(call.answer_starts, device))
    elif policy in (PositionPolicy.LAST, PositionPolicy.ANSWER):
        mask = real & (pos >= prompt_len - 1)
    else:  # pragma: no cover - parse() rejects anything else
        raise ValueError(f"Unknown position policy {policy!r}")
    return mask
