"""``actedit collect`` / ``fit`` / ``train``: YAML-driven steps from data to an artifact.

A config file (see ``configs/*.yaml``) names the model, the method, the data and each step's
options; ``--set key.sub=value`` overrides any entry (values parsed as YAML). Unknown keys are
errors that list the valid ones. Every step reuses what an earlier run left: collection resumes
from its last complete shard, training from its last epoch checkpoint, and artifacts are written
atomically.

Keys::

    model: smollm2-135m-instruct      # anything actedit.eval.models.load_model takes
    method: hpr                        # hpr | caa | iti | sea | actadd
    data:
      name: truthfulqa_mc              # a loader name (actedit.train.data.LOADERS) or a .jsonl path
      source: ../shared/data/truthfulqa
      split_file: null                 # default: SOURCE/hpr_ids_splits.json
      eval_ratio: 0.1                  # for data without split metadata: seeded train/eval split
      seed: 0
      limit: null                      # first N examples of each split (quick runs)
    collect:   {dir: runs/hpr/activations, site: null, layers: null, dtype: float32, batch_size: 16, format: {}}
    fit:       {}                      # method hyperparameters (e.g. multiplier, alpha, top_k, energy_ratio)
    train:     {}                      # actedit.train.trainer.TrainConfig fields
    select:    {k: 5, strategy: probe_first}   # HPR: probe_first | joint
    out: runs/hpr/artifact
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from actedit.interventions.actadd import ActAddConfig
from actedit.interventions.caa import CAAConfig
from actedit.interventions.hpr import HPRConfig
from actedit.interventions.iti import ITIConfig
from actedit.interventions.layers import LayerSpec, check_layer_spec, model_depth, resolve_layer, resolve_layers
from actedit.interventions.sea import SEAConfig
from actedit.interventions.settings import Settings, UnknownSettingError, check_keys

from .trainer import TrainConfig

METHODS = ("hpr", "caa", "iti", "sea", "actadd")
CLOSED_FORM = ("caa", "iti", "sea", "actadd")
FIT_SETTINGS = {"hpr": HPRConfig, "sea": SEAConfig, "iti": ITIConfig, "caa": CAAConfig, "actadd": ActAddConfig}
"""Method name → the typed settings of its ``fit`` block."""


@dataclass
class DataConfig(Settings):
    """Where the contrast data comes from.

    Attributes:
        name: a loader name of :data:`actedit.train.data.LOADERS` or a ``.jsonl`` file.
        source: local directory/file or Hub id handed to the loader.
        split_file: train/eval/test split file (TruthfulQA; default: ``source``'s HPR split).
        eval_ratio: eval share of a seeded split for data without split metadata.
        seed: seed of that split.
        limit: keep only the first N examples of each split (quick runs).
    """

    name: str = "truthfulqa_mc"
    source: Optional[str] = None
    split_file: Optional[str] = None
    eval_ratio: float = 0.1
    seed: int = 0
    limit: Optional[int] = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_ratio < 1.0:
            raise ValueError(f"data.eval_ratio must be in [0, 1), got {self.eval_ratio}.")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit <= 0):
            raise ValueError(f"data.limit must be a positive integer, got {self.limit!r}.")


@dataclass
class CollectConfig(Settings):
    """Activation collection options.

    Attributes:
        dir: activation store directory (resumed if it exists).
        site: pyvene component; default the method's (:data:`DEFAULT_COMPONENTS`).
        layers: a layer spec (:mod:`actedit.interventions.layers`: a list, ``"10-29"``,
            ``"-20:"``, ``"1/3:"``, ...); default all layers (CAA and ActAdd: their ``fit.layer``).
        dtype: stored precision, ``float32`` or ``float16``.
        batch_size: sequences per forward.
        format: parameters of the method's prompt format (:mod:`actedit.train.formats`).
    """

    dir: str = "runs/activations"
    site: Optional[str] = None
    layers: Optional[LayerSpec] = None
    dtype: str = "float32"
    batch_size: int = 16
    format: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"collect.dtype must be float32, float16 or bfloat16, got {self.dtype!r}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"collect.batch_size must be a positive integer, got {self.batch_size!r}.")
        check_layer_spec(self.layers, "collect.layers")
        if not isinstance(self.format, dict):
            raise ValueError(f"collect.format must be a mapping of format parameters, got {self.format!r}.")


@dataclass
class SelectConfig(Settings):
    """HPR's layer selection.

    Attributes:
        k: layers enabled, the top k by eval probe accuracy (the HPR README's example: 5).
        strategy: ``probe_first`` (all probes, then angle nets of the selected layers only) or
            ``joint`` (every layer's probe and angle net together, then selection).
    """

    k: int = 5
    strategy: str = "probe_first"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"select.k must be a positive integer, got {self.k!r}.")
        if self.strategy not in ("probe_first", "joint"):
            raise ValueError(f"select.strategy must be 'probe_first' or 'joint', got {self.strategy!r}.")


def method_settings(method: str, fit: Any, train: Any, where: str = "") -> tuple:
    """``(fit settings, train settings or None)`` of ``method`` from raw YAML mappings.

    Unknown keys are errors listing the valid ones; a closed-form method has no ``train`` block.
    """
    prefix = f"{where}." if where else ""
    if method not in FIT_SETTINGS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    fit_settings = FIT_SETTINGS[method].from_mapping(fit, f"{prefix}fit")
    if method in CLOSED_FORM:
        if train:
            keys = ", ".join(sorted(train)) if isinstance(train, dict) else repr(train)
            raise UnknownSettingError(f"{prefix}train: {method} is closed-form and has no training settings "
                                      f"(got {keys}); its settings go in {prefix}fit: "
                                      f"{', '.join(FIT_SETTINGS[method].field_names())}.")
        return fit_settings, None
    return fit_settings, TrainConfig.from_mapping(train, f"{prefix}train")


@dataclass
class PipelineConfig:
    """One method's steps, from a YAML file (see the module docstring).

    Attributes:
        model: model spec for :func:`actedit.eval.models.load_model`.
        method: ``hpr``, ``caa``, ``iti``, ``sea`` or ``actadd``.
        data, collect: see :class:`DataConfig`, :class:`CollectConfig`.
        fit: the method's typed settings (:data:`FIT_SETTINGS`; a mapping is converted).
        train: :class:`actedit.train.trainer.TrainConfig` (HPR only; a mapping is converted).
        select: :class:`SelectConfig` (HPR only).
        out: artifact directory.
    """

    model: str = "smollm2-135m-instruct"
    method: str = "hpr"
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    fit: Any = None
    train: Any = None
    select: Any = None
    out: str = "runs/artifact"
    where: str = field(default="", repr=False)
    """Prefix of the config's blocks in error messages (``methods.hpr`` inside a study)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        prefix = f"{self.where}." if self.where else ""
        if not isinstance(self.fit, Settings):
            self.fit, train = method_settings(self.method, self.fit, self.train, self.where)
            self.train = train
        if not isinstance(self.select, SelectConfig):
            if self.select and self.method != "hpr":
                raise UnknownSettingError(f"{prefix}select: only HPR selects layers; {self.method} takes its layers "
                                          "from collect.layers or fit.")
            self.select = SelectConfig.from_mapping(self.select, f"{prefix}select")

    @property
    def site(self) -> str:
        from actedit.interventions import DEFAULT_COMPONENTS

        return self.collect.site or DEFAULT_COMPONENTS[self.method]

    def for_model(self, model) -> "PipelineConfig":
        """A copy whose layer specs are the layer indices they mean on ``model``.

        Raises before any work when a spec does not fit the model's depth (the message names the
        depth), when HPR's ``select.k`` exceeds the layers trained, or when CAA/ActAdd would not
        know which one layer to steer.
        """
        depth = model_depth(model)
        prefix = f"{self.where}." if self.where else ""
        collect = self.collect
        layers = None if collect.layers is None else resolve_layers(collect.layers, depth, f"{prefix}collect.layers")
        fit = self.fit
        if self.method in ("caa", "actadd"):
            layer = None if fit.layer is None else resolve_layer(fit.layer, depth, f"{prefix}fit.layer")
            if layer is None and layers is not None and len(layers) == 1:
                layer = layers[0]
            if layer is None:
                name = "CAA" if self.method == "caa" else "ActAdd"
                raise ValueError(f"{prefix}fit.layer is not set: {name} steers one layer, and the model has {depth} "
                                 f"(set e.g. fit.layer={depth * 2 // 5} or a fraction such as 0.4; it never means "
                                 "every layer).")
            if layers is not None and layer not in layers:
                raise ValueError(f"{prefix}fit.layer {layer} is not among collect.layers {layers}; collect it, or "
                                 "drop collect.layers (only fit.layer is then collected).")
            fit = dataclasses.replace(fit, layer=layer)
            layers = [layer]  # the forward pass stops there
        if self.method == "hpr":
            trained = len(layers) if layers is not None else depth
            if self.select.k > trained:
                raise ValueError(f"{prefix}select.k={self.select.k} exceeds the {trained} layers HPR trains on "
                                 f"this {depth}-layer model.")
        out = copy.copy(self)
        out.collect = dataclasses.replace(collect, layers=layers)
        out.fit = fit
        return out


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
            node = node.setdefault(part, {})
            if node is None:
                node = {}
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a mapping.")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def read_config(path: Optional[str], overrides: Sequence[str] = (), missing: str = "No config file at {path!r}.") \
        -> Dict[str, Any]:
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
    check_keys(raw, [f.name for f in fields(PipelineConfig) if f.name != "where"], "")
    data = DataConfig.from_mapping(raw.pop("data", None), "data")
    collect = CollectConfig.from_mapping(raw.pop("collect", None), "collect")
    return PipelineConfig(data=data, collect=collect, **raw)


# ------------------------------------------------------------------------------------ data
def load_dataset(cfg: PipelineConfig):
    """The contrast (or prompt-pair) dataset with ``train``/``eval`` split metadata, in the shape
    the method reads: CAA gets A/B questions (:func:`~actedit.train.data.to_ab_questions`) and
    SEA one positive and one negative per prompt (:func:`~actedit.train.data.first_responses`)
    unless the data already is so. ActAdd reads one prompt pair and no split."""
    from . import data as data_mod
    from .formats import choice_letter_index

    d = cfg.data
    if d.name.strip().lower().replace("-", "_") == "truthfulqa_mc":
        parts = [data_mod.load_truthfulqa_mc(d.source, split=s, split_file=d.split_file, limit=d.limit)
                 for s in ("train", "eval")]
        dataset = data_mod.ContrastDataset([x for p in parts for x in p], name="truthfulqa_mc/train+eval")
    else:
        dataset = data_mod.load_contrast(d.name, **({"source": d.source} if d.source else {}))
        if d.limit:
            dataset = dataset.select(range(min(d.limit, len(dataset))))
        if cfg.method == "actadd":
            if not isinstance(dataset, data_mod.PromptPairDataset):
                raise ValueError(f"ActAdd reads prompt pairs ({{prompt1, prompt2}} records); {d.name!r} holds "
                                 f"{type(dataset).__name__} items.")
            if len(dataset) != 1:
                raise ValueError(f"ActAdd steers with one prompt pair (Turner et al.: e.g. 'Love' - 'Hate'), but "
                                 f"{d.name!r} holds {len(dataset)}; their per-position matrices cannot be stacked. "
                                 "Keep one pair (data.limit=1 takes the first) and fit one artifact per pair.")
            return dataset
        if not dataset.splits and d.eval_ratio > 0:
            train, evaluation = dataset.train_eval_split(d.eval_ratio, seed=d.seed)
            dataset = type(dataset)(list(train) + list(evaluation), name=dataset.name)
    if isinstance(dataset, data_mod.ContrastDataset):
        if cfg.method == "actadd":
            raise ValueError("ActAdd reads prompt pairs ({prompt1, prompt2} records), not contrast examples; set "
                             "data.name to a JSONL file of prompt pairs.")
        if cfg.method == "caa" and not all(choice_letter_index(t) is not None
                                           for ex in dataset for t in ex.positives + ex.negatives):
            dataset = data_mod.to_ab_questions(dataset, seed=d.seed)
        elif cfg.method == "sea" and any(len(ex.positives) > 1 or len(ex.negatives) > 1 for ex in dataset):
            dataset = data_mod.first_responses(dataset)
    return dataset


def _load_model(cfg: PipelineConfig):
    from actedit.eval.models import load_model

    return load_model(cfg.model)


# --------------------------------------------------------------------------------- steps
def prompt_format(cfg: PipelineConfig, tokenizer, *, quiet: bool = False):
    """The method's prompt format with ``collect.format``; a format that renders through the chat
    template falls back to its plain-text form when the tokenizer has none (a base model), and
    says so (unless ``quiet``)."""
    from .formats import get_format

    fmt, note = get_format(cfg.method, **cfg.collect.format).for_tokenizer(tokenizer)
    if note and not quiet:
        print(f"{cfg.method}: {note}", flush=True)
    return fmt


def collect(cfg: PipelineConfig, model=None, tokenizer=None):
    """Collect (or resume collecting) the activations the method needs; returns the store."""
    from .collect import collect_activations, generate_bases

    if model is None:
        model, tokenizer = _load_model(cfg)
    cfg = cfg.for_model(model)
    dataset = load_dataset(cfg)
    fmt = prompt_format(cfg, tokenizer)
    if cfg.method == "sea" and not all(ex.bases for ex in dataset):
        directory = Path(cfg.collect.dir)
        dataset = generate_bases(model, tokenizer, dataset, fmt, max_new_tokens=cfg.fit.base_tokens,
                                 cache_path=directory.parent / f"{directory.name}_bases.json")
    return collect_activations(model, tokenizer, dataset, cfg.collect.dir,
                               format=fmt, sites=cfg.site,
                               layers=cfg.collect.layers, dtype=cfg.collect.dtype,
                               batch_size=cfg.collect.batch_size)


def _store(cfg: PipelineConfig, model, tokenizer):
    from .collect import ActivationStore

    try:
        return ActivationStore(cfg.collect.dir)
    except (FileNotFoundError, ValueError):
        return collect(cfg, model, tokenizer)


def fit(cfg: PipelineConfig, model=None, tokenizer=None) -> Path:
    """Closed-form fit (CAA, ITI, SEA, ActAdd) from the activation store; writes the artifact."""
    import torch

    from actedit.interventions import intervenable, save_artifact

    from . import fit as fit_mod

    if cfg.method not in CLOSED_FORM:
        raise ValueError(f"'{cfg.method}' is trained, not fitted: use `actedit train` "
                         f"(closed-form methods: {', '.join(CLOSED_FORM)}).")
    if model is None:
        model, tokenizer = _load_model(cfg)
    cfg = cfg.for_model(model)
    store = _store(cfg, model, tokenizer)
    params = cfg.fit
    started = time.time()
    if cfg.method == "caa":
        if params.layer not in store.layers:
            raise ValueError(f"fit.layer {params.layer} is not in the activation store {cfg.collect.dir} (it holds "
                             f"layers {store.layers}); collect that layer or pick one of these.")
        pairs = store.paired_activations(cfg.site, split="train", layers=[params.layer])
        pos, neg = pairs.gather([params.layer], torch.arange(pairs.num_pairs))
        result = fit_mod.fit_caa({params.layer: pos[0]}, {params.layer: neg[0]})
        config = result.config(model, multiplier=params.multiplier, position_policy=params.position_policy,
                               position_start=params.position_start)
    elif cfg.method == "iti":
        train = store.labeled(cfg.site, split="train")
        val = store.labeled(cfg.site, split="eval")
        result = fit_mod.fit_iti(train.acts, train.labels, val.acts, val.labels,
                                 num_heads=int(model.config.num_attention_heads), top_k=params.top_k,
                                 direction=params.direction, alpha=params.alpha, seed=params.seed,
                                 max_iter=params.max_iter)
        config = result.config(model, position_policy=params.position_policy)
    elif cfg.method == "sea":
        roles = store.aligned(("base", "pos", "neg"), cfg.site, split="train")
        result = fit_mod.fit_sea(roles["base"], roles["pos"], roles["neg"], energy_ratio=params.energy_ratio,
                                 feature_function=params.feature_function)
        config = result.config(model, norm_mode=params.norm_mode, position_policy=params.position_policy)
    else:  # actadd
        if params.layer not in store.layers:
            raise ValueError(f"fit.layer {params.layer} is not in the activation store {cfg.collect.dir} (it holds "
                             f"layers {store.layers}); collect that layer or pick one of these.")
        roles = store.aligned(("pos", "neg"), cfg.site, layers=[params.layer])
        result = fit_mod.fit_actadd(roles["pos"], roles["neg"], coefficient=params.coefficient)
        config = result.config(model, position_policy=params.position_policy)
    seconds = time.time() - started
    pvm = intervenable(model, config)
    return save_artifact(pvm, cfg.out, metadata={"data": _data_record(cfg), "timings": {"fit_seconds": seconds}})


def train(cfg: PipelineConfig, model=None, tokenizer=None) -> Path:
    """Train HPR on the store, select the top-k layers by eval probe accuracy, write the artifact
    (only the selected layers) and the accuracy plot.

    ``select.strategy``: ``probe_first`` (default; :func:`~actedit.train.trainer.train_hpr_top_k`:
    all probes, then angle nets on the selected layers only) or ``joint`` (every layer's probe and
    angle net together, :func:`~actedit.train.trainer.train_hpr`, then selection).
    """
    from actedit.interventions import build_hpr_config, intervenable, save_artifact

    from .select import select_layers
    from .trainer import train_hpr, train_hpr_top_k

    if cfg.method != "hpr":
        raise ValueError(f"`actedit train` trains HPR; '{cfg.method}' is closed-form: use `actedit fit`.")
    if model is None:
        model, tokenizer = _load_model(cfg)
    cfg = cfg.for_model(model)
    store = _store(cfg, model, tokenizer)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    train_pairs = store.paired_activations(cfg.site, split="train")
    eval_pairs = store.paired_activations(cfg.site, split="eval")
    hyper = cfg.fit
    module_args = dict(alpha=hyper.alpha, angle_hidden_widths=hyper.angle_hidden_widths, stable=hyper.stable,
                       position_policy=hyper.position_policy)
    train_cfg = dataclasses.replace(cfg.train, checkpoint_dir=cfg.train.checkpoint_dir
                                    or str(out.parent / f".{out.name}.training"))
    k = cfg.select.k
    plot = out.parent / f"{out.name}_probe_accuracy.png"
    started = time.time()
    if cfg.select.strategy == "probe_first":
        result, selection = train_hpr_top_k(train_pairs, eval_pairs, k=k, config=train_cfg, plot_path=plot,
                                            **module_args)
    else:
        result = train_hpr(train_pairs, eval_pairs, config=train_cfg, **module_args)
        selection = select_layers(result.modules, eval_pairs, k=k, plot_path=plot)
    seconds = time.time() - started
    config = build_hpr_config(model, selection.selected, modules=result.modules, alpha=hyper.alpha,
                              position_policy=hyper.position_policy)
    return save_artifact(intervenable(model, config), out, metadata={
        "data": _data_record(cfg), "training": result.summary(), "timings": {"train_seconds": seconds},
        **selection.metadata()})


def _data_record(cfg: PipelineConfig) -> Dict[str, Any]:
    return {"name": cfg.data.name, "source": cfg.data.source, "split_file": cfg.data.split_file,
            "limit": cfg.data.limit, "site": cfg.site}


# ------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set collect.batch_size=8 (repeatable)")
    parser.add_argument("--model", default=None, help="override `model`")
    parser.add_argument("--method", default=None, help="override `method`")
    parser.add_argument("--data", default=None, help="override `data.source`")
    parser.add_argument("--out", default=None, help="override `out` (artifact directory)")


def _config_from_args(args) -> PipelineConfig:
    overrides = list(args.overrides)
    for flag, key in (("model", "model"), ("method", "method"), ("data", "data.source"), ("out", "out")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


def run_collect(args) -> int:
    store = collect(_config_from_args(args))
    print(f"activations in {store.path}")
    return 0


def run_fit(args) -> int:
    print(f"artifact written to {fit(_config_from_args(args))}")
    return 0


def run_train(args) -> int:
    print(f"artifact written to {train(_config_from_args(args))}")
    return 0
