"""Analyses of an activation edit: norms, prediction flips, layer counts, side effects.

Each analysis returns plain data (dataclasses with ``to_dict()``, JSON-serialisable); the
figures are drawn by :mod:`actedit.eval.plots`. What is measured:

* :func:`activation_norms` — the L2 norm ‖h‖ of the residual stream after each decoder block
  (pyvene component ``block_output``) at every real (non-padding) token of a fixed text sample,
  for the base model and for each edited model (HPR paper, Sec. 4.3, Fig. 3/4: "magnitude
  consistency"). Activations are read through pyvene with
  :class:`~actedit.interventions.collector.ActivationCollector`, placed
  *after* the edit at the same site, so an edited layer reports the edited activation. Summary:
  mean/std/quartiles per layer (:class:`NormStats`) and the mean relative norm drift
  |‖h'‖ − ‖h‖| / ‖h‖ per layer, token by token.
* :func:`prediction_flips` — how an edit changes per-question correctness (e.g. TruthfulQA MC1):
  False→True, True→False, remains True, remains False and the overall accuracy, in % of the
  questions (HPR paper, Table 3).
* :func:`accuracy_vs_num_layers` — a score (MC1, MC2, ...) of the edit restricted to the top-k
  ranked layers for k = 1..K (HPR paper, Appendix C, Fig. 6); :func:`restrict_layers` builds the
  restricted edit from a full one.
* :func:`side_effects` — the edit's effect on unrelated text: mean token-level LM loss
  (cross-entropy, nats) of the base and the edited model, and the mean KL(base ‖ edited) of the
  next-token distributions, over the real tokens of a fixed sample (:data:`NEUTRAL_TEXTS` by
  default).
* :func:`analyze_edits` — the three above for every edit scored against its base model (what
  ``actedit run`` and ``actedit eval`` report), with the norm and flip plots.

Texts are tokenised one by one (the tokenizer's own special tokens, e.g. BOS) and right-padded by
:func:`encode_texts`, so every real token keeps the position it has without padding; padding is
excluded from every statistic through the attention mask. Edits run under their own stored
position policy (see :mod:`actedit.interventions.positions`): an ITI edit with the ``answer``
policy, for instance, edits only the last real token of a plain forward.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyvene as pv
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from actedit.data.formats import pad_id
from actedit.eval import plots
from actedit.interventions import compat, devices
from actedit.interventions.collector import ActivationCollector
from actedit.interventions.edits import base_model_of, compose, config_of, intervenable, is_intervenable, site_width
from actedit.interventions.layers import model_depth
from actedit.train.lora import adapter_owners, adapters_disabled, is_peft_model, peft_base_model, requires_grad_kept

NEUTRAL_TEXTS: Tuple[str, ...] = (
    "The Pacific Ocean is the largest and deepest of the Earth's five oceanic divisions.",
    "Water boils at 100 degrees Celsius at sea level under standard atmospheric pressure.",
    "The human heart has four chambers: two atria and two ventricles.",
    "Mount Kilimanjaro, in Tanzania, is the highest mountain on the African continent.",
    "Photosynthesis converts light energy, water and carbon dioxide into glucose and oxygen.",
    "The violin is a string instrument usually played with a bow made of horsehair.",
    "Copper is a soft metal with very high thermal and electrical conductivity.",
    "The Great Barrier Reef lies off the coast of Queensland in northeastern Australia.",
    "A leap year has 366 days, with the extra day added at the end of February.",
    "The Danube flows through ten countries before it reaches the Black Sea.",
    "Honeybees communicate the location of flowers to each other with a waggle dance.",
    "The printing press with movable type spread across Europe in the fifteenth century.",
    "Jupiter is the fifth planet from the Sun and the largest planet in the Solar System.",
    "Bread rises because yeast ferments sugars and releases bubbles of carbon dioxide.",
    "The Sahara is the largest hot desert in the world and covers much of North Africa.",
    "A triangle's interior angles always add up to one hundred and eighty degrees.",
    "Penguins are flightless birds that live almost exclusively in the Southern Hemisphere.",
    "The Amazon rainforest spans several countries, most of it lying within Brazil.",
    "Glass is made mainly from silica sand that is melted at a very high temperature.",
    "Chess is played on a board of sixty-four squares arranged in eight rows and eight columns.",
    "The Moon's gravity is the main cause of the tides in the Earth's oceans.",
    "Maple syrup is produced by boiling down the sap collected from maple trees.",
)
"""A fixed sample of neutral, encyclopedic sentences (written for actedit) for side-effect
measurements; unrelated to TruthfulQA and to any steering behaviour."""


# ------------------------------------------------------------------------------- utilities
def _device(model) -> torch.device:
    """Where inputs of ``model`` (a model or a pyvene model) go (a ``device_map`` model: its
    embedding's execution device)."""
    return devices.input_device(base_model_of(model))


def encode_texts(
    tokenizer, texts: Sequence[str], max_length: Optional[int] = 256, add_special_tokens: bool = True
) -> Dict[str, torch.Tensor]:
    """Tokenise ``texts`` one by one and right-pad them into ``input_ids``/``attention_mask``.

    Each text gets the tokenizer's own special tokens (``add_special_tokens``) and is truncated to
    ``max_length`` tokens (``None``: no truncation). Padding uses the tokenizer's pad id (eos,
    then 0 when it has none); padded positions carry mask 0 and are never read. The tokenizer is
    not modified.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("encode_texts() needs at least one text.")
    if any(not isinstance(t, str) for t in texts):
        raise ValueError("texts must be strings.")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive or None, got {max_length}.")
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        ids = list(ids[:max_length]) if max_length is not None else list(ids)
        if not ids:
            raise ValueError(f"text {text!r} has no tokens.")
        rows.append(ids)
    pad = pad_id(tokenizer)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _check_inputs(inputs: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    if "input_ids" not in inputs:
        raise ValueError("inputs need 'input_ids' (and usually 'attention_mask'); see encode_texts().")
    ids = torch.as_tensor(inputs["input_ids"])
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(ids.shape)}.")
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} and input_ids {tuple(ids.shape)} differ in shape.")
    return ids, mask.long()


def _batches(ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, ids.shape[0], batch_size):
        m = mask[start : start + batch_size]
        width = int(m.sum(0).nonzero().max()) + 1 if bool(m.any()) else 1  # drop all-padding columns on the right
        yield {"input_ids": ids[start : start + batch_size, :width], "attention_mask": m[:, :width]}


def _forward(model_or_pvm, batch: Dict[str, torch.Tensor]):
    """One forward call of a model or a pyvene model (its edits applied); returns the model output."""
    if is_intervenable(model_or_pvm):
        first, second = model_or_pvm(dict(batch), unit_locations=None, use_cache=False)
        return second if second is not None else first  # pyvene returns (output, None) with no interventions
    return model_or_pvm(**batch, use_cache=False)


def restrict_layers(pvm, layers: Sequence[int]):
    """The edits of ``pvm`` at ``layers`` only, as a new ``IntervenableModel`` on the same base model.

    Every representation whose layer is in ``layers`` is kept (several methods may share a layer),
    in ``pvm``'s order, with the same intervention instances (nothing is copied, except a module
    the artifact holds switched off, which is switched on in a copy). An empty
    ``layers`` returns the plain base model, so that ``score(restrict_layers(pvm, top_k))`` also
    gives the baseline in :func:`accuracy_vs_num_layers`. Raises ``ValueError`` for layers that
    ``pvm`` does not edit.
    """
    if not is_intervenable(pvm):
        raise ValueError(f"restrict_layers() needs a pyvene IntervenableModel, got {type(pvm).__name__}.")
    wanted = {int(layer) for layer in layers}
    config = config_of(pvm)
    edited = {int(rep.layer) for rep in config.representations}
    unknown = sorted(wanted - edited)
    if unknown:
        raise ValueError(f"layers {unknown} are not edited; edited layers: {sorted(edited)}.")
    compat.apply()
    compat.remove_pyvene_hooks(pvm.model)
    if not wanted:
        return pvm.model
    kept = [_switched_on(rep)._asdict() for rep in config.representations if int(rep.layer) in wanted]
    return intervenable(pvm.model, pv.IntervenableConfig(representations=kept, actedit=config.actedit))


def _switched_on(rep):
    """``rep`` with its intervention switched on: a module the artifact holds switched off
    (``keep_layers: all``) is copied first, so the model it came from stays as it was."""
    module = rep.intervention
    if getattr(module, "is_enabled", True):
        return rep
    return rep._replace(intervention=copy.deepcopy(module).set_enabled(True))


def _with_collectors(model_or_pvm, layers: Sequence[int], component: str, reduce: Optional[Callable]):
    """A fresh ``IntervenableModel``: the edits of ``model_or_pvm`` (if any) + one collector per layer."""
    model = base_model_of(model_or_pvm)
    width = site_width(model, component)
    collectors = {layer: ActivationCollector(embed_dim=width, reduce=reduce) for layer in layers}
    collect_config = pv.IntervenableConfig(
        representations=[
            {"layer": layer, "component": component, "unit": "pos", "intervention": collectors[layer]}
            for layer in layers
        ]
    )
    if is_intervenable(model_or_pvm) and len(model_or_pvm.interventions) > 0:
        config = compose(config_of(model_or_pvm), collect_config)
    else:
        config = collect_config
    compat.apply()
    compat.remove_pyvene_hooks(model)  # nothing of an interrupted earlier call may linger
    return intervenable(model, config), collectors


def _resolve_layers(model, layers: Optional[Sequence[int]]) -> List[int]:
    n = model_depth(base_model_of(model))
    if layers is None:
        return list(range(n))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(f"layer {layer!r} is not a layer index of this model (0..{n - 1}).")
        if layer not in out:
            out.append(int(layer))
    if not out:
        raise ValueError("at least one layer is needed.")
    return sorted(out)


@torch.no_grad()
def layer_activations(
    model_or_pvm,
    inputs: Mapping[str, torch.Tensor],
    layers: Optional[Sequence[int]] = None,
    *,
    component: str = "block_output",
    batch_size: int = 8,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    skip_first: int = 0,
) -> Dict[int, torch.Tensor]:
    """Activations at ``component`` of each layer, for every real token of ``inputs``.

    ``model_or_pvm`` is a plain model or a ``pyvene.IntervenableModel``; for the latter its edits
    run first and the returned activations are the edited ones. The model is not modified (a
    separate ``IntervenableModel`` with the collectors is built and dropped). ``skip_first``
    leaves out the first real tokens of each row (e.g. 1: the first token, whose "massive
    activations" act as an attention sink in many models and dominate norm statistics).

    Returns:
        layer → tensor ``(n_real_tokens, ...)`` (``(n_real_tokens, d)`` without ``reduce``) on the
        CPU, tokens in row-major order of ``inputs`` (row 0's real tokens first), so results of the
        same inputs through different models align token by token.
    """
    ids, mask = _check_inputs(inputs)
    if skip_first < 0:
        raise ValueError(f"skip_first must be >= 0, got {skip_first}.")
    layers = _resolve_layers(model_or_pvm, layers)
    pvm, collectors = _with_collectors(model_or_pvm, layers, component, reduce)
    device = _device(model_or_pvm)
    parts: Dict[int, List[torch.Tensor]] = {layer: [] for layer in layers}
    for batch in _batches(ids, mask, batch_size):
        for collector in collectors.values():
            collector.clear()
        _forward(pvm, {k: v.to(device) for k, v in batch.items()})
        real = batch["attention_mask"].bool() & (batch["attention_mask"].cumsum(-1) > skip_first)
        for layer, collector in collectors.items():
            if len(collector.records) != 1:
                raise RuntimeError(f"the collector at layer {layer} ran {len(collector.records)} times in one forward.")
            value = collector.records[0]
            if tuple(value.shape[:2]) != tuple(real.shape):
                raise RuntimeError(
                    f"collected shape {tuple(value.shape)} does not match the batch {tuple(real.shape)}."
                )
            parts[layer].append(value[real.to(value.device)].float().cpu())
        for collector in collectors.values():
            collector.clear()
    if not any(len(chunk) for chunk in parts[layers[0]]):
        raise ValueError(f"no tokens left to collect (skip_first={skip_first} removes every real token).")
    return {layer: torch.cat(chunks, dim=0) for layer, chunks in parts.items()}


# ----------------------------------------------------------------------------------- norms
@dataclass
class NormStats:
    """Summary of the activation norms of one layer.

    Attributes:
        layer: layer index.
        n: number of tokens.
        mean: mean norm.
        std: population standard deviation of the norms (ddof = 0).
        min, q1, median, q3, max: five-number summary (linear-interpolation quartiles).
    """

    layer: int
    n: int
    mean: float
    std: float
    min: float
    q1: float
    median: float
    q3: float
    max: float

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"NormStats needs at least one token, got n={self.n}.")
        if not self.min <= self.q1 <= self.median <= self.q3 <= self.max:
            raise ValueError("NormStats quantiles must be ordered: min <= q1 <= median <= q3 <= max.")

    @property
    def cv(self) -> float:
        """Coefficient of variation std/mean (the spread relative to the typical norm)."""
        return self.std / self.mean if self.mean else float("nan")


def norm_statistics(norms: Sequence[float], layer: int = -1) -> NormStats:
    """Mean, population std and five-number summary of a list of norms."""
    values = torch.as_tensor(list(norms), dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("norm_statistics() needs at least one norm.")
    if not torch.isfinite(values).all():
        raise ValueError("norms contain NaN or inf values.")
    q = torch.quantile(values, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
    return NormStats(
        layer=int(layer),
        n=int(values.numel()),
        mean=float(values.mean()),
        std=float(values.std(unbiased=False)),
        min=q[0],
        q1=q[1],
        median=q[2],
        q3=q[3],
        max=q[4],
    )


def relative_drift(base_norms: Sequence[float], edited_norms: Sequence[float]) -> float:
    """Mean over tokens of |‖h'‖ − ‖h‖| / ‖h‖ (``base_norms`` and ``edited_norms`` token-aligned)."""
    base = torch.as_tensor(list(base_norms), dtype=torch.float64).reshape(-1)
    edited = torch.as_tensor(list(edited_norms), dtype=torch.float64).reshape(-1)
    if base.shape != edited.shape:
        raise ValueError(f"base ({base.numel()}) and edited ({edited.numel()}) norms must be token-aligned.")
    if base.numel() == 0:
        raise ValueError("relative_drift() needs at least one token.")
    if bool((base <= 0).any()):
        raise ValueError("base norms must be positive to measure a relative drift.")
    return float(((edited - base).abs() / base).mean())


@dataclass
class NormProfile:
    """Per-token L2 norms of one model's activations, per layer.

    Attributes:
        label: ``"base"`` or the edit's name.
        component: pyvene component read (``block_output`` = residual stream after the block).
        norms: layer → norm of each real token (row-major order of the inputs).
    """

    label: str
    component: str
    norms: Dict[int, List[float]]

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("a NormProfile needs a label.")
        self.norms = {int(k): [float(x) for x in v] for k, v in self.norms.items()}
        if not self.norms:
            raise ValueError("a NormProfile needs at least one layer.")
        lengths = {len(v) for v in self.norms.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"every layer must have the same, non-zero number of tokens; got {sorted(lengths)}.")

    @property
    def layers(self) -> List[int]:
        return sorted(self.norms)

    @property
    def n_tokens(self) -> int:
        return len(next(iter(self.norms.values())))

    def stats(self) -> Dict[int, NormStats]:
        """:class:`NormStats` per layer."""
        return {layer: norm_statistics(self.norms[layer], layer) for layer in self.layers}

    def to_dict(self) -> Dict[str, Any]:
        return {
            "label": self.label,
            "component": self.component,
            "norms": {str(k): v for k, v in sorted(self.norms.items())},
        }


@dataclass
class NormComparison:
    """Activation norms of a base model and of edited models on the same tokens.

    Attributes:
        base: the base model's :class:`NormProfile`.
        edits: edit name → :class:`NormProfile` (same layers, same tokens as ``base``).
    """

    base: NormProfile
    edits: Dict[str, NormProfile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, profile in self.edits.items():
            if name == self.base.label:
                raise ValueError(f"edit name {name!r} is the base profile's label; choose another name.")
            if profile.layers != self.base.layers or profile.n_tokens != self.base.n_tokens:
                raise ValueError(f"edit {name!r} was measured on other layers or tokens than the base model.")
            if profile.component != self.base.component:
                raise ValueError(f"edit {name!r} reads {profile.component}, the base {self.base.component}.")

    @property
    def layers(self) -> List[int]:
        return self.base.layers

    @property
    def profiles(self) -> Dict[str, NormProfile]:
        """Base first, then the edits in insertion order."""
        return {self.base.label: self.base, **self.edits}

    def stats(self) -> Dict[str, Dict[int, NormStats]]:
        """Profile label → layer → :class:`NormStats`."""
        return {label: profile.stats() for label, profile in self.profiles.items()}

    def drift(self) -> Dict[str, Dict[int, float]]:
        """Edit name → layer → mean relative norm drift |‖h'‖ − ‖h‖| / ‖h‖ against the base."""
        return {
            name: {layer: relative_drift(self.base.norms[layer], profile.norms[layer]) for layer in self.layers}
            for name, profile in self.edits.items()
        }

    def summary(self) -> Dict[str, Any]:
        """JSON-ready summary: per profile and layer, mean/std/quartiles and (edits) the drift."""
        stats, drift = self.stats(), self.drift()
        out: Dict[str, Any] = {
            "component": self.base.component,
            "n_tokens": self.base.n_tokens,
            "layers": self.layers,
            "profiles": {},
        }
        for label, per_layer in stats.items():
            rows = {}
            for layer, s in per_layer.items():
                row = asdict(s)
                row.pop("layer")
                if label in drift:
                    row["relative_drift"] = drift[label][layer]
                rows[str(layer)] = row
            out["profiles"][label] = rows
        return out

    def table(self, digits: int = 3) -> str:
        """A Markdown table: per layer, mean ± std of each profile and each edit's drift."""
        stats, drift = self.stats(), self.drift()
        head = ["layer"] + [f"{label} mean ± std" for label in stats] + [f"{name} drift" for name in drift]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer in self.layers:
            cells = [str(layer)]
            cells += [
                f"{stats[label][layer].mean:.{digits}f} ± {stats[label][layer].std:.{digits}f}" for label in stats
            ]
            cells += [f"{100 * drift[name][layer]:.{max(digits - 1, 1)}f}%" for name in drift]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "base": self.base.to_dict(),
            "edits": {k: v.to_dict() for k, v in self.edits.items()},
            "summary": self.summary(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NormComparison":
        def profile(d):
            return NormProfile(d["label"], d["component"], {int(k): v for k, v in d["norms"].items()})

        return cls(profile(data["base"]), {k: profile(v) for k, v in data.get("edits", {}).items()})


def _l2(h: torch.Tensor) -> torch.Tensor:
    return h.float().norm(dim=-1)


def collect_norms(
    model_or_pvm,
    inputs: Mapping[str, torch.Tensor],
    layers: Optional[Sequence[int]] = None,
    *,
    label: str = "base",
    component: str = "block_output",
    batch_size: int = 8,
    skip_first: int = 0,
) -> NormProfile:
    """:class:`NormProfile` of one model (plain or ``IntervenableModel``, edits applied) on ``inputs``."""
    acts = layer_activations(
        model_or_pvm, inputs, layers, component=component, batch_size=batch_size, reduce=_l2, skip_first=skip_first
    )
    return NormProfile(label, component, {layer: values.tolist() for layer, values in acts.items()})


def activation_norms(
    model,
    inputs: Mapping[str, torch.Tensor],
    edits: Optional[Mapping[str, Union[pv.IntervenableModel, pv.IntervenableConfig]]] = None,
    layers: Optional[Sequence[int]] = None,
    *,
    component: str = "block_output",
    batch_size: int = 8,
    base_label: str = "base",
    skip_first: int = 0,
) -> NormComparison:
    """Residual-stream norms per layer of the base model and of each edit, over real tokens.

    Args:
        model: the base model (a plain model, or a ``pyvene.IntervenableModel`` whose
            ``.model`` is used, without its edits).
        inputs: ``input_ids`` and ``attention_mask`` (e.g. :func:`encode_texts`).
        edits: edit name → ``IntervenableModel`` (or ``IntervenableConfig`` built for ``model``), or
            a ``peft.PeftModel`` (its adapter's activations). PEFT injects an adapter into the model
            it wraps in place: while the base model and the pyvene edits run, the adapters of the
            PeftModels given here that wrap ``model`` are disabled.
        layers: layers to read (default: all).
        component: pyvene component to read; ``block_output`` (default) is the residual stream
            after each decoder block.
        batch_size: rows per forward call.
        skip_first: leave out the first ``skip_first`` real tokens of each row (e.g. 1 for the
            first token's massive activations, which dominate means and spreads).

    Returns:
        A :class:`NormComparison` (stats, drift, table, JSON via ``to_dict``; figure via
        :func:`actedit.eval.plots.plot_norms`).
    """
    base_model = base_model_of(model)
    layers = _resolve_layers(base_model, layers)
    kw: Dict[str, Any] = dict(component=component, batch_size=batch_size, skip_first=skip_first)
    owners = adapter_owners(base_model, (edits or {}).values())
    with adapters_disabled(owners):
        base = collect_norms(base_model, inputs, layers, label=base_label, **kw)
    profiles = {}
    for name, edit in (edits or {}).items():
        if isinstance(edit, pv.IntervenableConfig):
            edit = intervenable(base_model, edit)
        if is_peft_model(edit):  # read through pyvene on its transformers model, the adapter enabled
            with adapters_disabled([o for o in owners if o is not edit]), requires_grad_kept([edit]):
                profiles[name] = collect_norms(peft_base_model(edit), inputs, layers, label=name, **kw)
            continue
        if not is_intervenable(edit):
            raise ValueError(
                f"edit {name!r} must be a pyvene IntervenableModel or IntervenableConfig (or a peft.PeftModel), "
                f"got {type(edit).__name__}."
            )
        with adapters_disabled(owners):
            profiles[name] = collect_norms(edit, inputs, layers, label=name, **kw)
    return NormComparison(base, profiles)


# ----------------------------------------------------------------------------------- flips
@dataclass
class FlipTable:
    """How an edit changes per-question correctness against the base model (HPR paper, Table 3).

    Rates are percentages of all ``n`` questions; the four outcome rates add up to 100.

    Attributes:
        n: number of questions.
        false_to_true: base wrong, edited right (%).
        true_to_false: base right, edited wrong (%).
        remains_true: right in both (%).
        remains_false: wrong in both (%).
        base_accuracy: base accuracy (%) = true_to_false + remains_true.
        accuracy: edited ("overall") accuracy (%) = false_to_true + remains_true.
        counts: the four outcomes as question counts.
    """

    n: int
    false_to_true: float
    true_to_false: float
    remains_true: float
    remains_false: float
    base_accuracy: float
    accuracy: float
    counts: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"a FlipTable needs at least one question, got n={self.n}.")
        total = self.false_to_true + self.true_to_false + self.remains_true + self.remains_false
        if abs(total - 100.0) > 1e-6:
            raise ValueError(f"the four outcome rates must add up to 100%, got {total}.")

    @property
    def shift_rate(self) -> float:
        """Behaviour shift rate (%): questions whose outcome changed, F→T + T→F."""
        return self.false_to_true + self.true_to_false

    @property
    def net_gain(self) -> float:
        """Accuracy change in percentage points, F→T − T→F."""
        return self.false_to_true - self.true_to_false

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "shift_rate": self.shift_rate, "net_gain": self.net_gain}


def _as_bools(values: Sequence, name: str) -> List[bool]:
    out = []
    for v in values:
        if isinstance(v, bool):
            out.append(v)
        elif isinstance(v, (int,)) and v in (0, 1):
            out.append(bool(v))
        elif hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1 and v.item() in (0, 1):
            out.append(bool(v.item()))
        else:
            raise ValueError(f"{name} must hold booleans (or 0/1), got {v!r}.")
    return out


def prediction_flips(base_correct: Sequence[bool], edited_correct: Sequence[bool]) -> FlipTable:
    """Flip table from two per-question correctness lists of the same questions in the same order."""
    base = _as_bools(base_correct, "base_correct")
    edited = _as_bools(edited_correct, "edited_correct")
    if len(base) != len(edited):
        raise ValueError(
            f"base ({len(base)}) and edited ({len(edited)}) correctness lists differ in length; "
            "they must cover the same questions in the same order."
        )
    if not base:
        raise ValueError("prediction_flips() needs at least one question.")
    counts = {"false_to_true": 0, "true_to_false": 0, "remains_true": 0, "remains_false": 0}
    for b, e in zip(base, edited, strict=True):
        key = ("remains_true" if e else "true_to_false") if b else ("false_to_true" if e else "remains_false")
        counts[key] += 1
    n = len(base)
    pct = {k: 100.0 * v / n for k, v in counts.items()}
    return FlipTable(n=n, **pct, base_accuracy=100.0 * sum(base) / n, accuracy=100.0 * sum(edited) / n, counts=counts)


def flips_from_records(base_records: Sequence, edited_records: Sequence, metric: str) -> FlipTable:
    """Flip table from two lists of per-question records (``MCResult.records``), matched by ``index``.

    A question counts as correct when its value of ``metric`` (a 0/1 metric such as TruthfulQA's
    ``mc1``) is 1; records are :class:`~actedit.eval.mc.MCRecord` objects or their dicts; both
    lists must cover the same questions.
    """

    def table(records):
        out = {}
        for r in records:
            index, values = (r["index"], r["values"]) if isinstance(r, Mapping) else (r.index, r.values)
            if index in out:
                raise ValueError(f"question index {index} appears twice.")
            if metric not in values:
                raise ValueError(f"the records hold no metric {metric!r} (they hold {sorted(values)}).")
            out[index] = bool(values[metric] >= 0.5)
        return out

    base, edited = table(base_records), table(edited_records)
    if set(base) != set(edited):
        missing = sorted(set(base) ^ set(edited))[:10]
        raise ValueError(f"base and edited records cover different questions (e.g. indices {missing}).")
    order = sorted(base)
    return prediction_flips([base[i] for i in order], [edited[i] for i in order])


# ---------------------------------------------------------------------------- answers picked
CONSTANT_ANSWER_SHARE = 0.95
"""An edit that picks one choice position on at least this share of questions gets a warning."""


def answer_picks(records: Sequence) -> Optional[Dict[str, float]]:
    """Which choice a model picks (the highest-scoring one, first max as ``np.argmax``), as the
    share of questions per choice position; keyed by the choice text when every question offers
    the same choices (ToxiGen's " No"/" Yes"), else ``"choice <k>"``. None when questions differ in
    their number of choices (positions are then not comparable). Records are
    :class:`~actedit.eval.mc.MCRecord` objects or their dicts."""
    rows = [r if isinstance(r, dict) else asdict(r) for r in records]
    if not rows or len({len(r["choices"]) for r in rows}) != 1:
        return None
    same = len({tuple(r["choices"]) for r in rows}) == 1
    names = (
        [c.strip() for c in rows[0]["choices"]] if same else [f"choice {k + 1}" for k in range(len(rows[0]["choices"]))]
    )
    counts = np.bincount([int(np.argmax(r["scores"])) for r in rows], minlength=len(names))
    return {name: float(count / len(rows)) for name, count in zip(names, counts, strict=True)}


def constant_answer(picks: Optional[Dict[str, float]]) -> Optional[str]:
    """The choice a model picks on at least :data:`CONSTANT_ANSWER_SHARE` of questions, or None."""
    if not picks:
        return None
    name, share = max(picks.items(), key=lambda item: item[1])
    return name if share >= CONSTANT_ANSWER_SHARE else None


# ----------------------------------------------------------------------- layers vs accuracy
@dataclass
class LayerCountCurve:
    """Scores of an edit restricted to its top-k ranked layers (HPR paper, Fig. 6).

    Attributes:
        ranked_layers: layers, best first (e.g. by probe accuracy).
        ks: the evaluated numbers of layers.
        scores: metric name → one score per k (same order as ``ks``).
        baseline: metric name → the base model's score (no layer edited), if known.
    """

    ranked_layers: List[int]
    ks: List[int]
    scores: Dict[str, List[float]]
    baseline: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.ranked_layers or len(set(self.ranked_layers)) != len(self.ranked_layers):
            raise ValueError("ranked_layers must be a non-empty list without duplicates.")
        if not self.ks or any(not 1 <= k <= len(self.ranked_layers) for k in self.ks):
            raise ValueError(f"every k must lie in 1..{len(self.ranked_layers)}, got {self.ks}.")
        if not self.scores:
            raise ValueError("a LayerCountCurve needs at least one metric.")
        for metric, values in self.scores.items():
            if len(values) != len(self.ks):
                raise ValueError(f"metric {metric!r} has {len(values)} scores for {len(self.ks)} values of k.")

    @property
    def metrics(self) -> List[str]:
        return list(self.scores)

    def best_k(self, metric: Optional[str] = None) -> int:
        """The k with the highest score of ``metric`` (default: the first metric); ties → smaller k."""
        metric = metric or self.metrics[0]
        values = self.scores[metric]
        best = max(range(len(values)), key=lambda i: (values[i], -self.ks[i]))
        return self.ks[best]

    def layers_for(self, k: int) -> List[int]:
        """The top-``k`` layers."""
        return list(self.ranked_layers[:k])

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _as_metrics(value, default_metric: str) -> Dict[str, float]:
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {default_metric: float(value)}


def accuracy_vs_num_layers(
    score: Callable[[List[int]], Union[float, Mapping[str, float]]],
    ranked_layers: Sequence[int],
    ks: Optional[Sequence[int]] = None,
    *,
    max_k: Optional[int] = None,
    baseline: Union[None, float, Mapping[str, float]] = None,
    score_base: bool = False,
    metric: str = "accuracy",
    progress: bool = False,
) -> LayerCountCurve:
    """Evaluate ``score(top_k_layers)`` for k = 1..K.

    Args:
        score: callback receiving the list of layers to edit (the top k of ``ranked_layers``, in
            rank order) and returning a score or a dict of scores (e.g. ``{"mc1": ..., "mc2": ...}``).
        ranked_layers: layers, best first.
        ks: explicit values of k (default 1..``max_k``).
        max_k: largest k (default: all ranked layers).
        baseline: the base model's score(s), drawn as horizontal lines.
        score_base: call ``score([])`` for the baseline instead (the callback must accept an
            empty list).
        metric: name of the metric when ``score`` returns a plain number.
    """
    ranked = [int(layer) for layer in ranked_layers]
    if not ranked:
        raise ValueError("ranked_layers is empty.")
    if ks is None:
        top = len(ranked) if max_k is None else int(max_k)
        if not 1 <= top <= len(ranked):
            raise ValueError(f"max_k must lie in 1..{len(ranked)}, got {max_k}.")
        ks = list(range(1, top + 1))
    ks = [int(k) for k in ks]
    base = (
        _as_metrics(score([]), metric)
        if score_base
        else (_as_metrics(baseline, metric) if baseline is not None else {})
    )
    scores: Dict[str, List[float]] = {}
    iterator = tqdm(ks, desc="layers", unit="k", disable=not progress)
    for k in iterator:
        if not 1 <= k <= len(ranked):
            raise ValueError(f"k={k} is outside 1..{len(ranked)}.")
        values = _as_metrics(score(ranked[:k]), metric)
        if scores and set(values) != set(scores):
            raise ValueError(f"score() returned metrics {sorted(values)} for k={k}, earlier {sorted(scores)}.")
        for name, value in values.items():
            scores.setdefault(name, []).append(value)
    return LayerCountCurve(ranked, ks, scores, base)


# ---------------------------------------------------------------------------- side effects
@dataclass
class SideEffects:
    """An edit's effect on unrelated text (token-level means over a fixed sample).

    Attributes:
        n_texts: number of texts.
        n_loss_tokens: predicted tokens in the LM loss (real tokens that follow a real token).
        n_kl_tokens: positions in the KL mean (every real token's next-token distribution).
        base_loss: mean cross-entropy (nats/token) of the base model.
        edited_loss: the same for the edited model.
        kl: mean KL(base ‖ edited) (nats) of the next-token distributions.
        kl_max: the largest per-token KL.
    """

    n_texts: int
    n_loss_tokens: int
    n_kl_tokens: int
    base_loss: float
    edited_loss: float
    kl: float
    kl_max: float

    def __post_init__(self) -> None:
        if self.n_texts < 1 or self.n_kl_tokens < 1:
            raise ValueError("SideEffects needs at least one text and one token.")
        if self.kl < -1e-6 or self.kl_max < -1e-6:
            raise ValueError(f"a KL divergence cannot be negative (got {self.kl}, max {self.kl_max}).")

    @property
    def loss_delta(self) -> float:
        """edited − base LM loss (nats/token); positive = the edit makes the text less likely."""
        return self.edited_loss - self.base_loss

    @property
    def base_perplexity(self) -> float:
        return math.exp(self.base_loss)

    @property
    def edited_perplexity(self) -> float:
        return math.exp(self.edited_loss)

    def to_dict(self) -> Dict[str, Any]:
        return {
            **asdict(self),
            "loss_delta": self.loss_delta,
            "base_perplexity": self.base_perplexity,
            "edited_perplexity": self.edited_perplexity,
        }


def _token_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of next-token predictions whose input and target are both real."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:]
    valid = mask[:, :-1].bool() & mask[:, 1:].bool()
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll[valid], valid


@torch.no_grad()
def lm_loss(
    model_or_pvm,
    tokenizer,
    texts: Optional[Sequence[str]] = None,
    *,
    batch_size: int = 8,
    max_length: Optional[int] = 256,
) -> float:
    """Mean token-level cross-entropy (nats) of a model (edits applied for a pyvene model) on ``texts``."""
    inputs = encode_texts(tokenizer, list(texts) if texts is not None else list(NEUTRAL_TEXTS), max_length)
    ids, mask = _check_inputs(inputs)
    device = _device(model_or_pvm)
    total, count = 0.0, 0
    for batch in _batches(ids, mask, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        losses, _ = _token_losses(_forward(model_or_pvm, batch).logits, batch["input_ids"], batch["attention_mask"])
        total += float(losses.double().sum())
        count += int(losses.numel())
    if count == 0:
        raise ValueError("no predicted tokens: every text is a single token.")
    return total / count


@torch.no_grad()
def side_effects(
    edited,
    tokenizer,
    texts: Optional[Sequence[str]] = None,
    *,
    base=None,
    batch_size: int = 8,
    max_length: Optional[int] = 256,
) -> SideEffects:
    """LM loss of base and edited model and KL(base ‖ edited) on unrelated text.

    Args:
        edited: the edited model, a ``pyvene.IntervenableModel`` (called as
            ``pvm(inputs, unit_locations=None)``; its edits follow their position policies) or a
            ``peft.PeftModel`` (e.g. the LoRA baseline).
        tokenizer: the model's tokenizer.
        texts: the sample (default :data:`NEUTRAL_TEXTS`).
        base: the base model (default ``edited.model``, run without hooks; for a PeftModel its
            transformers model, run with the adapter disabled, as is ``base`` when the PeftModel
            wraps it).
        batch_size: texts per forward call.
        max_length: truncation length in tokens.

    The loss averages over every real token that follows a real token; the KL averages
    Σ_v p_base(v) (log p_base(v) − log p_edited(v)) over every real position.
    """
    if not (is_intervenable(edited) or is_peft_model(edited)):
        raise ValueError(f"edited must be a pyvene IntervenableModel or a peft.PeftModel, got {type(edited).__name__}.")
    if base is None:
        base = peft_base_model(edited) if is_peft_model(edited) else edited.model
    else:
        base = base_model_of(base)
    without_adapter = adapter_owners(base, [edited])  # PEFT's adapter is injected into its base in place
    texts = list(texts) if texts is not None else list(NEUTRAL_TEXTS)
    ids, mask = _check_inputs(encode_texts(tokenizer, texts, max_length))
    device = _device(base)
    sums = {"base": 0.0, "edited": 0.0, "kl": 0.0}
    kl_max, n_loss, n_kl = 0.0, 0, 0
    for batch in _batches(ids, mask, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        real = batch["attention_mask"].bool()
        with adapters_disabled(without_adapter):
            base_logits = _forward(base, batch).logits.float()
        edited_logits = _forward(edited, batch).logits.float().to(device)
        for name, logits in (("base", base_logits), ("edited", edited_logits)):
            losses, _ = _token_losses(logits, batch["input_ids"], batch["attention_mask"])
            sums[name] += float(losses.double().sum())
        n_loss += int((real[:, :-1] & real[:, 1:]).sum())
        logp, logq = F.log_softmax(base_logits, dim=-1), F.log_softmax(edited_logits, dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)[real].clamp_min(0.0)
        sums["kl"] += float(kl.double().sum())
        n_kl += int(kl.numel())
        if kl.numel():
            kl_max = max(kl_max, float(kl.max()))
    if n_loss == 0:
        raise ValueError("no predicted tokens: every text is a single token.")
    return SideEffects(
        n_texts=len(texts),
        n_loss_tokens=n_loss,
        n_kl_tokens=n_kl,
        base_loss=sums["base"] / n_loss,
        edited_loss=sums["edited"] / n_loss,
        kl=sums["kl"] / n_kl,
        kl_max=kl_max,
    )


# ------------------------------------------------------------------------ edits vs their base
@dataclass
class EditAnalysis:
    """What an edit does besides its scores (see :func:`analyze_edits`).

    Attributes:
        flips: per-question changes of the task's first metric against the base model.
        side_effects: LM loss and KL to the base model on neutral text.
        norms: per layer, the relative residual-stream norm drift on the norm texts.
    """

    flips: FlipTable
    side_effects: SideEffects
    norms: Dict[int, float]

    @property
    def norm_drift(self) -> float:
        """The mean over layers of :attr:`norms`."""
        return sum(self.norms.values()) / max(len(self.norms), 1)


def analyze_edits(
    model,
    pvms: Mapping[str, Any],
    tokenizer,
    base_result,
    results: Mapping[str, Any],
    norm_texts: Sequence[str],
    *,
    metric: str,
    plot_dir: Optional[Union[str, Path]] = None,
) -> Dict[str, EditAnalysis]:
    """Flips, side effects and norm drift of every edit against its base model.

    Args:
        model: the base model.
        pvms: edit name → ``pyvene.IntervenableModel`` on ``model``, or a ``peft.PeftModel`` (of
            ``model`` or of a copy). The adapters of PeftModels that wrap ``model`` in place are
            disabled while the base model and the pyvene edits run.
        tokenizer: the model's tokenizer.
        base_result, results: the base model's and each edit's :class:`~actedit.eval.mc.MCResult`.
        norm_texts: texts whose residual-stream norms are compared (e.g. the first questions).
        metric: the 0/1 metric flips count on (the task's first metric).
        plot_dir: where ``norms.png`` and ``flips.png`` go (None: no plots).
    """
    out: Dict[str, EditAnalysis] = {}
    owners = adapter_owners(base_model_of(model), pvms.values())
    for name, pvm in pvms.items():
        with adapters_disabled([] if is_peft_model(pvm) else owners):
            side = side_effects(pvm, tokenizer, base=model)
        out[name] = EditAnalysis(
            flips=flips_from_records(base_result.records, results[name].records, metric), side_effects=side, norms={}
        )
    comparison = activation_norms(model, encode_texts(tokenizer, list(norm_texts)), pvms, skip_first=1)
    for name, layer_drift in comparison.drift().items():
        out[name].norms = layer_drift
    if plot_dir is not None:
        plots.plot_norms(comparison, Path(plot_dir) / "norms.png")
        plots.plot_flips({name: a.flips for name, a in out.items()}, Path(plot_dir) / "flips.png")
    return out


__all__ = [
    "CONSTANT_ANSWER_SHARE",
    "EditAnalysis",
    "answer_picks",
    "constant_answer",
    "FlipTable",
    "LayerCountCurve",
    "NEUTRAL_TEXTS",
    "NormComparison",
    "NormProfile",
    "NormStats",
    "SideEffects",
    "accuracy_vs_num_layers",
    "activation_norms",
    "analyze_edits",
    "collect_norms",
    "encode_texts",
    "flips_from_records",
    "layer_activations",
    "lm_loss",
    "norm_statistics",
    "prediction_flips",
    "relative_drift",
    "restrict_layers",
    "side_effects",
]
