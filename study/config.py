"""The study's YAML: typed settings for ``actedit run`` (``configs/default.yaml`` is the default).

Keys::

    model: smollm2-135m-instruct   # anything actedit.data.models.load_model takes
    dtype: auto                    # auto | float32 | bfloat16 | float16: the model's precision
    device: null                   # cpu | cuda | cuda:N (default: CUDA when available)
    device_map: null               # auto | balanced | sequential | {module: device}: spread the model (accelerate)
    data: {name: truthfulqa, source: null, split_file: null, limit: null}   # what the edits are fitted on
    out: runs/study
    methods:                       # registered methods, in the order the report lists them
      hpr: {settings: {top_layers: 5}, train: {epochs: 5}}
      sea: {settings: {layers: "1/3:"}}
      caa: {settings: {layers: 0.4}}
      actadd: {data: {name: pairs.jsonl}, settings: {layers: 6, coefficient: 5}}   # ActAdd needs a prompt pair
    compose: all                   # all | none | a list of rows
    eval: {task: truthfulqa, split: test, limit: null, batch_size: 64, task_options: {mc2_rule: split}}
    seeds: null                    # [0, 1, 2]: every trained row once per training seed, mean ± sd
    sweep: null                    # instead of one edit per row, sweep rows' settings (SweepSettings)

A row of ``methods`` named otherwise than a method says which one it runs
(``hpr_no_angle: {method: hpr, settings: {angle_prediction: false}}``).

Every block is checked when the file is read (unknown keys, bad values), and every method's
layer spec against the model right after it loads, before any work.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch

from actedit.data.models import check_device_map
from actedit.data.tasks import task_spec
from actedit.interventions.registry import method_names, method_spec
from actedit.interventions.settings import Settings, check_keys, check_moved
from actedit.train.pipeline import CollectSettings, DataSettings, PipelineConfig, read_config

from .finetunes import FINETUNES, FinetuneSpec

METHOD_KEYS = ("method", "collect", "settings", "train", "data")
"""What a row's block in ``methods`` may hold: ``method`` (the registered method it runs; default:
the row's name, so ``hpr: {...}`` is HPR), ``data`` (overrides the study's data), ``collect``,
``settings``, ``train``."""

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""The model precisions a study runs in."""


def resolve_dtype(dtype: str, device: str) -> str:
    """The model precision ``dtype`` stands for on ``device``: itself, or for ``auto`` bfloat16
    where the hardware multiplies bf16 natively (a CUDA GPU with bf16 support; a CPU with
    AVX512-BF16 or AMX) and float32 elsewhere (emulated bf16 is slower than fp32)."""
    if dtype != "auto":
        return dtype
    if str(device).startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    cpu = getattr(torch, "cpu", None)
    native = any(
        bool(getattr(cpu, probe, lambda: False)()) for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return "bfloat16" if native else "float32"


@dataclass
class EvalSettings(Settings):
    """How the study evaluates.

    Attributes:
        task: a registered multiple-choice task (:mod:`actedit.data.tasks`).
        source: where the task's questions come from (default: ``data.source``).
        split_file: the task's split file (default: ``data.split_file``).
        split: the split scored (``test``: HPR's 409 TruthfulQA questions).
        limit: score only the first N questions of the split (quick runs).
        batch_size: continuation rows per forward call of the reference scorer.
        task_options: the task's options (TruthfulQA: ``mc2_rule`` ``split`` = lm-eval
            truthfulqa_mc2 v2.0, or ``labels`` = v3.0).
        analyses: measure norm drift, KL to base and flips (a few seconds per method).
        norm_texts: test questions whose residual-stream norms are compared.
    """

    MOVED = {"mc2_rule": "eval.task_options.mc2_rule"}

    task: str = "truthfulqa"
    source: Optional[str] = None
    split_file: Optional[str] = None
    split: str = "test"
    limit: Optional[int] = None
    batch_size: int = 64
    task_options: Dict[str, Any] = field(default_factory=dict)
    analyses: bool = True
    norm_texts: int = 32

    def __post_init__(self) -> None:
        spec = task_spec(self.task)
        self.task = spec.name
        if self.split not in ("train", "eval", "test", "all"):
            raise ValueError(f"eval.split must be train, eval, test or all, got {self.split!r}.")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"eval.limit must be a positive integer or null, got {self.limit!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be a positive integer, got {self.batch_size!r}.")
        spec.options(self.task_options, "eval.task_options")

    @property
    def options(self):
        """The task's options, typed."""
        return task_spec(self.task).options(self.task_options, "eval.task_options")


SWEEP_MODES = ("curves", "grid")
"""How a sweep combines its axes: ``curves`` varies one axis at a time around the row's own
settings (one curve per axis); ``grid`` takes every combination."""


@dataclass
class ChoiceRule(Settings):
    """How a sweep chooses a row's point on the choice split (:attr:`SweepSettings.choose_split`).

    Attributes:
        metric: the task metric to maximise (default: the task's last, TruthfulQA's MC2).
        max_kl: the largest mean KL(base ‖ edited) on neutral text (nats/token) a chosen point may
            have; None: no budget.
        max_loss_increase: the largest increase of the LM loss on neutral text (nats/token) over the
            base model's a chosen point may have; None: no budget.
    """

    metric: Optional[str] = None
    max_kl: Optional[float] = None
    max_loss_increase: Optional[float] = None

    def __post_init__(self) -> None:
        for key in ("max_kl", "max_loss_increase"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"sweep.choose.{key} must be a non-negative number or null, got {value!r}.")

    def describe(self, metric: str) -> str:
        """The rule in words."""
        budget = []
        if self.max_kl is not None:
            budget.append(f"KL ≤ {self.max_kl}")
        if self.max_loss_increase is not None:
            budget.append(f"LM-loss increase ≤ {self.max_loss_increase}")
        return f"best {metric.upper()}" + (f" with {' and '.join(budget)} on neutral text" if budget else "")


@dataclass
class MethodSweep(Settings):
    """The axes a sweep varies for one row (each a list of values; see :data:`SWEEP_MODES`).

    Attributes:
        strength: values of the method's strength (ITI's and HPR's α, CAA's multiplier, ActAdd's
            coefficient). Where the fitted module keeps it in a buffer (``INFERENCE_ONLY``) the
            row fits once and each strength is set on the fitted module.
        layers: layer specs, one point each (``[6, 9, 12]`` steers one layer per point;
            ``["1/3:", "all"]`` gives HPR/ITI their candidate layers). Every point's layers are
            collected once, together.
        examples: training examples per split (``25``, ``50``, ``all``): each point fits on the
            first N examples of each split of one collection (what ``data.limit: N`` would fit on).
        settings: any other setting of the method, name → values (``{top_heads: [16, 48]}``).
    """

    strength: Optional[List[float]] = None
    layers: Optional[List[Any]] = None
    examples: Optional[List[Union[int, str]]] = None
    settings: Dict[str, List[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("strength", "layers", "examples"):
            values = getattr(self, key)
            if values is not None and (not isinstance(values, list) or not values):
                raise ValueError(f"{key} must be a non-empty list of values, got {values!r}.")
        for number in self.strength or []:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ValueError(f"strength values must be numbers, got {number!r}.")
        for count in self.examples or []:
            if count != "all" and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                raise ValueError(f"examples values must be positive integers or 'all', got {count!r}.")
        if not isinstance(self.settings, dict):
            raise ValueError(f"settings must map setting names to lists of values, got {self.settings!r}.")
        for key, values in self.settings.items():
            if key in ("layers", "strength"):
                raise ValueError(f"settings.{key}: sweep it with the {key} axis (a key of its own).")
            if not isinstance(values, list) or not values:
                raise ValueError(f"settings.{key} must be a non-empty list of values, got {values!r}.")

    @property
    def axes(self) -> Dict[str, List[Any]]:
        """Axis name (``strength``, ``layers``, ``examples`` or a setting's name) → its values."""
        out = {k: list(getattr(self, k)) for k in ("strength", "layers", "examples") if getattr(self, k) is not None}
        out.update({k: list(v) for k, v in self.settings.items()})
        return out


@dataclass
class SweepSettings(Settings):
    """A study's ``sweep:`` block: which rows to sweep over what, and how to choose. A study with
    this block runs the sweep instead of one edit per row (``eval.split``, ``compose`` and the
    analyses of a plain study do not apply; ``eval.limit`` limits both splits).

    Attributes:
        methods: row of ``methods`` → its axes (:class:`MethodSweep`); the row's own settings are
            the sweep's centre (its ``default`` point).
        choose: the rule that picks each row's point (:class:`ChoiceRule`).
        choose_split: the task split points are chosen on (``eval``; never the one reported).
        report_split: the split every point is also scored on for the report (``test``; None:
            only the chosen one's choice split is measured).
        mode: ``curves`` or ``grid`` (:data:`SWEEP_MODES`).
        neutral_texts: how many of the neutral texts (``actedit.eval.analysis.NEUTRAL_TEXTS``) the
            KL and LM loss are measured on (None: all).
        points_per_call: edits scored together in one pass over the questions (they share the base
            model's lower layers); more is faster and holds more logits in memory.
    """

    methods: Dict[str, Any] = field(default_factory=dict)
    choose: ChoiceRule = field(default_factory=ChoiceRule)
    choose_split: str = "eval"
    report_split: Optional[str] = "test"
    mode: str = "curves"
    neutral_texts: Optional[int] = None
    points_per_call: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.methods, dict) or not self.methods:
            raise ValueError(
                "sweep.methods must map at least one row of methods to its axes, e.g. {caa: {strength: [1, 2]}}."
            )
        self.methods = {
            row: axes if isinstance(axes, MethodSweep) else MethodSweep.from_mapping(axes, f"sweep.methods.{row}")
            for row, axes in self.methods.items()
        }
        if not isinstance(self.choose, ChoiceRule):
            self.choose = ChoiceRule.from_mapping(self.choose, "sweep.choose")
        splits = ("train", "eval", "test")
        if self.choose_split not in splits:
            raise ValueError(f"sweep.choose_split must be one of {', '.join(splits)}, got {self.choose_split!r}.")
        if self.report_split is not None and self.report_split not in splits:
            raise ValueError(
                f"sweep.report_split must be one of {', '.join(splits)} or null, got {self.report_split!r}."
            )
        if self.report_split == self.choose_split:
            raise ValueError(
                f"sweep.report_split is the choice split ({self.choose_split}): a score chosen on is not a report; "
                "choose on eval and report on test."
            )
        if self.mode not in SWEEP_MODES:
            raise ValueError(f"sweep.mode must be one of {', '.join(SWEEP_MODES)}, got {self.mode!r}.")
        for key in ("neutral_texts", "points_per_call"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"sweep.{key} must be a positive integer, got {value!r}.")


@dataclass
class StudyConfig:
    """A whole study (see the module docstring).

    Attributes:
        model: model spec for :func:`actedit.data.models.load_model`.
        dtype: the model's precision for collection and evaluation: ``float32``, ``bfloat16``,
            ``float16`` or ``auto`` (:func:`resolve_dtype`).
        device: where the model runs (``cpu``, ``cuda``, ``cuda:1``; default: CUDA when available).
        device_map: instead of ``device``, spread the model over devices with accelerate
            (``from_pretrained(device_map=...)``): ``auto``, ``balanced``, ``balanced_low_0``,
            ``sequential`` or a mapping of module names to devices (a GPU index, ``cpu``,
            ``disk``; ``{model.layers.20: disk, ...}``). Modules a map sends to ``disk`` are
            written under ``OUT/offload`` and loaded on the fly; each edit runs on the device of
            the layer it edits. ``auto``'s ``dtype`` is chosen as for ``device``'s default.
        data: the contrast data the edits are fitted on (TruthfulQA with HPR's split by default).
        out: output directory.
        methods: row name → its block (``method``, ``collect``, ``settings``, ``train``,
            ``data``), in the order the report lists them; a row named after a registered method
            runs that method, any other name says ``method:`` (``hpr_no_angle: {method: hpr,
            settings: {angle_prediction: false}}``), so one method can fill several rows.
        compose: rows whose edits are composed into one more artifact (``all``, ``none`` or
            a list).
        eval: see :class:`EvalSettings`.
        seeds: the training seeds of trained rows (``[0, 1, 2]``: each trained row is trained and
            scored once per seed, and reported as the mean ± sd over seeds); None: once, with the
            row's ``train.seed``. Closed-form rows are deterministic and run once. Runs share what
            does not depend on the seed: the activations and the base model's scores.
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: Optional[str] = None
    device_map: Optional[Union[str, Dict[str, Any]]] = None
    data: DataSettings = field(default_factory=DataSettings)
    out: str = "runs/study"
    methods: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {"hpr": {}, "sea": {}, "iti": {}})
    compose: Union[str, List[str]] = "all"
    eval: EvalSettings = field(default_factory=EvalSettings)
    seeds: Optional[List[int]] = None
    sweep: Optional[SweepSettings] = None

    def __post_init__(self) -> None:
        if self.seeds is not None:
            seeds = self.seeds if isinstance(self.seeds, list) else [self.seeds]
            if not seeds or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in seeds):
                raise ValueError(
                    f"seeds must be a list of non-negative integers such as [0, 1, 2], got {self.seeds!r}."
                )
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds must be distinct, got {seeds}.")
            self.seeds = list(seeds)
        # offload_folder: the study passes OUT/offload (see offload_folder), so "disk" is fine here
        check_device_map(self.device_map, device=self.device, offload_folder=self.offload_folder)
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(MODEL_DTYPES)}, got {self.dtype!r}.")
        if not isinstance(self.methods, dict) or not self.methods:
            raise ValueError("methods must map at least one method name to its settings, e.g. {iti: {}}.")
        for name, block in list(self.methods.items()):
            if block is None:
                self.methods[name] = block = {}
            if not isinstance(block, dict):
                raise ValueError(f"methods.{name} must be a mapping, got {type(block).__name__}.")
            method = block.get("method", name)
            if method in FINETUNES:
                extra = sorted(set(block) - {"method", "settings", "data"})
                if extra:
                    raise ValueError(
                        f"methods.{name}: a {method} row takes method, settings and data only, not "
                        f"{', '.join(extra)} (its optimiser settings are in settings)."
                    )
            elif method not in method_names():
                hint = (
                    f"methods.{name}.method {method!r} is not a registered method"
                    if "method" in block
                    else f"row {name!r} is not a registered method: name the method it runs with methods.{name}.method"
                )
                known = method_names() + sorted(FINETUNES)
                raise ValueError(f"{hint}; choose from {', '.join(known)}.")
            own_seed = (block.get("settings") or {}) if method in FINETUNES else (block.get("train") or {})
            if self.seeds is not None and "seed" in own_seed:
                raise ValueError(
                    f"methods.{name}'s seed and seeds are both set: the study's seeds {self.seeds} "
                    "train every trained row once per seed; drop one of them."
                )
            check_moved(
                block,
                {
                    "select": f"methods.{name}.settings.top_layers and methods.{name}.settings.strategy",
                    "fit": f"methods.{name}.settings",
                },
                f"methods.{name}",
            )
            check_keys(block, METHOD_KEYS, f"methods.{name}")
        if isinstance(self.compose, str):
            if self.compose not in ("all", "none"):
                raise ValueError(f"compose must be 'all', 'none' or a list of methods, got {self.compose!r}.")
        else:
            missing = [m for m in self.compose if m not in self.methods]
            if missing:
                raise ValueError(f"compose lists {missing}, which are not in methods ({', '.join(self.methods)}).")
        for name in self.methods:  # every block's settings are checked now, before any model loads
            if self.is_finetune(name):
                self.finetune(name)
            else:
                self.pipeline(name)
        if self.sweep is not None:
            self._check_sweep()

    def _check_sweep(self) -> None:
        """The ``sweep:`` block typed, and each swept row's axes checked against its method."""
        if not isinstance(self.sweep, SweepSettings):
            self.sweep = SweepSettings.from_mapping(self.sweep, "sweep")
        if self.seeds is not None:
            raise ValueError("seeds and sweep are both set: a sweep trains each point once (train.seed); drop seeds.")
        for row, axes in self.sweep.methods.items():
            where = f"sweep.methods.{row}"
            if row not in self.methods:
                raise ValueError(f"{where}: {row!r} is not a row of methods ({', '.join(self.methods)}); add it there.")
            if self.is_finetune(row):
                raise ValueError(f"{where}: {row} fine-tunes the model; a sweep varies an edit's settings.")
            spec = method_spec(self.row_method(row))
            if axes.strength is not None and spec.strength is None:
                raise ValueError(f"{where}.strength: {spec.name} has no strength setting; sweep its other settings.")
            unknown = [k for k in axes.settings if k not in spec.settings_class.field_names()]
            if unknown:
                check_keys(unknown, spec.settings_class.field_names(), f"{where}.settings")
            for point in self.sweep_points(row):  # every point's settings are valid before any work
                spec.settings(point["settings"], where)
        metric = self.sweep.choose.metric
        metrics = task_spec(self.eval.task).metrics
        if metric is not None and metric not in metrics:
            raise ValueError(
                f"sweep.choose.metric {metric!r} is not a metric of {self.eval.task} ({', '.join(metrics)})."
            )

    def sweep_points(self, row: str) -> List[Dict[str, Any]]:
        """The points a sweep runs for ``row``: each ``{"axis", "value", "settings", "examples"}``
        (``settings``: the row's own settings with the point's values; ``examples``: None for all);
        the first is the row's own settings (axis ``default``). ``curves`` varies one axis at a
        time; ``grid`` takes every combination. Points with equal settings and data appear once."""
        assert self.sweep is not None
        axes = self.sweep.methods[row].axes
        spec = method_spec(self.row_method(row))
        base = dict(self.methods[row].get("settings") or {})
        if spec.strength is not None and "strength" in base:
            base[spec.strength] = base.pop("strength")

        def point(values: Dict[str, Any], axis: str, value: Any) -> Dict[str, Any]:
            settings = dict(base)
            examples = None
            for key, v in values.items():
                if key == "examples":
                    examples = None if v == "all" else int(v)
                elif key == "strength":
                    settings[cast(str, spec.strength)] = v
                else:
                    settings[key] = v
            return {"axis": axis, "value": value, "settings": settings, "examples": examples}

        points = [point({}, "default", None)]
        if self.sweep.mode == "curves":
            for axis, values in axes.items():
                points += [point({axis: v}, axis, v) for v in values]
        else:
            names = list(axes)
            for combo in itertools.product(*(axes[n] for n in names)):
                points.append(point(dict(zip(names, combo, strict=True)), "grid", dict(zip(names, combo, strict=True))))
        unique: Dict[str, Dict[str, Any]] = {}
        for p in points:  # equal once typed: {layers: 1} and {layers: 1, multiplier: 1.0} are one point
            typed = spec.settings(p["settings"], f"sweep.methods.{row}").to_dict()
            key = json.dumps([typed, p["examples"]], sort_keys=True, default=str)
            unique.setdefault(key, p)
        return list(unique.values())

    def placement(self, device: str) -> Dict[str, Any]:
        """Where :func:`~actedit.data.models.load_model` puts the model: ``{"device": device}``
        (``device``: this config's, or the default the study chose), or with ``device_map`` set
        ``{"device_map": ..., "offload_folder": OUT/offload}``."""
        if self.device_map is None:
            return {"device": device}
        return {"device_map": self.device_map, "offload_folder": self.offload_folder}

    def placement_text(self, device: str) -> str:
        """The placement in a few words, for the step header."""
        return device if self.device_map is None else f"device_map={self.device_map}"

    @property
    def offload_folder(self) -> Optional[str]:
        """Where modules that ``device_map`` offloads to disk are written (``OUT/offload``), or
        None without a device map."""
        return str(Path(self.out) / "offload") if self.device_map is not None else None

    @property
    def method_names(self) -> List[str]:
        """The study's rows, in the order the config lists them."""
        return list(self.methods)

    def row_method(self, row: str) -> str:
        """The registered method (or fine-tuning kind, :data:`~actedit.study.finetunes.FINETUNES`) a row runs."""
        method = self.methods[row].get("method", row)
        return method if method in FINETUNES else method_spec(method).name

    def is_finetune(self, row: str) -> bool:
        """Whether a row fine-tunes the model's weights (LoRA) rather than editing activations."""
        return self.methods[row].get("method", row) in FINETUNES

    def finetune(self, row: str, seed: Optional[int] = None) -> Tuple[FinetuneSpec, Settings, DataSettings, Path]:
        """A fine-tuning row's kind, settings (with ``seed``, its run of that seed), data and output directory."""
        block = self.methods[row]
        spec = FINETUNES[block.get("method", row)]
        where = f"methods.{row}"
        values = dict(block.get("settings") or {})
        out = Path(self.out) / "artifacts" / row
        if seed is not None:
            values["seed"], out = seed, out / f"seed{seed}"
        data = DataSettings.from_mapping({**asdict(self.data), **(block.get("data") or {})}, f"{where}.data")
        return spec, spec.settings(values, f"{where}.settings"), data, out

    def row_seeds(self, row: str) -> List[Optional[int]]:
        """The seeds a row runs with: the study's ``seeds`` for a trained row, else one run
        (None: the row's own ``train.seed``)."""
        trained = self.is_finetune(row) or method_spec(self.row_method(row)).trained
        if self.seeds is None or not trained:
            return [None]
        return list(self.seeds)

    def runs(self) -> List[Tuple[str, str, Optional[int]]]:
        """``(run name, row, seed)`` of every run: a row, or ``<row>/seed<s>`` per seed of a
        trained row when ``seeds`` is set."""
        out = []
        for row in self.method_names:
            seeds = self.row_seeds(row)
            for seed in seeds:
                out.append((row if seed is None else f"{row}/seed{seed}", row, seed))
        return out

    @property
    def composed_methods(self) -> List[str]:
        if self.compose == "none":
            return []
        rows = [r for r in self.method_names if not self.is_finetune(r)]  # a fine-tuned model composes with nothing
        chosen = rows if self.compose == "all" else [m for m in rows if m in self.compose]
        return chosen if len(chosen) > 1 else []

    def _collects(self, row: str) -> str:
        """What a row collects, as a string: its method's prompt format and site, its layer spec,
        data, collect options (but the directory) and base-completion length. Rows that collect the
        same share one activation store (HPR, −AnglePred and Diff read the same pairs)."""
        if self.is_finetune(row):
            return f"finetune:{row}"
        block = self.methods[row]
        spec = method_spec(self.row_method(row))
        settings = spec.settings(block.get("settings"), f"methods.{row}.settings")
        layers = settings.layers if settings.layers is not None else spec.default_layers
        collect = {k: v for k, v in (block.get("collect") or {}).items() if k != "dir"}
        what = {
            "format": spec.format,
            "site": spec.component(settings),
            "layers": layers,
            "data": {**asdict(self.data), **(block.get("data") or {})},
            "collect": collect,
            "base_tokens": getattr(settings, "base_tokens", None),
        }
        return json.dumps(what, sort_keys=True, default=str)

    def _store_owner(self, row: str) -> str:
        """The first row (in the config's order) that collects what ``row`` collects: its
        activations live in ``activations/<that row>``."""
        mine = self._collects(row)
        return next(r for r in self.method_names if self._collects(r) == mine)

    def _trains(self, row: str) -> Optional[str]:
        """What a trained row trains, as a string (None for a closed-form row): what it collects,
        its method, its settings but those that only change inference (the settings class's
        ``INFERENCE_ONLY``: HPR's ``alpha``, ``angle_prediction``) and its training settings.
        Rows that train the same share one training (HPR and −AnglePred)."""
        if self.is_finetune(row):
            return f"finetune:{row}"
        block = self.methods[row]
        spec = method_spec(self.row_method(row))
        if not spec.trained:
            return None
        settings = spec.settings(block.get("settings"), f"methods.{row}.settings")
        kept = {k: v for k, v in settings.to_dict().items() if k not in getattr(settings, "INFERENCE_ONLY", ())}
        train = {k: v for k, v in (block.get("train") or {}).items() if k not in ("progress", "checkpoint_dir")}
        return json.dumps([self._collects(row), spec.name, kept, train], sort_keys=True, default=str)

    def _training_owner(self, row: str) -> str:
        """The first row that trains what ``row`` trains: its checkpoints are in
        ``training/<that row>``, and a finished training resumes to its result without training
        again (the trainer's fingerprint check refuses a checkpoint of any other training)."""
        mine = self._trains(row)
        return next(r for r in self.method_names if self._trains(r) == mine)

    def pipeline(self, row: str, seed: Optional[int] = None) -> PipelineConfig:
        """The one-method pipeline config of ``row`` inside this study (with ``seed``: its run
        of that training seed, written to ``artifacts/<row>/seed<seed>``; the activations are
        the row's, shared by its seeds and by every row that collects the same, see
        :meth:`_store_owner`)."""
        block = self.methods[row]
        where = f"methods.{row}"
        data = DataSettings.from_mapping({**asdict(self.data), **(block.get("data") or {})}, f"{where}.data")
        sharer = self._store_owner(row)
        collect = CollectSettings.from_mapping(
            {"dir": str(Path(self.out) / "activations" / sharer), **(block.get("collect") or {})}, f"{where}.collect"
        )
        train = block.get("train")
        out = Path(self.out) / "artifacts" / row
        checkpoints = Path(self.out) / "training" / row
        if method_spec(self.row_method(row)).trained:
            checkpoints = Path(self.out) / "training" / self._training_owner(row)
        if seed is not None:
            train, out, checkpoints = {**(train or {}), "seed": seed}, out / f"seed{seed}", checkpoints / f"seed{seed}"
        if method_spec(self.row_method(row)).trained:
            train = {"checkpoint_dir": str(checkpoints), **(train or {})}
        return PipelineConfig(
            model=self.model,
            method=self.row_method(row),
            data=data,
            collect=collect,
            settings=block.get("settings"),
            train=train,
            out=str(out),
            where=where,
        )


def load_study(path: Optional[str], overrides: Sequence[str] = ()) -> StudyConfig:
    """Read a study YAML (or the defaults when ``path`` is None) and apply ``key.sub=value`` overrides."""
    raw = read_config(path, overrides, "No study config at {path!r}; the embedded default is configs/default.yaml.")
    check_keys(raw, [f.name for f in fields(StudyConfig)], "")
    data = DataSettings.from_mapping(raw.pop("data", None), "data")
    evals = EvalSettings.from_mapping(raw.pop("eval", None), "eval")
    sweep = raw.pop("sweep", None)
    return StudyConfig(
        data=data, eval=evals, sweep=SweepSettings.from_mapping(sweep, "sweep") if sweep else None, **raw
    )


def default_config_path() -> Path:
    """``configs/default.yaml`` of the installed package."""
    return Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


__all__ = [
    "ChoiceRule",
    "EvalSettings",
    "MethodSweep",
    "SWEEP_MODES",
    "SweepSettings",
    "METHOD_KEYS",
    "MODEL_DTYPES",
    "StudyConfig",
    "default_config_path",
    "load_study",
    "resolve_dtype",
]
