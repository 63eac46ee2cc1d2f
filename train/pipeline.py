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
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

METHODS = ("hpr", "caa", "iti", "sea", "actadd")
CLOSED_FORM = ("caa", "iti", "sea", "actadd")


@dataclass
class DataConfig:
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
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"data.limit must be positive, got {self.limit}.")


@dataclass
class CollectConfig:
    """Activation collection options.

    Attributes:
        dir: activation store directory (resumed if it exists).
        site: pyvene component; default the method's (:data:`DEFAULT_COMPONENTS`).
        layers: layer indices (a list, or an inclusive range ``"10-29"``); default all.
        dtype: stored precision, ``float32`` or ``float16``.
        batch_size: sequences per forward.
        format: parameters of the method's prompt format (:mod:`actedit.train.formats`).
    """

    dir: str = "runs/activations"
    site: Optional[str] = None
    layers: Optional[List[int]] = None
    dtype: str = "float32"
    batch_size: int = 16
    format: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"collect.dtype must be float32, float16 or bfloat16, got {self.dtype!r}.")
        if self.batch_size <= 0:
            raise ValueError("collect.batch_size must be positive.")
        if isinstance(self.layers, str):  # "10-29": an inclusive range
            lo, sep, hi = self.layers.partition("-")
            if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) > int(hi):
                raise ValueError(f"collect.layers must be a list of layer indices or a range like '10-29', "
                                 f"got {self.layers!r}.")
            self.layers = list(range(int(lo), int(hi) + 1))


@dataclass
class PipelineConfig:
    """One method's steps, from a YAML file (see the module docstring).

    Attributes:
        model: model spec for :func:`actedit.eval.models.load_model`.
        method: ``hpr``, ``caa``, ``iti``, ``sea`` or ``actadd``.
        data, collect: see :class:`DataConfig`, :class:`CollectConfig`.
        fit: method hyperparameters for the closed-form fits / the HPR module.
        train: :class:`actedit.train.trainer.TrainConfig` fields.
        select: layer selection (``k``).
        out: artifact directory.
    """

    model: str = "smollm2-135m-instruct"
    method: str = "hpr"
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    fit: Dict[str, Any] = field(default_factory=dict)
    train: Dict[str, Any] = field(default_factory=dict)
    select: Dict[str, Any] = field(default_factory=lambda: {"k": 5})
    out: str = "runs/artifact"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        unknown = set(self.select) - {"k", "strategy"}
        if unknown:
            raise ValueError(f"unknown select keys {sorted(unknown)}; valid: k, strategy.")
        if self.select.get("strategy", "probe_first") not in ("probe_first", "joint"):
            raise ValueError(f"select.strategy must be 'probe_first' or 'joint', got {self.select['strategy']!r}.")

    @property
    def site(self) -> str:
        from actedit.interventions import DEFAULT_COMPONENTS

        return self.collect.site or DEFAULT_COMPONENTS[self.method]


def _typed(cls, values: Any, where: str):
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}.")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(where + '.' + k if where else k for k in unknown)}; "
                         f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(valid))}.")
    return values


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
    _typed(PipelineConfig, raw, "")
    data = DataConfig(**_typed(DataConfig, raw.pop("data", None), "data"))
    collect = CollectConfig(**_typed(CollectConfig, raw.pop("collect", None), "collect"))
    return PipelineConfig(data=data, collect=collect, **raw)


# ------------------------------------------------------------------------------------ data
def load_dataset(cfg: PipelineConfig):
    """The contrast (or prompt-pair) dataset with ``train``/``eval`` split metadata, in the shape
    the method reads: CAA gets A/B questions (:func:`~actedit.train.data.to_ab_questions`) and
    SEA one positive and one negative per prompt (:func:`~actedit.train.data.first_responses`)
    unless the data already is so."""
    from . import data as data_mod
    from .formats import choice_letter_index

    d = cfg.data
    if d.name.strip().lower().replace("-", "_") == "truthfulqa_mc":
        parts = [data_mod.load_truthfulqa_mc(d.source, split=s, split_file=d.split_file, limit=d.limit)
                 for s in ("train", "eval")]
        dataset = data_mod.ContrastDataset([x for p in parts for x in p], name="truthfulqa_mc/train+eval")
    else:
        dataset = data_mod.load_contrast(d.name, **({"source": d.source} if d.source else {}))
        if not dataset.splits and d.eval_ratio > 0:
            train, evaluation = dataset.train_eval_split(d.eval_ratio, seed=d.seed)
            dataset = type(dataset)(list(train) + list(evaluation), name=dataset.name)
        if d.limit:
            dataset = dataset.select(range(min(d.limit, len(dataset))))
    if isinstance(dataset, data_mod.ContrastDataset):
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
def collect(cfg: PipelineConfig, model=None, tokenizer=None):
    """Collect (or resume collecting) the activations the method needs; returns the store."""
    from .collect import collect_activations
    from .formats import get_format

    if model is None:
        model, tokenizer = _load_model(cfg)
    dataset = load_dataset(cfg)
    fmt = get_format(cfg.method, **cfg.collect.format)
    if cfg.method == "sea" and not all(ex.bases for ex in dataset):
        from .collect import generate_bases

        directory = Path(cfg.collect.dir)
        dataset = generate_bases(model, tokenizer, dataset, fmt, max_new_tokens=int(cfg.fit.get("base_tokens", 32)),
                                 cache_path=directory.parent / f"{directory.name}_bases.json")
    return collect_activations(model, tokenizer, dataset, cfg.collect.dir,
                               format=fmt, sites=cfg.site,
                               layers=_collect_layers(cfg), dtype=cfg.collect.dtype,
                               batch_size=cfg.collect.batch_size)


def _collect_layers(cfg: PipelineConfig) -> Optional[List[int]]:
    """``collect.layers``; unset for CAA with a fixed ``fit.layer``: that layer alone (the forward
    pass stops there: 13 of SmolLM2's 30 layers for the default layer 12)."""
    if cfg.collect.layers is None and cfg.method == "caa" and cfg.fit.get("layer") is not None:
        return [int(cfg.fit["layer"])]
    return cfg.collect.layers


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
    store = _store(cfg, model, tokenizer)
    params = dict(cfg.fit)
    started = time.time()
    if cfg.method == "caa":
        pairs = store.paired_activations(cfg.site, split="train")
        layers = pairs.layers
        pos, neg = pairs.gather(layers, torch.arange(pairs.num_pairs))
        result = fit_mod.fit_caa({l: pos[i] for i, l in enumerate(layers)}, {l: neg[i] for i, l in enumerate(layers)})
        layer = params.pop("layer", None)
        if layer is not None:
            if int(layer) not in result.vectors:
                raise ValueError(f"fit.layer {layer} is not in the activation store {cfg.collect.dir} (it holds "
                                 f"layers {layers}); collect that layer or pick one of these.")
            result.vectors = {int(layer): result.vectors[int(layer)]}
        config = result.config(model, **params)
    elif cfg.method == "iti":
        train = store.labeled(cfg.site, split="train")
        val = store.labeled(cfg.site, split="eval")
        result = fit_mod.fit_iti(train.acts, train.labels, val.acts, val.labels,
                                 num_heads=int(model.config.num_attention_heads),
                                 **{k: v for k, v in params.items() if k != "position_policy"})
        config = result.config(model, position_policy=params.get("position_policy"))
    elif cfg.method == "sea":
        roles = store.aligned(("base", "pos", "neg"), cfg.site, split="train")
        params.pop("base_tokens", None)
        fit_args = {k: params.pop(k) for k in ("energy_ratio", "feature_function") if k in params}
        result = fit_mod.fit_sea(roles["base"], roles["pos"], roles["neg"], **fit_args)
        config = result.config(model, **params)
    else:  # actadd
        roles = store.aligned(("pos", "neg"), cfg.site)
        coefficient = params.pop("coefficient", 1.0)
        result = fit_mod.fit_actadd(roles["pos"], roles["neg"], coefficient=coefficient)
        config = result.config(model, **params)
    seconds = time.time() - started
    pvm = intervenable(model, config)
    return save_artifact(pvm, cfg.out, data=_data_record(cfg), timings={"fit_seconds": seconds})


def train(cfg: PipelineConfig, model=None, tokenizer=None) -> Path:
    """Train HPR on the store, select the top-k layers by eval probe accuracy, write the artifact
    (only the selected layers) and the accuracy plot.

    ``select.strategy``: ``probe_first`` (default; :func:`~actedit.train.trainer.train_hpr_top_k`:
    all probes, then angle nets on the selected layers only) or ``joint`` (every layer's probe and
    angle net together, :func:`~actedit.train.trainer.train_hpr`, then selection).
    """
    from actedit.interventions import build_hpr_config, intervenable, save_artifact

    from .select import select_layers
    from .trainer import TrainConfig, train_hpr, train_hpr_top_k

    if cfg.method != "hpr":
        raise ValueError(f"`actedit train` trains HPR; '{cfg.method}' is closed-form: use `actedit fit`.")
    if model is None:
        model, tokenizer = _load_model(cfg)
    store = _store(cfg, model, tokenizer)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    train_pairs = store.paired_activations(cfg.site, split="train")
    eval_pairs = store.paired_activations(cfg.site, split="eval")
    hyper = dict(cfg.fit)
    train_cfg = TrainConfig(**{"checkpoint_dir": str(out.parent / f".{out.name}.training"), **cfg.train})
    k = int(cfg.select.get("k", 5))
    plot = out.parent / f"{out.name}_probe_accuracy.png"
    started = time.time()
    if cfg.select.get("strategy", "probe_first") == "probe_first":
        result, selection = train_hpr_top_k(train_pairs, eval_pairs, k=k, config=train_cfg, plot_path=plot, **hyper)
    else:
        result = train_hpr(train_pairs, eval_pairs, config=train_cfg, **hyper)
        selection = select_layers(result.modules, eval_pairs, k=k, plot_path=plot)
    seconds = time.time() - started
    config = build_hpr_config(model, selection.selected, modules=result.modules,
                              **{k: v for k, v in hyper.items() if k in ("alpha", "position_policy")})
    return save_artifact(intervenable(model, config), out, data=_data_record(cfg),
                         training=result.summary(), timings={"train_seconds": seconds},
                         **selection.metadata())


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
