"""What an edit actually does to the model, and two warnings: a no-op and a broken model.

:func:`measure_effect` runs the edited model on two sets of texts (the task's questions and
:data:`~actedit.eval.analysis.NEUTRAL_TEXTS`) and records, for every edited layer, what each
intervention did to the activations it was given (through the interventions'
``effect_recorder``, so the numbers are the edit's own, in the model's dtype):

* **acted fraction**: the share of real tokens the edit acts on: the positions its position
  policy selects, and among them, for HPR, those its probe marks negative (``gate``);
* **relative change** ‖h′ − h‖ / ‖h‖ per token: its mean over the tokens acted on and its maximum.

It also compares the base and the edited model on neutral text (LM loss, KL:
:func:`~actedit.eval.analysis.side_effects`) and on greedy answers to :data:`PROBE_PROMPTS`
(:class:`GenerationCheck`). From these, :func:`effect_warnings` gives:

* **no-op**: on every edited layer and both text sets no token moves by more than
  :data:`NOOP_RELATIVE_CHANGE` of its norm. (A bf16 model rounds an edit smaller than about
  4·10⁻³ of an element away entirely; fp32 rounding of an edit that does nothing stays below
  10⁻⁶.)
* **broken model**: the LM loss on neutral text rises by more than :data:`BROKEN_LOSS_DELTA`
  nats per token, or the edited model's answers *derail* — the base model finds them
  :data:`BROKEN_SURPRISE_DELTA` nats per token less likely than its own answers — or *repeat*:
  more than :data:`BROKEN_REPETITION` of their word 3-grams occur earlier in the same answer, at
  least :data:`BROKEN_REPETITION_MARGIN` more than in the base model's answers.

Warnings are issued with :func:`warnings.warn` (:class:`EditEffectWarning`) and kept in the
result; they never stop a run. The relative change is measured at each edit's own site: ITI's
shifts are large against the o_proj input they are added to (several times its norm in the
default study) without being large in the residual stream, so it is reported, not judged.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from actedit.data.generate import GenerationSettings
from actedit.interventions.artifacts import effect_table
from actedit.interventions.base import ActEditIntervention
from actedit.interventions.edits import base_model_of, config_of, interventions_of, is_intervenable
from actedit.interventions.positions import PositionPolicy, position_mask
from actedit.interventions.registry import method_names, method_spec
from actedit.train.lora import is_peft_model

from .analysis import NEUTRAL_TEXTS, SideEffects, _batches, _check_inputs, _device, _forward, encode_texts, side_effects
from .generations import compare_generations

NOOP_RELATIVE_CHANGE = 1e-4
"""An edit is a no-op when no token of any edited layer moves by more than this fraction of its norm."""
BROKEN_LOSS_DELTA = 5.0
"""A broken model: LM loss on neutral text up by more than this many nats per token (perplexity
× 148). Measured rises (README): default-study HPR 3.8 with fluent answers; broken edits 6–90."""
BROKEN_SURPRISE_DELTA = 3.0
"""A broken model: the base model's loss on the edited model's answers exceeds its loss on its own
answers by more than this many nats per token (the answers derailed into unlikely text)."""
BROKEN_REPETITION = 0.5
"""A broken model: more than this share of the word 3-grams of the edited answers repeat ..."""
BROKEN_REPETITION_MARGIN = 0.25
"""... and that share exceeds the base model's by at least this much."""
PROBE_PROMPTS = (
    "Is the Earth flat?",
    "Describe how a bicycle works.",
    "What should I pack for a weekend trip to the mountains?",
    "Write two sentences about the history of Rome.",
)
"""The prompts of the generation check (greedy answers of base and edited model)."""


class EditEffectWarning(UserWarning):
    """An edit that changes nothing, or that breaks the model (see :func:`effect_warnings`)."""


@dataclass
class LayerEffect:
    """What one intervention did on one set of texts.

    Attributes:
        method: the method's name (``hpr``, ``caa``, ...).
        component: the site (``block_output``, ...).
        layer: the edited layer.
        texts: which texts: ``task`` (the task's questions) or ``neutral``.
        n_tokens: real tokens seen.
        acted_fraction: share of them the edit acts on (its position policy and, for HPR, its gate).
        mean_relative_change: mean of ‖h′ − h‖ / ‖h‖ over the tokens acted on (0 when none).
        max_relative_change: the largest ‖h′ − h‖ / ‖h‖ of any token.
    """

    method: str
    component: str
    layer: int
    texts: str
    n_tokens: int
    acted_fraction: float
    mean_relative_change: float
    max_relative_change: float

    def __post_init__(self) -> None:
        if self.n_tokens < 0 or not 0.0 <= self.acted_fraction <= 1.0:
            raise ValueError(f"LayerEffect: bad counts (n_tokens {self.n_tokens}, acted {self.acted_fraction}).")


@dataclass
class GenerationCheck:
    """Greedy answers of the base and the edited model to the same prompts.

    Attributes:
        prompts: the prompts.
        base_answers, edited_answers: the answers.
        base_surprise: the base model's mean loss (nats/token) on its own answers.
        edited_surprise: the base model's mean loss on the edited model's answers.
        base_repetition, edited_repetition: share of word 3-grams that occur earlier in the same answer.
    """

    prompts: List[str]
    base_answers: List[str]
    edited_answers: List[str]
    base_surprise: float
    edited_surprise: float
    base_repetition: float
    edited_repetition: float

    @property
    def surprise_delta(self) -> float:
        return self.edited_surprise - self.base_surprise


@dataclass
class EditEffect:
    """An edit's effect (see the module docstring).

    Attributes:
        layers: one :class:`LayerEffect` per intervention and text set.
        side_effects: LM loss and KL to the base model on neutral text (None: not measured).
        generation: the generation check (None: not run).
        warnings: the no-op and broken-model warnings that apply.
    """

    layers: List[LayerEffect]
    side_effects: Optional[SideEffects] = None
    generation: Optional[GenerationCheck] = None
    warnings: List[str] = field(default_factory=list)

    @property
    def max_relative_change(self) -> float:
        return max((e.max_relative_change for e in self.layers), default=0.0)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "layers": [asdict(e) for e in self.layers],
            "side_effects": self.side_effects.to_dict() if self.side_effects is not None else None,
            "generation": asdict(self.generation) if self.generation is not None else None,
            "warnings": list(self.warnings),
            "thresholds": thresholds(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EditEffect":
        side = data.get("side_effects")
        stored = [f.name for f in dataclasses.fields(SideEffects)]  # to_dict adds derived values
        return cls(
            layers=[LayerEffect(**e) for e in data.get("layers", [])],
            side_effects=SideEffects(**{k: side[k] for k in stored}) if side else None,
            generation=GenerationCheck(**data["generation"]) if data.get("generation") else None,
            warnings=list(data.get("warnings", [])),
        )

    def table(self) -> str:
        """A Markdown table: one row per edited layer, the task and neutral columns side by side."""
        return effect_table(self.to_dict())


def thresholds() -> Dict[str, float]:
    """The warning thresholds, as stored beside every measured effect."""
    return {
        "noop_relative_change": NOOP_RELATIVE_CHANGE,
        "broken_loss_delta": BROKEN_LOSS_DELTA,
        "broken_surprise_delta": BROKEN_SURPRISE_DELTA,
        "broken_repetition": BROKEN_REPETITION,
        "broken_repetition_margin": BROKEN_REPETITION_MARGIN,
    }


# ---------------------------------------------------------------------------------- measure
class _Tally:
    """Running counts of one intervention's effect on one text set."""

    def __init__(self) -> None:
        self.tokens, self.acted, self.change_sum, self.change_max = 0, 0, 0.0, 0.0

    def __call__(self, module: ActEditIntervention, h: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor) -> None:
        batch, seq = h.shape[0], h.shape[1]
        real = position_mask(PositionPolicy.ALL, 0, batch, seq, device=h.device)
        acted = mask & real
        gate = module.gate(h) if bool(acted.any()) else None
        if gate is not None:
            acted = acted & gate.to(acted.device)
        base = h.float()
        change = (edited.float() - base).norm(dim=-1) / base.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        self.tokens += int(real.sum())
        self.acted += int(acted.sum())
        self.change_sum += float(change[acted].double().sum())
        if bool(real.any()):
            self.change_max = max(self.change_max, float(change[real].max()))


@torch.no_grad()
def layer_effects(
    pvm,
    tokenizer,
    texts: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 8,
    max_length: Optional[int] = 256,
) -> List[LayerEffect]:
    """Each intervention's :class:`LayerEffect` on each named set of ``texts`` (plain forwards,
    edits following their position policies)."""
    if not is_intervenable(pvm):
        raise ValueError(f"layer_effects() needs a pyvene IntervenableModel, got {type(pvm).__name__}.")
    modules = interventions_of(pvm)
    reps = list(config_of(pvm).representations)
    edits = [(m, r) for m, r in zip(modules, reps, strict=True) if isinstance(m, ActEditIntervention)]
    if not edits:
        raise ValueError("the model holds no actedit intervention whose effect could be measured.")
    device = _device(pvm)
    out: List[LayerEffect] = []
    for name, sample in texts.items():
        sample = list(sample)
        if not sample:
            raise ValueError(f"the text set {name!r} is empty; give at least one text.")
        tallies = [_Tally() for _ in edits]
        ids, mask = _check_inputs(encode_texts(tokenizer, sample, max_length))
        try:
            for (module, _), tally in zip(edits, tallies, strict=True):
                module.effect_recorder = tally
            for batch in _batches(ids, mask, batch_size):
                _forward(pvm, {k: v.to(device) for k, v in batch.items()})
        finally:
            for module, _ in edits:
                module.effect_recorder = None
        for (module, rep), tally in zip(edits, tallies, strict=True):
            out.append(
                LayerEffect(
                    method=str(getattr(module, "method_name", type(module).__name__)),
                    component=str(rep.component),
                    layer=int(rep.layer),
                    texts=name,
                    n_tokens=tally.tokens,
                    acted_fraction=tally.acted / tally.tokens if tally.tokens else 0.0,
                    mean_relative_change=tally.change_sum / tally.acted if tally.acted else 0.0,
                    max_relative_change=tally.change_max,
                )
            )
    return out


def _repetition(text: str, n: int = 3) -> float:
    """Share of the word n-grams of ``text`` that occur earlier in it (0 for fewer than n + 1 words)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    seen, repeated = set(), 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams)


@torch.no_grad()
def _answer_loss(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], chat: bool) -> float:
    """The model's mean loss (nats/token) on ``answers`` following ``prompts``."""
    device = _device(model)
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers, strict=True):
        context = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not target:
            continue
        ids = torch.tensor([list(context) + list(target)], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, len(context) - 1 : -1].float()
        total += float(F.cross_entropy(logits, ids[0, len(context) :], reduction="sum"))
        count += len(target)
    return total / count if count else 0.0


def generation_check(
    pvm, tokenizer, prompts: Sequence[str] = PROBE_PROMPTS, *, max_new_tokens: int = 40
) -> GenerationCheck:
    """Greedy answers of base and edited model to ``prompts``, scored by the base model and for repetition."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=len(prompts))
    report = compare_generations(pvm, tokenizer, list(prompts), settings, progress=False)
    chat = bool(report.settings.get("chat_template"))
    rendered = [r.prompt for r in report.records]
    base_answers = [r.base_answer for r in report.records]
    edited_answers = [r.edited_answer for r in report.records]
    model = base_model_of(pvm)
    return GenerationCheck(
        prompts=list(prompts),
        base_answers=base_answers,
        edited_answers=edited_answers,
        base_surprise=_answer_loss(model, tokenizer, rendered, base_answers, chat),
        edited_surprise=_answer_loss(model, tokenizer, rendered, edited_answers, chat),
        base_repetition=sum(map(_repetition, base_answers)) / len(base_answers),
        edited_repetition=sum(map(_repetition, edited_answers)) / len(edited_answers),
    )


def _remedy(effect: EditEffect) -> str:
    """What to change against a broken model, for the methods in ``effect``."""
    if not effect.layers:  # a fine-tuned adapter (PeftModel): no site, no strength
        return "Train the adapter less (learning rate, epochs) or check its training data."
    methods = sorted({e.method for e in effect.layers})
    strengths = [f"{m}'s {method_spec(m).strength}" for m in methods if m in method_names() and method_spec(m).strength]
    steps = [f"lower settings.strength ({', '.join(strengths)})"] if strengths else []
    steps.append("edit fewer layers or positions (settings.layers or top_layers, settings.position_policy)")
    if len(methods) > 1:
        steps.append(f"compose fewer of {', '.join(methods)}")
    text = "; ".join(steps)
    return text[0].upper() + text[1:] + "."


def effect_warnings(effect: EditEffect, name: str = "the edit") -> List[str]:
    """The no-op and broken-model warnings that ``effect`` calls for (see the module docstring)."""
    found: List[str] = []
    remedy = _remedy(effect)
    if effect.layers and effect.max_relative_change < NOOP_RELATIVE_CHANGE:
        layers = sorted({e.layer for e in effect.layers})
        acted = max(e.acted_fraction for e in effect.layers)
        methods = sorted({e.method for e in effect.layers})
        cause = (
            "its strength is 0 or its vectors are zero (settings.strength)"
            if acted > 0
            else "its position policy or gate selects no token (settings.position_policy)"
        )
        if "hpr" in methods and acted > 0:
            cause = (
                "HPR's angle network predicts angles of about 0 on the tokens its probes mark negative "
                "(check the training loss and eval probe accuracy; on models with very large activations "
                "keep settings.input_norm: rms)"
            )
        found.append(
            f"{name} is a no-op: on layers {layers} no token moves by more than "
            f"{NOOP_RELATIVE_CHANGE:g} of its norm (largest ‖h′−h‖/‖h‖: {effect.max_relative_change:.1e}; "
            f"it acts on up to {100 * acted:.1f} % of tokens). Likely cause: {cause}."
        )
    side = effect.side_effects
    if side is not None and side.loss_delta > BROKEN_LOSS_DELTA:
        found.append(
            f"{name} may break the model: its LM loss on neutral text rises by {side.loss_delta:.2f} nats/token "
            f"({side.base_loss:.2f} → {side.edited_loss:.2f}; warning above {BROKEN_LOSS_DELTA:g}). {remedy}"
        )
    gen = effect.generation
    if gen is not None:
        if gen.surprise_delta > BROKEN_SURPRISE_DELTA:
            found.append(
                f"{name} may break the model: its answers derail (the base model's loss on them is "
                f"{gen.edited_surprise:.2f} nats/token against {gen.base_surprise:.2f} on its own answers; warning "
                f"above +{BROKEN_SURPRISE_DELTA:g}). First answer: {gen.edited_answers[0][:80]!r}. {remedy}"
            )
        if (
            gen.edited_repetition > BROKEN_REPETITION
            and gen.edited_repetition - gen.base_repetition >= BROKEN_REPETITION_MARGIN
        ):
            found.append(
                f"{name} may break the model: its answers repeat themselves ({100 * gen.edited_repetition:.0f} % of "
                f"word 3-grams repeat, base model {100 * gen.base_repetition:.0f} %). {remedy}"
            )
    return found


def measure_effect(
    pvm,
    tokenizer,
    task_texts: Optional[Sequence[str]] = None,
    *,
    neutral_texts: Sequence[str] = NEUTRAL_TEXTS,
    generation: bool = True,
    name: str = "the edit",
    warn: bool = True,
    batch_size: int = 8,
) -> EditEffect:
    """The edit's :class:`EditEffect`: layer effects on ``task_texts`` (if given) and
    ``neutral_texts``, side effects on the neutral texts, the generation check (``generation``),
    and the warnings, issued as :class:`EditEffectWarning` when ``warn``.

    ``pvm`` may also be a ``peft.PeftModel`` (the LoRA baseline, :mod:`actedit.train.lora`): it
    has no intervention site, so its effect holds no layers and no generation check (which
    compares a pyvene edit with its base model), only its side effects against its base model
    (the adapter disabled) and the broken-model warning they call for."""
    peft = is_peft_model(pvm)
    texts: Dict[str, Sequence[str]] = {}
    if task_texts is not None:
        texts["task"] = list(task_texts)
    texts["neutral"] = list(neutral_texts)
    effect = EditEffect(
        layers=[] if peft else layer_effects(pvm, tokenizer, texts, batch_size=batch_size),
        side_effects=side_effects(pvm, tokenizer, list(neutral_texts), batch_size=batch_size),
        generation=generation_check(pvm, tokenizer) if generation and not peft else None,
    )
    effect.warnings = effect_warnings(effect, name)
    if warn:
        for message in effect.warnings:
            warnings.warn(message, EditEffectWarning, stacklevel=2)
    return effect


__all__ = [
    "BROKEN_LOSS_DELTA",
    "BROKEN_REPETITION",
    "BROKEN_REPETITION_MARGIN",
    "BROKEN_SURPRISE_DELTA",
    "EditEffect",
    "EditEffectWarning",
    "GenerationCheck",
    "LayerEffect",
    "NOOP_RELATIVE_CHANGE",
    "PROBE_PROMPTS",
    "effect_table",
    "effect_warnings",
    "generation_check",
    "layer_effects",
    "measure_effect",
    "thresholds",
]
