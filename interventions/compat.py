"""Every workaround for pyvene 0.1.8 lives here, each next to the pyvene behaviour it covers.

:func:`apply` is idempotent and runs when :mod:`actedit.interventions` is imported. pyvene
imports that package itself while loading an artifact (it re-imports intervention classes by
their dotted path), so a user who only calls ``pyvene.IntervenableModel.load(dir, model)``
gets the fixes too.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import io
import logging
import os
import sys
import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

MIN_TORCH = (2, 6)
"""torch ≥ 2.6: ``torch.load`` defaults to ``weights_only=True``, so a pickle that would run code
(an artifact's ``.bin``, a checkpoint) is refused instead of executed; pyvene's ``load`` calls
``torch.load`` without ``weights_only``."""


def _torch_version() -> Tuple[int, ...]:
    parts = []
    for piece in torch.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


if _torch_version() < MIN_TORCH:
    raise ImportError(
        f"actedit needs torch >= {'.'.join(map(str, MIN_TORCH))} (found {torch.__version__}): older "
        "releases unpickle artifacts with code execution enabled. Upgrade torch."
    )


def _import_pyvene_quietly() -> None:
    """Import pyvene without its import-time banner.

    pyvene behaviour covered (0.1.8): ``pyvene.models.intervenable_base`` prints "nnsight is not
    detected. Please install via 'pip install nnsight' for nnsight backend." on stdout when the
    optional nnsight package is missing, so every ``actedit`` command and every script started
    with that line. Anything else printed during the import is passed through.
    """
    if "pyvene" in sys.modules:
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        import pyvene  # noqa: F401  # lazy: imported here, its stdout captured
    for line in buffer.getvalue().splitlines():
        if not line.startswith("nnsight is not detected"):
            print(line)


_import_pyvene_quietly()

from gguf import GGUFReader  # noqa: E402
from pyvene.models import intervenable_base, modeling_utils  # noqa: E402  (after the quiet pyvene import)
from pyvene.models import intervenable_modelcard as card  # noqa: E402
from pyvene.models.llama.modelings_intervenable_llama import (  # noqa: E402
    llama_type_to_dimension_mapping,
    llama_type_to_module_mapping,
)

from .base import ActEditIntervention  # noqa: E402
from .positions import PositionTracker, generation  # noqa: E402

logger = logging.getLogger(__name__)

_APPLIED = False

_PATCHED = "_actedit_patched"
"""The attribute that marks a pyvene function actedit has already wrapped."""

# Components whose size pyvene derives from the head size.
_HEAD_COMPONENTS = {
    "head_attention_value_output",
    "head_query_output",
    "head_key_output",
    "head_value_output",
}


def head_dim(model_config: Any) -> int:
    """The attention head size of a model config.

    Some configs carry an explicit ``head_dim`` that differs from ``hidden_size /
    num_attention_heads`` (Gemma, Llama variants); some lack the attribute (Qwen2).
    """
    explicit = getattr(model_config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    size: int = model_config.hidden_size // model_config.num_attention_heads
    return size


def _is_pyvene_hook(hook: Any) -> bool:
    target = getattr(hook, "__wrapped__", hook)
    module: str = getattr(target, "__module__", "")
    return module.startswith("pyvene.")


def remove_pyvene_hooks(main_module: torch.nn.Module) -> None:
    """Remove only the hooks pyvene registered.

    pyvene behaviour covered: ``IntervenableModel._cleanup_states`` calls
    ``remove_forward_hooks``, which pops *every* forward and pre-forward hook of every submodule
    before and after each call. Under transformers 5 that deletes the hooks that implement
    ``output_hidden_states``/``output_attentions`` (they silently return empty tuples for the rest
    of the process, even on the unwrapped model), and it would delete actedit's
    :class:`~actedit.interventions.positions.PositionTracker`. pyvene's own hooks are closures
    defined in ``pyvene.models.intervenable_base``; only those are removed.
    """
    for submodule in main_module.modules():
        for hooks in (submodule._forward_hooks, submodule._forward_pre_hooks):
            for hook_id in [k for k, h in hooks.items() if _is_pyvene_hook(h)]:
                hooks.pop(hook_id)
                submodule._forward_hooks_with_kwargs.pop(hook_id, None)
                submodule._forward_hooks_always_called.pop(hook_id, None)
                submodule._forward_pre_hooks_with_kwargs.pop(hook_id, None)


def _dimension_with_head_fix(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``get_dimension_by_component`` so head-related sizes come from the real head size.

    pyvene behaviour covered: its tables size head components as ``hidden_size /
    num_attention_heads`` (wrong for configs with an explicit ``head_dim``, e.g. Gemma, some
    Llama variants) or read ``config.head_dim`` (absent on Qwen2 configs: ``AttributeError``),
    and size the o_proj input (``attention_value_output``) as ``hidden_size`` although it is
    ``num_attention_heads * head_dim``.
    """

    @functools.wraps(original)
    def get_dimension_by_component(model_type: Any, model_config: Any, component: str) -> Any:
        has_heads = hasattr(model_config, "num_attention_heads") and hasattr(model_config, "hidden_size")
        if has_heads and component in _HEAD_COMPONENTS:
            return head_dim(model_config)
        if has_heads and component == "attention_value_output":
            return model_config.num_attention_heads * head_dim(model_config)
        return original(model_type, model_config, component)

    setattr(get_dimension_by_component, _PATCHED, True)
    return get_dimension_by_component


def _llama_like_tables(prefix: str, drop: Tuple[str, ...] = ()) -> Tuple[Dict[str, Tuple[Any, ...]], Dict[str, Any]]:
    """pyvene's Llama module/dimension tables with the layer stack under ``prefix``."""
    modules = {k: (f"{prefix}{v[0]}",) + tuple(v[1:]) for k, v in llama_type_to_module_mapping.items() if k not in drop}
    dims = {k: v for k, v in llama_type_to_dimension_mapping.items() if k not in drop}
    return modules, dims


def _missing_families() -> List[Tuple[type, str, Tuple[str, ...]]]:
    """(model class, layer prefix, components to drop) for families pyvene 0.1.8 lacks."""
    families = []
    specs: List[Tuple[str, List[str], Tuple[str, ...]]] = [
        ("qwen3", ["Qwen3Model", "Qwen3ForCausalLM"], ()),
        ("gemma3", ["Gemma3TextModel", "Gemma3ForCausalLM"], ()),
        # Phi-3 fuses q/k/v into qkv_proj: no separate query/key/value modules to hook.
        (
            "phi3",
            ["Phi3Model", "Phi3ForCausalLM"],
            ("query_output", "key_output", "value_output", "head_query_output", "head_key_output", "head_value_output"),
        ),
    ]
    for family, class_names, drop in specs:
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:  # an older transformers without this family
            continue
        for name in class_names:
            cls = getattr(module, name, None)
            if cls is not None:
                prefix = "" if name.endswith("Model") else "model."
                families.append((cls, prefix, drop))
    return families


def register_model_family(
    model_class: type, layer_prefix: str = "model.", drop_components: Tuple[str, ...] = ()
) -> None:
    """Teach pyvene the component names of a Llama-like family it does not know.

    pyvene behaviour covered: ``IntervenableModel`` looks components up in
    ``type_to_module_mapping``/``type_to_dimension_mapping`` keyed by model class and raises
    ``KeyError`` for classes missing there (Gemma-3, Phi-3, Qwen3 in 0.1.8).
    """
    modules, dims = _llama_like_tables(layer_prefix, drop_components)
    card.type_to_module_mapping.setdefault(model_class, modules)
    card.type_to_dimension_mapping.setdefault(model_class, dims)


# ----------------------------------------------------------------- transformers' forward arguments
CACHE_ARGUMENTS = ("cache", "past_key_values")
"""Names under which transformers passes the KV cache to a model's forward.

transformers behaviour covered: up to 5.23 the cache is ``past_key_values``; 5.24 renamed it to
``cache`` (``past_key_values`` is deprecated, with a warning, until 5.40) and ``generate`` passes
it only as ``cache``. Code that read ``past_key_values`` saw no cache on decode steps and took
every new token for a fresh prompt (seen on 5.24.0: single-prompt cached generation edited the
wrong positions)."""


def _is_cache(value: Any) -> bool:
    if isinstance(value, (tuple, list)):  # legacy tuple-of-tuples cache (transformers 4.x)
        return (
            bool(value)
            and isinstance(value[0], (tuple, list))
            and bool(value[0])
            and isinstance(value[0][0], torch.Tensor)
        )
    return callable(getattr(value, "get_seq_length", None))


def forward_cache(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a forward call received, or None: under any name of :data:`CACHE_ARGUMENTS`,
    else any argument that is a cache object (so a future rename is still found)."""
    for name in CACHE_ARGUMENTS:
        value = kwargs.get(name)
        if value is not None and _is_cache(value):
            return value
    for value in kwargs.values():
        if value is not None and not isinstance(value, torch.Tensor) and _is_cache(value):
            return value
    return None


def cached_length(kwargs: Mapping[str, Any]) -> Optional[int]:
    """How many earlier tokens a forward call continues, or None when the call does not say.

    transformers behaviour covered: 4.x passes ``cache_position`` (the index of the first new
    token); 5.24 passes none and the cache must be asked (``get_seq_length()`` before the call
    appends to it). A legacy tuple cache holds (batch, heads, past, head_dim) tensors.
    """
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    cache = forward_cache(kwargs)
    if cache is None:
        return None
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2])
    return int(cache.get_seq_length())


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model``'s forward takes a KV cache (``cache`` from transformers
    5.24 on, ``past_key_values`` before; see :data:`CACHE_ARGUMENTS`)."""
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward call returned (``output.cache`` from 5.24, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A KV cache holding rows ``rows`` (repeats allowed) of ``cache``, which is left untouched.

    transformers behaviour covered: a ``Cache`` object's ``reorder_cache`` works in place, and its
    per-layer storage differs between releases (5.x: ``cache.layers``, each layer holding
    ``keys``/``values``; 4.x: ``key_cache``/``value_cache`` lists; legacy: tuples of tuples). The
    cache and its per-layer objects are copied shallowly and ``reorder_cache`` then rebinds each
    layer's tensors to ``index_select`` results, so the key/value tensors are copied once.
    """
    if isinstance(cache, (tuple, list)):  # legacy tuple-of-tuples cache
        return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in cache)
    new = copy.copy(cache)
    if isinstance(getattr(cache, "layers", None), list):
        new.layers = [copy.copy(layer) for layer in cache.layers]
    for attr in ("key_cache", "value_cache"):  # older transformers: per-layer tensor lists
        if isinstance(getattr(cache, attr, None), list):
            setattr(new, attr, list(getattr(cache, attr)))
    new.reorder_cache(rows)
    return new


def gguf_special_tokens(tokenizer: Any, gguf_path: Union[str, "os.PathLike[str]"]) -> None:
    """Make a tokenizer loaded from a GGUF file add BOS/EOS as the file says.

    transformers behaviour covered: 4.57 builds a ``LlamaTokenizerFast`` from a GGUF file with
    ``add_bos_token=True`` whatever the file's ``tokenizer.ggml.add_bos_token`` says (seen on
    4.57.6 with SmolLM2-135M-Instruct's GGUF, whose flag is false: every text got a BOS it never
    had, and TruthfulQA scores moved); 5.x honours the flag. A flag the file does not set is left
    to the tokenizer.
    """
    reader = GGUFReader(str(gguf_path))
    for flag in ("add_bos_token", "add_eos_token"):
        field = reader.fields.get(f"tokenizer.ggml.{flag}")
        if field is None or not field.data:
            continue
        wanted = bool(field.parts[field.data[0]][0])
        if hasattr(tokenizer, flag) and bool(getattr(tokenizer, flag)) != wanted:
            setattr(tokenizer, flag, wanted)  # LlamaTokenizerFast rebuilds its post-processor


def _tracker_pre_hook(
    tracker: PositionTracker,
) -> Callable[[torch.nn.Module, Tuple[Any, ...], Dict[str, Any]], None]:
    def pre_hook(module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        if not isinstance(ref, torch.Tensor) or ref.dim() < 2:
            tracker.begin_untracked()
            return
        tracker.begin(
            ref.shape[0],
            ref.shape[1],
            ref.device,
            past_length=cached_length(kwargs),
            attention_mask=kwargs.get("attention_mask"),
        )

    return pre_hook


def _tracker_post_hook(
    tracker: PositionTracker,
) -> Callable[[torch.nn.Module, Tuple[Any, ...], Dict[str, Any], Any], None]:
    def post_hook(module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        tracker.end()

    return post_hook


_TRACKER_ATTR = "_actedit_position_tracker"


def attach_tracker(model: torch.nn.Module) -> PositionTracker:
    """Attach (once) a :class:`~actedit.interventions.positions.PositionTracker` to ``model``'s
    top-level forward, fed with what each call receives (see :func:`cached_length`)."""
    tracker: Optional[PositionTracker] = getattr(model, _TRACKER_ATTR, None)
    if tracker is not None and tracker.handles:
        return tracker
    tracker = PositionTracker()
    tracker.handles = [
        model.register_forward_pre_hook(_tracker_pre_hook(tracker), with_kwargs=True),
        # always_call: pop the record even when the forward raises.
        model.register_forward_hook(_tracker_post_hook(tracker), with_kwargs=True, always_call=True),
    ]
    object.__setattr__(model, _TRACKER_ATTR, tracker)
    return tracker


def _attach_tracker_on_init(original_init: Callable[..., None]) -> Callable[..., None]:
    """Attach actedit's position tracker to every model wrapped by ``IntervenableModel``, and
    keep its ``lm_head`` input contiguous (:func:`contiguous_head_input`).

    pyvene behaviour covered: interventions only see the activation tensor of one forward call,
    never the attention mask or the cache state, so position policies need this side channel.
    """

    @functools.wraps(original_init)
    def __init__(self: Any, config: Any, model: torch.nn.Module, **kwargs: Any) -> None:
        original_init(self, config, model, **kwargs)
        attach_tracker(model)
        contiguous_head_input(model)  # the wrapping froze the weights (see contiguous_head_input)

    setattr(__init__, _PATCHED, True)
    return __init__


# ------------------------------------------------------------------------ torch's frozen bf16 matmul
_CONTIGUOUS_HEAD_ATTR = "_actedit_contiguous_head"


def _contiguous_input(module: torch.nn.Module, args: Tuple[Any, ...]) -> Optional[Tuple[Any, ...]]:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def contiguous_head_input(model: Any) -> None:
    """Make ``model``'s output projection (``lm_head``) always receive a contiguous input (once).

    torch behaviour covered (seen on torch 2.13.0+cpu, transformers 4.57–5.24): ``nn.Linear`` on
    a 3-D input that is not contiguous goes through ``matmul``, which folds the batch into rows
    only when the input is contiguous or the weight requires grad. Otherwise it expands the weight
    over the batch and calls ``bmm``, whose oneDNN bf16 kernel materialises the expansion: batch ×
    vocabulary × hidden × 2 bytes. transformers hands ``lm_head`` exactly such an input on every
    prompt pass of ``generate`` (``hidden_states[:, -1:, :]``, ``logits_to_keep=1``), and pyvene's
    wrapping sets ``requires_grad=False`` on every weight. Measured: SmolLM2-135M at batch 128,
    5.9 s and +6.9 GB instead of 0.02 s; a 0.5B Qwen2 at batch 80, 55 s and 22.5 GB; Gemma-3's
    vocabulary asks for 26.8 GB and falls back with a C++ warning. fp32 does not allocate the copy
    but is still ~25× slower on that path. A contiguous copy of the slice (batch × hidden values)
    takes the folded ``addmm`` path: same result, no extra memory. Models whose input is already
    contiguous pay nothing.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Module) or getattr(head, _CONTIGUOUS_HEAD_ATTR, None) is not None:
        return
    handle = head.register_forward_pre_hook(_contiguous_input)
    object.__setattr__(head, _CONTIGUOUS_HEAD_ATTR, handle)


@contextlib.contextmanager
def preserved_model_state(model: torch.nn.Module) -> Iterator[None]:
    """Give ``model`` back with the ``requires_grad`` flags and train/eval modes it came with.

    pyvene behaviour covered (0.1.8): ``IntervenableModel.__init__`` calls
    ``disable_model_gradients``, which puts the wrapped model in eval mode and sets
    ``requires_grad=False`` on every weight, and nothing undoes it when the wrapper is dropped. A
    wrapper actedit makes for its own passes (collection) runs inside this context so the user's
    model is left as it was.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


# ------------------------------------------------------------------------------- pyvene's logging
_PYVENE_KEY_WARNING = "The key is provided in the config."


class _PyveneKeyWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith(_PYVENE_KEY_WARNING))


@contextlib.contextmanager
def quiet_pyvene_key_warning() -> Iterator[None]:
    """Drop pyvene's "The key is provided in the config. Assuming this is loaded from a
    pretrained module." while actedit itself wraps or loads an edit.

    pyvene behaviour covered (0.1.8): ``IntervenableModel.__init__`` logs it through the root
    logger (``logging.warning``) whenever the config carries its ``sorted_keys``, i.e. for every
    loaded or composed edit: 9 lines per default study, one per reload, about nothing the user
    did. Only this message, only inside this context: a user calling stock pyvene still sees it.
    """
    root = logging.getLogger()
    dropper = _PyveneKeyWarningFilter()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


# ------------------------------------------------------------------------------ transformers' GGUF
def gguf_load_options() -> Dict[str, Any]:
    """Keyword arguments for ``from_pretrained(..., gguf_file=...)`` that de-quantise every weight.

    transformers behaviour covered: 5.24 can keep a GGUF file's weights packed (``GgufConfig``,
    with matmul kernels from the ``kernels`` package, computing in float32) and, before it knows
    whether it will, warns on every load in another dtype that packed weights are "fastest in
    float32". actedit edits and reads the dense weights (pyvene hooks, bf16 matmuls, exports), and
    without kernels (CPUs) transformers de-quantises anyway: asking for ``dequantize=True`` gives
    the same weights on every machine and drops the warning, which does not apply. Older releases
    (4.x, no ``GgufConfig``) always de-quantise and take no option.
    """
    config_class = getattr(importlib.import_module("transformers"), "GgufConfig", None)
    if config_class is None or "dequantize" not in inspect.signature(config_class.__init__).parameters:
        return {}
    return {"quantization_config": config_class(dequantize=True)}


_REFERENCE_HOOKS = threading.local()


@contextlib.contextmanager
def pyvene_generation_hooks() -> Iterator[None]:
    """Inside this block ``IntervenableModel.generate`` applies actedit edits through pyvene's own
    hook callback (the reference path of :func:`_direct_generation_hooks`; tests compare them)."""
    previous = getattr(_REFERENCE_HOOKS, "on", False)
    _REFERENCE_HOOKS.on = True
    try:
        yield
    finally:
        _REFERENCE_HOOKS.on = previous


def _direct_output_hook(intervention: ActEditIntervention) -> Callable[..., Any]:
    """The edit of a module's output, where pyvene's callback reads it: the first element of a
    tuple, the first entry of a dict (edited in place there, as pyvene writes it), else the output."""

    def hook(module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
        if isinstance(output, tuple):
            edited = intervention(output[0])
            return None if edited is output[0] else (edited, *output[1:])
        if isinstance(output, dict):
            target = output[next(iter(output))]
            edited = intervention(target)
            if edited is not target:
                target[:] = edited
            return None
        edited = intervention(output)
        return None if edited is output else edited

    return hook


def _direct_input_hook(intervention: ActEditIntervention) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if args:
            edited = intervention(args[0])
            return None if edited is args[0] else ((edited, *args[1:]), kwargs)
        name = next(iter(kwargs))  # keyword-only call: pyvene edits the first keyword argument
        edited = intervention(kwargs[name])
        return None if edited is kwargs[name] else (args, {**kwargs, name: edited})

    return hook


def _direct_generation_hooks(pvm: Any) -> List[Any]:
    """Register every actedit edit of ``pvm`` as a plain torch hook on the module pyvene hooks,
    in pyvene's order (its intervention groups, then their keys); returns the handles.

    pyvene behaviour covered (0.1.8): with ``unit_locations=None`` its hook callback hands an
    intervention the whole activation and writes the result back over it, but on the way it
    clones the activation twice, broadcasts its arguments and counts calls, at every hooked
    module and every generated token. On a 135M model at batch 1 that bookkeeping costs as much
    as the edits themselves. Here the hook calls the intervention and hands its output on: the
    values pyvene would write, without the copies. Used only where pyvene would pass the whole
    activation (see :func:`_generate_in_generation_context`).
    """
    handles = []
    for keys in pvm._intervention_group.values():
        for key in keys:
            register = pvm.intervention_hooks[key]
            intervention = pvm.interventions[key]
            if register.__name__ == "register_forward_pre_hook":
                handles.append(register(_direct_input_hook(intervention), with_kwargs=True))
            else:
                handles.append(register(_direct_output_hook(intervention), with_kwargs=True))
    return handles


_PYVENE_ONLY_ARGUMENTS = (
    "sources",
    "unit_locations",
    "source_representations",
    "subspaces",
    "intervention_additional_kwargs",
)


_HOOK_REGISTRARS = ("register_forward_hook", "register_forward_pre_hook")


def _only_actedit_edits(pvm: Any) -> bool:
    """Whether ``pvm`` holds interventions and every one is an actedit one."""
    return len(pvm.interventions) > 0 and all(isinstance(i, ActEditIntervention) for i in pvm.interventions.values())


def _direct_hooks_apply(pvm: Any, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether a ``generate`` call hands every hooked activation whole to actedit edits."""
    return (
        not getattr(_REFERENCE_HOOKS, "on", False)
        and len(args) <= 1
        and bool(kwargs.get("intervene_on_prompt"))
        and all(kwargs.get(name) is None for name in _PYVENE_ONLY_ARGUMENTS)
        and pvm.mode == "parallel"
        and not pvm.as_adaptor
        and not pvm._intervention_reverse_link
        and not pvm.return_collect_activations
        and _only_actedit_edits(pvm)
        and all(getattr(h, "__name__", "") in _HOOK_REGISTRARS for h in pvm.intervention_hooks.values())
    )


def _generate_in_generation_context(original_generate: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``IntervenableModel.generate`` inside :func:`positions.generation`, policies deciding.

    pyvene behaviours covered: (1) interventions cannot tell a decode step from a new prompt when
    generation runs without a KV cache (every call then starts at position 0); the mark makes
    position policies identical with and without cache. (2) ``generate`` defaults to
    ``intervene_on_prompt=False``, which with ``unit_locations=None`` silently skips the prompt
    pass and edits only position 0 of each decode step; when every intervention is an actedit one
    and the caller gave neither argument, actedit's position policies decide instead
    (``intervene_on_prompt=True``). (3) Its per-hook bookkeeping (:func:`_direct_generation_hooks`):
    when every edit is an actedit one and pyvene would pass each activation whole, the edits run
    as plain torch hooks around ``model.generate``, each :meth:`~ActEditIntervention.frozen` for
    the call (settings read once, not at every layer and token), and the call returns what
    pyvene's would.
    """

    @functools.wraps(original_generate)
    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            "unit_locations" not in kwargs
            and "intervene_on_prompt" not in kwargs
            and len(args) <= 1
            and _only_actedit_edits(self)
        ):
            kwargs["intervene_on_prompt"] = True
        with generation():
            if not _direct_hooks_apply(self, args, kwargs):
                return original_generate(self, *args, **kwargs)
            base = args[0] if args else kwargs.pop("base")
            want_original = bool(kwargs.pop("output_original_output", False))
            kwargs = {k: v for k, v in kwargs.items() if k not in _PYVENE_ONLY_ARGUMENTS and k != "intervene_on_prompt"}
            base_outputs = self.model.generate(**base, **kwargs) if want_original else None
            handles = _direct_generation_hooks(self)
            try:
                with contextlib.ExitStack() as frozen:
                    for intervention in self.interventions.values():
                        frozen.enter_context(intervention.frozen())
                    return base_outputs, self.model.generate(**base, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()

    setattr(generate, _PATCHED, True)
    return generate


@contextlib.contextmanager
def cpu_map_location() -> Iterator[None]:
    """Make ``torch.load`` map storages to the CPU, tensors only, while pyvene loads an artifact.

    pyvene behaviour covered: ``IntervenableModel.load`` calls ``torch.load`` without
    ``map_location`` (and ``load_intervention`` hard-codes ``'cuda:0'``), so an artifact whose
    tensors were saved on a GPU fails on a CPU-only machine. actedit saves CPU tensors, this
    covers artifacts written by other tools.
    """
    original = torch.load

    @functools.wraps(original)
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("map_location", "cpu")
        kwargs.setdefault("weights_only", True)  # explicit: wins over TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _create_directory_quietly(path: Union[str, "os.PathLike[str]"]) -> None:
    """Create ``path`` (and its parents) if missing, printing nothing.

    pyvene behaviour covered: ``IntervenableModel.save`` calls ``create_directory``, which prints
    "Directory '...' created successfully." or "... already exists." on stdout. actedit saves
    every artifact into a fresh temporary directory it has just made, so each save printed a
    line about a path the user never chose, in the middle of progress bars.
    """
    os.makedirs(path, exist_ok=True)


def apply() -> None:
    """Install every fix once."""
    global _APPLIED
    if _APPLIED:
        return

    # Hook wipe (see remove_pyvene_hooks).
    modeling_utils.remove_forward_hooks = remove_pyvene_hooks
    intervenable_base.remove_forward_hooks = remove_pyvene_hooks

    # Head sizes (see _dimension_with_head_fix).
    if not getattr(modeling_utils.get_dimension_by_component, _PATCHED, False):
        patched = _dimension_with_head_fix(modeling_utils.get_dimension_by_component)
        modeling_utils.get_dimension_by_component = patched
        intervenable_base.get_dimension_by_component = patched

    # Families pyvene lacks.
    for model_class, prefix, drop in _missing_families():
        register_model_family(model_class, prefix, drop)

    # Save messages (see _create_directory_quietly).
    intervenable_base.create_directory = _create_directory_quietly

    # Position tracker.
    cls = intervenable_base.IntervenableModel
    if not getattr(cls.__init__, _PATCHED, False):
        cls.__init__ = _attach_tracker_on_init(cls.__init__)
    if not getattr(cls.generate, _PATCHED, False):
        cls.generate = _generate_in_generation_context(cls.generate)

    _APPLIED = True


def check_model_supported(model: Any, component: Optional[str] = None) -> None:
    """Raise a clear error when pyvene cannot place a component on ``model``."""
    cls = type(model)
    if cls not in card.type_to_module_mapping:
        known = sorted({c.__name__ for c in card.type_to_module_mapping})
        raise ValueError(
            f"pyvene does not know the model class {cls.__name__}. Supported classes: "
            f"{', '.join(known)}. Register a Llama-like family with "
            "actedit.interventions.compat.register_model_family(ModelClass)."
        )
    if component is not None and component not in card.type_to_module_mapping[cls]:
        raise ValueError(
            f"Component {component!r} is not available on {cls.__name__}; available: "
            f"{', '.join(sorted(card.type_to_module_mapping[cls]))}."
        )


def cast_floating_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating-point buffers to ``dtype`` in place, as ``model.to(dtype=dtype)``
    does for a model loaded without a device map.

    transformers behaviour covered (5.24.0): ``from_pretrained(dtype=...)`` casts the weights but
    keeps buffers computed at init in float32 (Llama's rotary ``inv_freq``);
    :func:`actedit.data.models.load_model` has always cast the whole model, so without this a
    bf16 model spread by a device map ran its rotary embedding in float32 and its logits differed
    from the same model loaded whole. Offloaded buffers (``meta``) are left alone: accelerate
    casts what it loads to the placeholder's dtype.
    """
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if (
                buffer is not None
                and buffer.is_floating_point()
                and buffer.dtype != dtype
                and buffer.device.type != "meta"
            ):
                module._buffers[name] = buffer.to(dtype)
