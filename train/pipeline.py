"""From data to an edit, for any registered method: ``actedit collect`` / ``fit`` / ``train``.

The steps read everything method-specific from the method's spec
(:mod:`actedit.interventions.registry`): its settings class, site, prompt format, the store view
its fit reads, and whether it is fitted in closed form or trained. Nothing here branches on a
method's name.

1. **Data** (:func:`load_dataset`): a task's contrast data (``truthfulqa``, ``bbq``, ``seq``,
   ``toxigen``) or a JSONL file, put in the shape the method's format reads
   (:meth:`~actedit.data.formats.PromptFormat.prepare`), with a seeded train/eval split when the
   method selects on eval data and the data has none.
2. **Layers** (:meth:`PipelineConfig.for_model`): the settings' layer spec resolved against the
   model's depth right after it loads, before any work.
3. **Collect** (:func:`collect`): the format's activations at the method's site and layers, into a
   resumable store directory or in memory; base completions first where the format needs them.
4. **Fit or train** (:func:`make_edit`): the method's closed-form fit on the store view it reads,
   or training on its loss terms (top-k layers by eval probe accuracy), giving an
   ``IntervenableConfig``.
5. **Save** (:func:`build`): the artifact, atomically.

A YAML config (``configs/*.yaml``) names the model, the method, the data and each step's options;
``--set key.sub=value`` overrides any entry (values parsed as YAML). Unknown keys are errors that
list the valid ones. Keys::

    model: smollm2-135m-instruct      # anything actedit.data.models.load_model takes
    method: hpr                        # a registered method: actadd | caa | iti | sea | hpr
    data:
      name: truthfulqa                 # a task (truthfulqa, bbq, seq, toxigen) or a .jsonl path
      source: ../shared/data/truthfulqa
      split_file: null                 # default: SOURCE/hpr_ids_splits.json
      eval_ratio: 0.1                  # data without split metadata: seeded train/eval split
      seed: 0
      limit: null                      # first N examples of each split (quick runs)
    collect:   {dir: runs/hpr/activations, dtype: float32, batch_size: 16, format: {}}
    settings:  {layers: null, ...}     # the method's settings (HPRSettings, ...; strength: its strength)
    train:     {}                      # trained methods: actedit.train.trainer.TrainSettings fields
    out: runs/hpr/artifact
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, cast

import pyvene as pv
import torch
import yaml

from actedit.data.collect import collect_activations
from actedit.data.contrast import ContrastDataset, PromptPair
from actedit.data.formats import PromptFormat, get_format
from actedit.data.generate import generate_bases
from actedit.data.models import load_model
from actedit.data.store import STORE_DTYPES, ActivationStore
from actedit.data.tasks import is_task, load_contrast
from actedit.interventions.artifacts import save_artifact
from actedit.interventions.edits import edit_config, intervenable, site_width
from actedit.interventions.layers import model_depth, resolve_layers
from actedit.interventions.registry import (
    FitContext,
    FitResult,
    MethodSettings,
    MethodSpec,
    TrainingRecipe,
    method_spec,
)
from actedit.interventions.settings import Settings, UnknownSettingError, check_keys, check_moved

from .select import select_layers
from .trainer import TrainSettings, new_interventions, train_interventions, train_top_layers


@dataclass
class DataSettings(Settings):
    """Where the contrast data comes from.

    Attributes:
        name: a registered task (``truthfulqa``, ``bbq``, ``seq``, ``toxigen``) or a ``.jsonl`` file.
        source: where the task's questions are (local directory/file/archive or Hub id; default:
            the task's own default, e.g. the fetched bigbench sdist).
        split_file: train/eval/test split file (default: TruthfulQA: ``source``'s HPR split;
            other tasks: their own seeded rule).
        eval_ratio: eval share of a seeded split, for data without split metadata and methods
            that select on eval data.
        seed: seed of that split and of format conversions (CAA's A/B letter order).
        limit: keep only the first N examples of each split (quick runs).
    """

    name: str = "truthfulqa"
    source: Optional[str] = None
    split_file: Optional[str] = None
    eval_ratio: float = 0.1
    seed: int = 0
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ValueError(f"data.eval_ratio must be in [0, 1), got {self.eval_ratio}.")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit <= 0
        ):
            raise ValueError(f"data.limit must be a positive integer, got {self.limit!r}.")


@dataclass
class CollectSettings(Settings):
    """Activation collection options (the layers and the site are the method's settings).

    Attributes:
        dir: activation store directory (resumed if it exists); None: held in memory.
        dtype: stored precision, ``float32``, ``float16`` or ``bfloat16``.
        batch_size: sequences per padded batch (the reference path; packed rows are the default).
        format: parameters of the method's prompt format (:mod:`actedit.data.formats`).
    """

    MOVED = {"layers": "settings.layers", "site": "settings.site"}

    dir: Optional[str] = "runs/activations"
    dtype: str = "float32"
    batch_size: int = 16
    format: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"collect.dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"collect.batch_size must be a positive integer, got {self.batch_size!r}.")
        if not isinstance(self.format, dict):
            raise ValueError(f"collect.format must be a mapping of format parameters, got {self.format!r}.")


def method_settings(
    method: str, settings: Any, train: Any, where: str = ""
) -> Tuple[MethodSettings, Optional[TrainSettings]]:
    """``(the method's settings, its training settings or None)`` from raw YAML mappings.

    Unknown keys are errors listing the valid ones; a closed-form method has no ``train`` block.
    """
    prefix = f"{where}." if where else ""
    spec = method_spec(method)
    values = spec.settings(settings, f"{prefix}settings")
    if not spec.trained:
        if train:
            keys = ", ".join(sorted(train)) if isinstance(train, dict) else repr(train)
            raise UnknownSettingError(
                f"{prefix}train: {spec.name} is closed-form and has no training settings "
                f"(got {keys}); its settings go in {prefix}settings: "
                f"{', '.join(spec.settings_class.field_names())}."
            )
        return values, None
    return values, TrainSettings.from_mapping(train, f"{prefix}train")


@dataclass
class PipelineConfig:
    """One method's steps, from a YAML file (see the module docstring).

    Attributes:
        model: model spec for :func:`actedit.data.models.load_model`.
        method: a registered method name.
        data, collect: see :class:`DataSettings`, :class:`CollectSettings`.
        settings: the method's settings (its ``MethodSpec.settings_class``; a mapping is converted).
        train: :class:`~actedit.train.trainer.TrainSettings` of a trained method (a mapping is converted).
        out: artifact directory (None: the edit is returned, not saved).
        where: prefix of the config's blocks in error messages (``methods.hpr`` inside a study).
        depth: the depth of the model the layer spec was resolved for (:meth:`for_model`); None: not yet.
    """

    model: str = "smollm2-135m-instruct"
    method: str = "hpr"
    data: DataSettings = field(default_factory=DataSettings)
    collect: CollectSettings = field(default_factory=CollectSettings)
    settings: Any = None
    train: Any = None
    out: Optional[str] = "runs/artifact"
    where: str = field(default="", repr=False)
    depth: Optional[int] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.method = method_spec(self.method).name
        if not isinstance(self.settings, MethodSettings):
            self.settings, self.train = method_settings(self.method, self.settings, self.train, self.where)
        if self.reads_prompt_pairs and is_task(self.data.name):
            prefix = f"{self.where}." if self.where else ""
            raise ValueError(
                f"{prefix}data: {self.method} reads prompt pairs ({{prompt1, prompt2}} records, e.g. "
                f"'Love' / 'Hate'), not the contrast questions of the task {self.data.name!r}; set "
                f"{prefix}data.name to a JSONL file of prompt pairs."
            )

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.method)

    @property
    def site(self) -> str:
        return self.spec.component(self.settings)

    @property
    def reads_prompt_pairs(self) -> bool:
        """Whether the method's prompt format reads (prompt₁, prompt₂) pairs (ActAdd) rather than
        contrast examples (building the format also checks ``collect.format``)."""
        return get_format(self.spec.format, **self.collect.format).accepts is PromptPair

    def _resolved_layers(self, depth: int) -> bool:
        """Whether the settings' layers are already indices of a ``depth``-layer model (a settings
        object replaced after :meth:`for_model` is resolved again)."""
        layers = self.settings.layers
        return isinstance(layers, list) and all(type(x) is int and 0 <= x < depth for x in layers)

    def for_model(self, model) -> "PipelineConfig":
        """This config with its layer spec resolved to the layer indices it means on ``model``
        (once: a config already resolved for a model of this depth is returned as it is).

        Raises before any work when the spec does not fit the model's depth (the message names
        the depth), when a method that steers chosen layers has none set, or when a trained
        method's ``top_layers`` exceeds the layers it trains.
        """
        depth = model_depth(model)
        if self.depth == depth and self._resolved_layers(depth):
            return self
        spec = self.spec
        prefix = f"{self.where}." if self.where else ""
        layers = self.settings.layers if self.settings.layers is not None else spec.default_layers
        if layers is None:
            raise ValueError(
                f"{prefix}settings.layers is not set: {spec.name} steers the layers you choose, and "
                f"the model has {depth} (set e.g. settings.layers={depth * 2 // 5}, or a fraction of "
                "the depth such as 0.4; it never means every layer)."
            )
        layers = resolve_layers(layers, depth, f"{prefix}settings.layers")
        top_layers = getattr(self.settings, "top_layers", None)
        selection = spec.training.selection if spec.training is not None else None
        if spec.trained and selection != "fixed" and top_layers is not None and top_layers > len(layers):
            raise ValueError(
                f"{prefix}settings.top_layers={top_layers} exceeds the {len(layers)} layers {spec.name} "
                f"trains on this {depth}-layer model."
            )
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, layers=layers), depth=depth)


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """``key.sub=value`` assignments (values parsed as YAML) applied to a raw config dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value.")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a mapping.")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def read_config(
    path: Optional[str], overrides: Sequence[str] = (), missing: str = "No config file at {path!r}."
) -> Dict[str, Any]:
    """The mapping a YAML file holds (empty when ``path`` is None), with ``key.sub=value``
    overrides applied; ``missing`` is the error message for a path that is not a file."""
    raw: Dict[str, Any] = {}
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(missing.format(path=path))
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a YAML mapping.")
    return apply_overrides(raw, overrides)


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    raw = read_config(path, overrides)
    check_moved(raw, {"select": "settings.top_layers and settings.strategy", "fit": "settings"}, "")
    check_keys(raw, [f.name for f in fields(PipelineConfig) if f.name not in ("where", "depth")], "")
    data = DataSettings.from_mapping(raw.pop("data", None), "data")
    collect_cfg = CollectSettings.from_mapping(raw.pop("collect", None), "collect")
    return PipelineConfig(data=data, collect=collect_cfg, **raw)


# ------------------------------------------------------------------------------------ data
def load_dataset(cfg: PipelineConfig, fmt: Optional[PromptFormat] = None):
    """The method's data (``data.name``: :func:`actedit.data.tasks.load_contrast`), prepared by
    :func:`prepare_dataset`."""
    d = cfg.data
    return prepare_dataset(cfg, load_contrast(d.name, source=d.source, split_file=d.split_file, limit=d.limit), fmt)


def prepare_dataset(cfg: PipelineConfig, dataset, fmt: Optional[PromptFormat] = None):
    """A dataset in the shape the method's format reads (:meth:`PromptFormat.prepare`), split
    into train/eval where the method selects on eval data and the data says nothing
    (``data.eval_ratio``, ``data.seed``), else read as one train split."""
    d, spec = cfg.data, cfg.spec
    fmt = fmt or get_format(spec.format, **cfg.collect.format)
    dataset = fmt.prepare(dataset, seed=d.seed)
    if spec.splits and isinstance(dataset, ContrastDataset) and not dataset.splits:
        if "eval" in spec.splits and d.eval_ratio > 0:
            train, evaluation = dataset.train_eval_split(d.eval_ratio, seed=d.seed)
            dataset = type(dataset)(list(train) + list(evaluation), name=dataset.name)
        else:
            dataset = dataset.with_split("train")
    return dataset


# --------------------------------------------------------------------------------- steps
def prompt_format(cfg: PipelineConfig, tokenizer, *, quiet: bool = False) -> PromptFormat:
    """The method's prompt format with ``collect.format``; a format that renders through the chat
    template falls back to its plain-text form when the tokenizer has none (a base model), and
    says so (unless ``quiet``)."""
    fmt, note = get_format(cfg.spec.format, **cfg.collect.format).for_tokenizer(tokenizer)
    if note and not quiet:
        print(f"{cfg.method}: {note}", flush=True)
    return fmt


def collect(
    cfg: PipelineConfig, model=None, tokenizer=None, *, dataset=None, progress: bool = True, quiet: bool = False
) -> ActivationStore:
    """Collect (or resume collecting) the activations the method needs; returns the store.

    ``dataset`` replaces the configured data (the one-call API passes the user's examples).
    """
    if model is None:
        model, tokenizer = load_model(cfg.model)
    cfg = cfg.for_model(model)
    fmt = prompt_format(cfg, tokenizer, quiet=quiet)
    data = load_dataset(cfg, fmt) if dataset is None else dataset
    directory = Path(cfg.collect.dir) if cfg.collect.dir is not None else None
    if fmt.needs_bases(data):
        cache = directory.parent / f"{directory.name}_bases.json" if directory is not None else None
        data = generate_bases(
            model,
            tokenizer,
            data,
            fmt,
            max_new_tokens=getattr(cfg.settings, "base_tokens", 32),
            cache_path=cache,
            progress=progress,
        )
    return collect_activations(
        model,
        tokenizer,
        data,
        directory,
        format=fmt,
        sites=cfg.site,
        layers=cfg.settings.layers,
        dtype=cfg.collect.dtype,
        batch_size=cfg.collect.batch_size,
        progress=progress,
    )


def _store(cfg: PipelineConfig, model, tokenizer, progress: bool) -> ActivationStore:
    """The complete store of ``collect.dir``, collecting (or resuming) it when needed."""
    if cfg.collect.dir is not None:
        try:
            return ActivationStore(cfg.collect.dir)
        except (FileNotFoundError, ValueError):
            pass
    return collect(cfg, model, tokenizer, progress=progress)


def fit_inputs(
    store: ActivationStore, spec: MethodSpec, site: str, layers: Sequence[int], *, stream: bool = True
) -> Dict[str, Any]:
    """What a closed-form fit reads (``spec.reads``, see :data:`~actedit.interventions.registry.VIEWS`).

    ``stream`` (default): every layer map is a :class:`~actedit.data.store.LayerActivations`
    that reads a layer from the store's shards when the fit visits it, so a fit holds one layer
    at a time and its memory does not grow with the number of layers; False reads every layer
    into memory first (the reference the streaming path is tested against)."""
    layers = list(layers)
    missing = [layer for layer in layers if layer not in store.layers]
    if missing:
        where = store.path if store.path is not None else "in memory"
        raise ValueError(
            f"layers {missing} are not in the activation store ({where}: it holds {store.layers}); "
            "collect them or choose among these."
        )
    split = spec.splits[0] if spec.splits else None
    if spec.reads == "paired":
        pairs = store.pair_index(split=split)
        return {
            role: store.load_layers(site, layers, rows=pairs.index[:, column], stream=stream)
            for column, role in enumerate(("pos", "neg"))
        }
    if spec.reads == "labeled":
        out = {}
        for name in spec.splits:
            rows = store.labeled(site, split=name, layers=layers, stream=stream)
            out[name] = (rows.acts, rows.labels)
        return out
    return store.aligned(spec.roles, site, split=split, layers=layers, stream=stream)


def make_edit(
    cfg: PipelineConfig, model, tokenizer, *, store: Optional[ActivationStore] = None, progress: bool = True
) -> Tuple[pv.IntervenableConfig, Dict[str, Any]]:
    """The method's edit of ``model``: ``(IntervenableConfig, metadata)``, fitted in closed form
    or trained on the store (collected first when not given)."""
    cfg = cfg.for_model(model)
    spec, settings = cfg.spec, cfg.settings
    store = store if store is not None else _store(cfg, model, tokenizer, progress)
    started = time.time()
    if spec.trained:
        modules, metadata = _train(cfg, store, progress)
    else:
        context = FitContext(width=site_width(model, cfg.site), num_heads=int(model.config.num_attention_heads))
        fit_method = cast(Callable[..., FitResult], spec.fit)  # a method that is not trained has a fit (MethodSpec)
        fitted = fit_method(fit_inputs(store, spec, cfg.site, settings.layers), settings, context)
        modules, metadata = fitted.modules, {"fit": fitted.record}
    metadata["timings"] = {"fit_seconds": round(time.time() - started, 3)}
    metadata["data"] = _data_record(cfg)
    config = edit_config(
        model, spec.name, modules, component=cfg.site, hyperparameters=settings.to_dict(), metadata=metadata
    )
    return config, metadata


def _train(cfg: PipelineConfig, store: ActivationStore, progress: bool) -> Tuple[Dict[int, Any], Dict[str, Any]]:
    """A trained method's modules, trained and selected as its recipe declares
    (:class:`~actedit.interventions.registry.TrainingRecipe`): the top ``settings.top_layers``
    layers enabled; with ``keep_layers: all`` every trained layer kept, the others switched off."""
    spec, settings = cfg.spec, cfg.settings
    recipe = cast(TrainingRecipe, spec.training)  # a trained spec has one (checked at registration)
    out = Path(cfg.out) if cfg.out is not None else None
    # the spec's view (``paired``, the one the trainer reads; checked when the method registered)
    train_cfg = dataclasses.replace(cfg.train, progress=cfg.train.progress and progress)

    def pairs(split: str):
        return store.paired_activations(cfg.site, split=split, layers=settings.layers, stream=train_cfg.stream)

    train_pairs = pairs("train")
    eval_pairs = pairs("eval") if "eval" in spec.splits else None
    if out is not None and train_cfg.checkpoint_dir is None:
        train_cfg = dataclasses.replace(train_cfg, checkpoint_dir=str(out.parent / f".{out.name}.training"))
    modules = new_interventions(
        spec, train_pairs.width, settings.layers, seed=train_cfg.seed, **settings.intervention_arguments()
    )
    k = len(modules) if recipe.selection == "fixed" else settings.top_layers
    if settings.strategy == "probe_first":
        result, selection = train_top_layers(
            modules, train_pairs, eval_pairs, k=k, config=train_cfg, keep_layers=settings.keep_layers
        )
    else:
        result = train_interventions(modules, train_pairs, eval_pairs, config=train_cfg)
        selection = select_layers(
            cast(Dict[int, torch.nn.Module], result.modules),
            eval_pairs,
            k=k,
            metric=recipe.selection,
            loss_method=recipe.selecting.method,
        )
    trained = cast(Dict[int, torch.nn.Module], result.modules)  # cached-activation training returns its modules
    if settings.keep_layers == "all":
        for layer, module in trained.items():
            cast(Any, module).set_enabled(layer in selection.selected)
        chosen = dict(trained)
    else:
        chosen = {layer: trained[layer] for layer in selection.selected}
    return chosen, {"training": result.summary(), **selection.metadata()}


def build(
    cfg: PipelineConfig,
    model=None,
    tokenizer=None,
    *,
    describe: Optional[Callable[[pv.IntervenableModel, Any], Dict[str, Any]]] = None,
) -> Tuple[Path, Dict[str, Any]]:
    """Collect (if needed), fit or train, and write the artifact to ``cfg.out``; returns its path
    and the edit's metadata. ``describe(pvm, tokenizer)``, if given, returns more metadata for the
    artifact, measured on the edited model before it is saved (the CLI passes the edit's effect)."""
    if model is None:
        model, tokenizer = load_model(cfg.model)
    config, metadata = make_edit(cfg, model, tokenizer)
    pvm = intervenable(model, config)
    extra = describe(pvm, tokenizer) if describe is not None else None
    return save_artifact(pvm, cast(str, cfg.out), metadata=extra), metadata  # build() is for a cfg with out


def _data_record(cfg: PipelineConfig) -> Dict[str, Any]:
    return {
        "name": cfg.data.name,
        "source": cfg.data.source,
        "split_file": cfg.data.split_file,
        "limit": cfg.data.limit,
        "site": cfg.site,
    }


__all__ = [
    "CollectSettings",
    "DataSettings",
    "PipelineConfig",
    "apply_overrides",
    "build",
    "collect",
    "fit_inputs",
    "load_config",
    "load_dataset",
    "make_edit",
    "method_settings",
    "prepare_dataset",
    "prompt_format",
    "read_config",
]
