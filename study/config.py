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

A row of ``methods`` named otherwise than a method says which one it runs
(``hpr_no_angle: {method: hpr, settings: {angle_prediction: false}}``).

Every block is checked when the file is read (unknown keys, bad values), and every method's
layer spec against the model right after it loads, before any work.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

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
    return StudyConfig(data=data, eval=evals, **raw)


def default_config_path() -> Path:
    """``configs/default.yaml`` of the installed package."""
    return Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


__all__ = [
    "EvalSettings",
    "METHOD_KEYS",
    "MODEL_DTYPES",
    "StudyConfig",
    "default_config_path",
    "load_study",
    "resolve_dtype",
]
