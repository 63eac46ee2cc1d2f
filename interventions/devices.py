"""Where a model runs each module, for models dispatched by accelerate (``device_map``).

``from_pretrained(..., device_map=...)`` (transformers, through accelerate's ``dispatch_model``)
spreads a model over several devices and, when its map holds ``"disk"`` (or ``"cpu"`` beside a
GPU), *offloads* modules: their weights sit on the ``meta`` device between calls and accelerate's
``AlignDevicesHook`` loads them on the fly. So on such a model:

* ``next(model.parameters()).device`` may be ``meta`` (an offloaded first module) or another
  module's device: it says nothing about where inputs go (:func:`input_device`) nor where a
  module computes (:func:`execution_device`);
* pyvene's ``IntervenableModel.set_device(device)`` moves every intervention to one device; an
  intervention belongs on the device its hooked module computes on (:func:`place_interventions`),
  and :class:`~actedit.interventions.base.ActEditIntervention` moves an activation that arrives
  from elsewhere (a pre-hook sees the input *before* accelerate moves it) to its own device and
  the result back.

accelerate behaviour read (1.15.0, ``accelerate/hooks.py`` and ``big_modeling.py``):
``add_hook_to_module`` stores the hook in ``module._hf_hook`` (a ``SequentialHook`` with
``.hooks`` when several are chained) and wraps ``module.forward``; an ``AlignDevicesHook`` moves
the module's inputs to its ``execution_device`` in ``pre_forward`` and, when ``offload`` is set,
loads the weights from its ``weights_map`` (keys relative to the hooked module) and puts them back
on ``meta`` in ``post_forward``. ``dispatch_model`` hooks every module of the map and every
submodule holding tensors; a module without a hook computes where its nearest hooked ancestor
does; it records the map in ``model.hf_device_map``. transformers 5.24.0 calls it only for a map
with more than one device or with ``"disk"`` (a one-device map just places the model, no hooks,
no ``hf_device_map``). Nothing here imports accelerate: the hooks are read by their attributes.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import pyvene as pv
import torch

__all__ = [
    "accelerate_hooks",
    "execution_device",
    "input_device",
    "is_dispatched",
    "offloaded_tensor",
    "place_interventions",
]


def accelerate_hooks(module: torch.nn.Module) -> List[Any]:
    """The accelerate hooks attached to ``module`` itself (``_hf_hook``, a ``SequentialHook``
    flattened), outermost first; empty when it has none."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    chained = getattr(hook, "hooks", None)
    if isinstance(chained, (list, tuple)):
        return [h for inner in chained for h in ([inner] if getattr(inner, "hooks", None) is None else inner.hooks)]
    return [hook]


def is_dispatched(model: Any) -> bool:
    """Whether ``model`` was loaded with a ``device_map`` (``hf_device_map`` set by transformers,
    also on a PEFT model wrapping it) or carries accelerate hooks on its top module."""
    return bool(getattr(model, "hf_device_map", None)) or bool(accelerate_hooks(model))


def _ancestry(model: torch.nn.Module, module: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """``(name, module)`` from ``module`` up to ``model`` (its qualified name, then each parent's)."""
    name = next((n for n, m in model.named_modules(remove_duplicate=False) if m is module), None)
    if name is None:
        raise ValueError(f"{type(module).__name__} is not a submodule of the given {type(model).__name__}.")
    parts = name.split(".") if name else []
    chain = []
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        chain.append((prefix, model.get_submodule(prefix) if prefix else model))
    return chain


def _as_device(value: Any) -> torch.device:
    return value if isinstance(value, torch.device) else torch.device(value)


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def execution_device(model: torch.nn.Module, module: torch.nn.Module) -> torch.device:
    """The device ``module`` (a submodule of ``model``, or ``model``) computes on.

    The ``execution_device`` of the nearest accelerate hook on the module or an ancestor (what an
    offloaded module's weights are loaded to; its own parameters are on ``meta``); for a model
    without hooks, the device of the module's first parameter or buffer not on ``meta``, else of
    the model's.
    """
    chain = _ancestry(model, module)
    for _, owner in chain:
        for hook in accelerate_hooks(owner):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return _as_device(device)
    for _, owner in chain:
        for tensor in _tensors(owner):
            if tensor.device.type != "meta":
                return tensor.device
    return torch.device("cpu")


def input_device(model: Any) -> torch.device:
    """Where the input ids of ``model`` (a transformers model or a PEFT model) go.

    A model without a device map: the device of its first parameter (what actedit always used).
    A dispatched one: the execution device of its input embedding (:func:`execution_device`),
    never the ``meta`` device of an offloaded embedding.
    """
    if not is_dispatched(model):
        first = next(iter(model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(embeddings, torch.nn.Module):
        return execution_device(model, model)
    return execution_device(model, embeddings)


def hooked_module(pvm: pv.IntervenableModel, key: str) -> torch.nn.Module:
    """The module of ``pvm.model`` whose hook runs the intervention ``key``.

    pyvene (0.1.8) keeps, per intervention key, ``intervention_hooks[key]``: the bound
    ``register_forward_hook``/``register_forward_pre_hook`` method of the module it hooks
    (``get_module_hook``), so the module is that method's ``__self__``.
    """
    hook = pvm.intervention_hooks[key]
    module = getattr(hook, "__self__", None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"pyvene's hook for intervention {key!r} is not bound to a module ({hook!r}).")
    return module


def place_interventions(pvm: pv.IntervenableModel) -> Dict[str, torch.device]:
    """Move each intervention of ``pvm`` to the execution device of the module it hooks; returns
    key → device.

    For a model loaded with a ``device_map``, where pyvene's ``set_device`` (one device for all)
    would put interventions of a layer on another GPU, or on ``meta`` when the first parameter
    is offloaded. A model without hooks gets each intervention on its hooked module's device.
    """
    placed: Dict[str, torch.device] = {}
    for key, intervention in pvm.interventions.items():
        device = execution_device(pvm.model, hooked_module(pvm, key))
        module = intervention[0] if isinstance(intervention, tuple) else intervention
        if isinstance(module, torch.nn.Module):
            module.to(device)
        placed[key] = device
    return placed


def offloaded_tensor(model: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    """The stored value of the parameter or buffer ``name`` of ``model`` that accelerate offloaded
    (its ``meta`` placeholder's real values, read from the hook's ``weights_map``: the CPU copy or
    the file in the offload folder), or None when no hook holds it."""
    owner_name, _, _ = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    for prefix, module in _ancestry(model, owner):
        relative = name[len(prefix) + 1 :] if prefix else name
        for hook in accelerate_hooks(module):
            weights = getattr(hook, "weights_map", None)
            if weights is None:
                continue
            try:
                value = weights[relative]
            except KeyError:
                continue
            if isinstance(value, torch.Tensor):
                return value
    return None
