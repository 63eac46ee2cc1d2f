"""Bake an edit into a Hugging Face checkpoint that stock transformers (and every engine serving
the family: vLLM, TGI, SGLang, llama.cpp after conversion) loads with neither actedit nor pyvene.

An edit that adds the same vector at every position of a site whose output a linear layer
produces is that layer's bias (each method says how in its :class:`~actedit.interventions.registry.MethodSpec`'s
``bake``): ITI's shift δ of the heads' concatenated output is ``W_o·δ`` on ``o_proj``'s output
(exact whatever follows ``o_proj``); CAA's ``m·v`` on the block's output is the bias ``m·v`` of
the MLP's ``down_proj``, whose output is the last term added to the residual stream. Several
bakeable edits sum into one checkpoint.

The family must load those biases: its config has a flag that turns them on (Llama's
``attention_bias`` for q, k, v and o; ``mlp_bias`` for gate, up and down), the flag is set and
every bias it implies is written (zeros for all but the baked ones), since vLLM drops a ``.bias``
tensor without its flag and fails on a flag without every bias it implies. Families without a
slot are refused by name (:data:`BIAS_FAMILIES` lists the supported ones), and so is what no bias
reproduces: HPR's gated, per-activation rotation, SEA's per-token norm restoration, Diff's
network, ActAdd's first prompt positions, and any edit that does not act at every position (a
policy other than ``all`` or ``from_position`` from 0; ``every_position=True`` bakes such an edit
at every position instead, which changes it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union, cast

import torch
from transformers import AutoModelForCausalLM

from actedit.interventions.artifacts import load_artifact
from actedit.interventions.edits import config_of, is_intervenable
from actedit.interventions.files import directory_atomic, write_atomic, write_json
from actedit.interventions.packing import decoder_layer
from actedit.interventions.positions import PositionPolicy
from actedit.interventions.registry import BakedBias, spec_of


@dataclass(frozen=True)
class BiasFamily:
    """Where a model family keeps the biases a baked edit needs.

    Attributes:
        slots: slot (``o_proj``, ``down_proj``) → (module path inside a decoder layer, the config
            flag that gives it a bias, whether its output is added to the residual stream as it is).
        implied: config flag → every module path inside a decoder layer whose bias it turns on.
    """

    slots: Dict[str, Tuple[str, str, bool]]
    implied: Dict[str, Tuple[str, ...]]


_LLAMA = BiasFamily(
    slots={
        "o_proj": ("self_attn.o_proj", "attention_bias", True),
        "down_proj": ("mlp.down_proj", "mlp_bias", True),
    },
    implied={
        "attention_bias": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        "mlp_bias": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    },
)

_GEMMA3 = BiasFamily(
    # o_proj's output passes post_attention_layernorm before the residual add: a bias there is
    # exact for ITI (W_o·δ equals shifting o_proj's input) but is not a residual shift
    slots={"o_proj": ("self_attn.o_proj", "attention_bias", False)},
    implied={"attention_bias": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")},
)

BIAS_FAMILIES: Dict[str, BiasFamily] = {"llama": _LLAMA, "gemma3_text": _GEMMA3}
"""``model_type`` → where it keeps the biases. Gemma-3 (text) has ``attention_bias`` but no
``mlp_bias`` and normalises the attention and MLP outputs before the residual add, so it takes
ITI's o_proj bias only (transformers 4.57 and 5.24: ``Gemma3Attention.o_proj`` has
``bias=config.attention_bias``). Qwen2 has no o_proj or down_proj bias in transformers, vLLM or
llama.cpp; Mistral's config has no bias flags."""


class ExportError(ValueError):
    """An edit or a model that cannot become a checkpoint, with the reason."""


@dataclass
class BakedEdit:
    """What :func:`bake_biases` found: per (layer, slot), the summed bias, what went into it, the
    config flags it needs and where the model's family keeps the slots."""

    biases: Dict[Tuple[int, str], torch.Tensor]
    edits: List[Dict[str, Any]]
    flags: Tuple[str, ...]
    family: BiasFamily

    def slot_module(self, model: Any, layer: int, slot: str) -> torch.nn.Module:
        """The module of ``model`` (of this family) whose bias holds ``slot`` of decoder layer ``layer``."""
        return _module_at(model, layer, self.family.slots[slot][0])


def _family(model: Any) -> Tuple[str, BiasFamily]:
    model_type = str(getattr(model.config, "model_type", type(model).__name__))
    family = BIAS_FAMILIES.get(model_type)
    if family is None:
        raise ExportError(
            f"{model_type} models have no o_proj/down_proj bias that transformers, vLLM and llama.cpp load, "
            f"so an edit cannot be baked into their weights; supported families: {', '.join(sorted(BIAS_FAMILIES))}."
        )
    return model_type, family


def _module_at(model: Any, layer: int, path: str) -> torch.nn.Module:
    return decoder_layer(model, layer).get_submodule(path)


def bake_biases(pvm: Any, *, every_position: bool = False) -> BakedEdit:
    """The biases that reproduce every edit of ``pvm`` (a pyvene model of actedit edits).

    Raises :class:`ExportError` naming the method and the reason for an edit no bias reproduces,
    an edit whose position policy is not ``all`` (unless ``every_position``) or a family without
    the slot it needs. Switched-off modules (layers a trained method did not select) are skipped.
    """
    if not is_intervenable(pvm):
        raise ExportError(f"bake_biases() needs a pyvene IntervenableModel, got {type(pvm).__name__}.")
    model = pvm.model
    model_type, family = _family(model)
    biases: Dict[Tuple[int, str], torch.Tensor] = {}
    edits: List[Dict[str, Any]] = []
    refused: Dict[Tuple[str, str], List[int]] = {}  # (method, reason) → layers
    for rep in config_of(pvm).representations:
        module, layer, component = rep.intervention, int(rep.layer), str(rep.component)
        spec = spec_of(module)
        if spec is None:
            raise ExportError(f"the edit at layer {layer} ({type(module).__name__}) is not an actedit edit.")
        if not getattr(module, "is_enabled", True):
            continue
        if spec.bake is None:
            refused.setdefault((spec.name, spec.not_bakeable or "its method registers no bake function"), []).append(
                layer
            )
            continue
        policy = module.policy
        every_token = policy == PositionPolicy.ALL or (
            policy == PositionPolicy.FROM_POSITION and int(module.host("position_start")) == 0
        )
        if not every_token and not every_position:
            reason = (
                f"it acts at the positions of policy '{policy.name.lower()}', but a bias acts at every "
                "position; pass every_position=True (CLI: --every-position) to bake it at every position "
                "(a different edit: measure it), or make the edit with position_policy: all"
            )
            refused.setdefault((spec.name, reason), []).append(layer)
            continue

        def weight_of(slot: str, layer: int = layer) -> torch.Tensor:
            if slot not in family.slots:
                raise ExportError(f"{model_type} models have no {slot} bias (slots: {', '.join(family.slots)}).")
            weight = _module_at(model, layer, family.slots[slot][0]).weight
            return cast(torch.Tensor, weight).detach()

        try:
            baked: List[BakedBias] = spec.bake(module, component, weight_of)
        except ValueError as exc:
            raise ExportError(f"cannot bake the {spec.name} edit at layer {layer}: {exc}") from exc
        for item in baked:
            if item.slot not in family.slots:
                raise ExportError(
                    f"the {spec.name} edit at layer {layer} needs a {item.slot} bias, which {model_type} "
                    f"models do not have (their slots: {', '.join(family.slots)})."
                )
            if item.residual and not family.slots[item.slot][2]:
                raise ExportError(
                    f"the {spec.name} edit at layer {layer} shifts the residual stream, but {model_type} "
                    f"normalises the {item.slot} output before adding it: a bias there is not that shift."
                )
            key = (layer, item.slot)
            bias = torch.as_tensor(item.bias).detach().to("cpu", torch.float64)
            biases[key] = biases[key] + bias if key in biases else bias
        edits.append(
            {
                "method": spec.name,
                "layer": layer,
                "component": component,
                "policy": policy.name.lower(),
                "slots": [item.slot for item in baked],
            }
        )
    if refused:
        problems = [f"the {method} edit (layers {layers}): {reason}" for (method, reason), layers in refused.items()]
        raise ExportError("cannot bake into weights " + "; ".join(problems) + ".")
    if not edits:
        raise ExportError("the artifact holds no switched-on edit: there is nothing to bake.")
    flags = tuple(sorted({family.slots[slot][1] for _, slot in biases}))
    return BakedEdit(biases, edits, flags, family)


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if parameter:
        setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner._buffers[attr] = value  # keeps the buffer's persistence as the module declared it


def baked_model(pvm: Any, *, every_position: bool = False) -> Tuple[Any, BakedEdit]:
    """A new transformers model: ``pvm``'s base model with its edits as biases (see the module
    docstring); ``pvm`` and its model are left as they were.

    The new model is built on the meta device and takes the source's tensors as they are (no
    random initialisation, no copy of the weights); the biases the flags add are zeros, and the
    baked biases are added to them (or to biases the model already had).
    """
    baked = bake_biases(pvm, every_position=every_position)
    model, family = pvm.model, baked.family
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ExportError(
            "some of the model's weights are offloaded (on the meta device); export needs them in memory: "
            "load the model without a device_map that offloads (or with more max_memory)."
        )
    config = copy.deepcopy(model.config)
    for flag in baked.flags:
        setattr(config, flag, True)
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(config)
    state = model.state_dict()
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    implied = {path for flag in baked.flags for path in family.implied[flag]}
    expected = {
        f"{name}.bias"
        for name, module in new.named_modules()
        if any(name.endswith(f".{path}") for path in implied) and getattr(module, "bias", None) is not None
    } - set(state)
    if set(missing) != expected or unexpected:
        raise ExportError(
            f"the {type(new).__name__} with {', '.join(baked.flags)} does not take the original weights as "
            f"expected (missing {sorted(set(missing) - expected)[:4]}, unexpected {list(unexpected)[:4]})."
        )
    for name, buffer in model.named_buffers():  # buffers a state dict leaves out (rotary inv_freq)
        if name not in state:
            _set_tensor(new, name, buffer.clone(), parameter=False)
    for name in expected:  # zeros in the dtype of their layer's weight (meta parameters are fp32)
        weight = state[name[: -len("bias")] + "weight"]
        _set_tensor(new, name, torch.zeros(new.get_parameter(name).shape, dtype=weight.dtype), parameter=True)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    for (layer, slot), bias in baked.biases.items():
        module = baked.slot_module(new, layer, slot)
        current = cast(torch.Tensor, module.bias).detach()
        # a new tensor: a bias the source model had is shared with it and stays as it was
        module.bias = torch.nn.Parameter(current + bias.to(current.dtype), requires_grad=False)
    return new.eval(), baked


def _card(source: str, baked: BakedEdit, base: Dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {e['method']} | {e['layer']} | {e['component']} | {', '.join(e['slots'])} | {e['policy']} |"
        for e in baked.edits
    )
    name = base.get("name_or_path") or "the base model"
    return f"""---
library_name: transformers
tags: [actedit, activation-steering, baked-edit]
---
# {Path(source).name}, baked into {name}

The actedit edit `{source}` written into this checkpoint's biases ({", ".join(baked.flags)} set;
every other bias those flags imply is zero). It loads with stock transformers and serves in any
engine that serves the family, with no actedit or pyvene code and no overhead:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```

| method | layer | site | bias | position policy |
|---|---|---|---|---|
{rows}

A bias acts at every position; an edit whose policy was not `all` was baked at every position on
request (`--every-position`), which is a different edit from the one its scores were measured on.
"""


EXPORT_RECORD = "actedit_export.json"
"""The file that marks a directory as an export (what it holds and where it came from)."""


def check_out(out: Union[str, Path], overwrite: bool = False) -> Path:
    """``out`` as a path an export may write: absent, or (with ``overwrite``) an empty directory or
    an earlier export (it holds :data:`EXPORT_RECORD`); anything else is refused, so that
    ``overwrite`` never replaces an artifact, a model or any other directory."""
    out = Path(out).expanduser()
    if not out.exists():
        return out
    if not overwrite:
        raise FileExistsError(f"{out} exists; choose another directory or pass overwrite=True (CLI: --overwrite).")
    if not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_RECORD).is_file()):
        raise FileExistsError(
            f"{out} exists and is not an earlier export (no {EXPORT_RECORD} in it): refusing to replace it; "
            "choose another directory."
        )
    return out


def check_file_out(out: Union[str, Path], suffixes: Tuple[str, ...], what: str, overwrite: bool = False) -> Path:
    """``out`` as a file an export may write: named with one of ``suffixes`` (``what`` says which
    file that is, for the error) and absent unless ``overwrite``."""
    out = Path(out).expanduser()
    if out.suffix not in suffixes:
        raise ExportError(f"{what} is a {' or '.join(suffixes)} file; got {out.name!r}.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another file or pass overwrite=True (CLI: --overwrite).")
    return out


def export_hf(
    artifact: Union[str, Path],
    model: Any,
    out: Union[str, Path],
    *,
    tokenizer: Any = None,
    every_position: bool = False,
    overwrite: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write the artifact's edits, baked into ``model``'s weights, as a checkpoint at ``out``.

    ``out`` is written whole or not at all (:func:`~actedit.interventions.files.directory_atomic`);
    an existing ``out`` is replaced only with ``overwrite`` and only when it is an earlier export
    or empty (:func:`check_out`). The tokenizer is saved beside the weights when given (the CLI
    always gives it); :data:`EXPORT_RECORD` records the source artifact and what was baked where.
    The weights keep ``model``'s dtype.
    """
    out = check_out(out, overwrite)
    pvm = load_artifact(artifact, model)
    new, baked = baked_model(pvm, every_position=every_position)
    info = getattr(pvm.config, "actedit", None) or {}
    base_model = (info.get("base_model") if isinstance(info, dict) else None) or {}
    record = {
        "source": str(artifact),
        "edits": baked.edits,
        "flags": list(baked.flags),
        "biases": [{"layer": layer, "slot": slot} for layer, slot in sorted(baked.biases)],
        "every_position": every_position,
        "actedit_version": info.get("actedit_version") if isinstance(info, dict) else None,
    }
    with directory_atomic(out) as staging:
        new.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_json(staging / EXPORT_RECORD, record, indent=2)
        write_atomic(staging / "README.md", _card(str(artifact), baked, base_model))
    if progress is not None:
        progress(f"baked {len(baked.edits)} edit(s) into {', '.join(baked.flags)} biases: {out}")
    return out


__all__ = [
    "BIAS_FAMILIES",
    "EXPORT_RECORD",
    "BakedEdit",
    "BiasFamily",
    "ExportError",
    "bake_biases",
    "baked_model",
    "check_file_out",
    "check_out",
    "export_hf",
]
