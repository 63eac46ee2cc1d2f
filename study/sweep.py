"""Sweeps: which layer, how strong, how many examples (``actedit sweep``, a study's ``sweep:``
block, :func:`sweep` in Python).

For every swept row of a study (:class:`~actedit.study.config.SweepSettings`) the sweep runs the
points :meth:`~actedit.study.config.StudyConfig.sweep_points` lists: the row's own settings (the
``default`` point) and the values of each axis (strength, layer specs, training examples, any
other setting). Each point is scored on the task's choice split (``eval``) and report split
(``test``), with the KL to the base model and the LM loss on neutral text
(:func:`~actedit.eval.analysis.side_effects`, the edit acting on that text as on text it
generates: :func:`as_generating`); the row's point is chosen on the choice split by
the stated rule (best metric, optionally within a KL or LM-loss budget) and saved as an
ordinary artifact whose card records the sweep and both splits' scores.

What a sweep shares, so that N points cost far less than N separate runs:

* **one collection per row**: the union of every point's layers on the row's data; a point with
  ``examples: N`` fits on the first N examples of each split of it
  (:meth:`~actedit.data.store.ActivationStore.first_examples`): for a registered task (TruthfulQA,
  BBQ, SEQ, ToxiGen) exactly what collecting with ``data.limit: N`` would have stored; for a data
  file, the first N examples of each split of its seeded train/eval split (``data.limit`` of a file
  counts records before that split);
* **one fit per set of fitted settings**: points that differ only in a strength the fitted module
  keeps in a buffer (the settings class's ``INFERENCE_ONLY``: ITI's and HPR's α, CAA's
  multiplier) share one fit and get their strength set on a copy of it
  (:meth:`~actedit.interventions.base.ActEditIntervention.set_inference_setting`);
* **the base model's lower layers**: ``points_per_call`` edits are scored in one pass over the
  questions, each edit starting from the base model's residual stream below its lowest edited
  layer (:func:`~actedit.eval.mc.score_mc_many`); the base model runs once per pass, as the
  carrier of those lower layers.

Everything is resumable: the activations (``OUT/activations``), trainings (``OUT/sweep/training``)
and each point's scores (``OUT/sweep/points``) are written atomically as they finish and reused by
a rerun with the same settings. Writes ``OUT/sweep.json``, ``OUT/sweep.csv``, ``OUT/sweep.md``,
the plots ``OUT/sweep_tradeoff.png`` and ``OUT/sweep_<axis>.png``, and ``OUT/artifacts/<row>``.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from actedit.data.contrast import PromptPair
from actedit.data.distributed import world
from actedit.data.environment import machine_info, peak_rss_mib, versions
from actedit.data.formats import get_format
from actedit.data.models import load_model, weights_digest
from actedit.data.store import ActivationStore
from actedit.data.tasks import TaskSpec, task_spec
from actedit.eval.analysis import NEUTRAL_TEXTS, side_effects
from actedit.eval.distributed import score_mc_many_split
from actedit.eval.plots import plot_sweep_axis, plot_sweep_tradeoff
from actedit.eval.report import measurement
from actedit.interventions.artifacts import (
    add_measurement,
    artifact_metadata,
    file_sha256,
    save_artifact,
    verify_artifact,
)
from actedit.interventions.edits import config_of, intervenable
from actedit.interventions.files import write_atomic, write_json
from actedit.interventions.layers import model_depth, resolve_layers
from actedit.interventions.positions import PositionPolicy
from actedit.interventions.registry import method_spec
from actedit.train import pipeline
from actedit.train.api import Data, examples_dataset
from actedit.train.pipeline import PipelineConfig

from .config import EvalSettings, StudyConfig, resolve_dtype

SWEEP_FORMAT = 2
"""Version of a point's cached scores (``OUT/sweep/points``); a change rescores every point."""


def _digest(value: Any, length: int = 12) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclasses.dataclass
class _Point:
    """One point of a row: what it sets, what it fits, and (once scored) its results."""

    row: str
    axis: str
    value: Any
    examples: Optional[int]
    config: PipelineConfig  # resolved for the model, out=None
    id: str = ""
    fit_key: str = ""
    strength_after_fit: Optional[float] = None
    result: Optional[Dict[str, Any]] = None


class _Scorer:
    """Scores edits on the choice and report splits beside the base model (which runs in every
    call, carrying the lower layers; its results are kept from the first), with their side effects
    on neutral text."""

    def __init__(self, cfg: StudyConfig, task: TaskSpec, model, tokenizer, questions: Dict[str, List[Any]]) -> None:
        self.cfg, self.task, self.model, self.tokenizer, self.questions = cfg, task, model, tokenizer, questions
        assert cfg.sweep is not None
        count = cfg.sweep.neutral_texts
        self.texts = list(NEUTRAL_TEXTS)[:count] if count else list(NEUTRAL_TEXTS)
        self.base: Dict[str, Any] = {}

    def score(self, pvms: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
        """Point id → ``{"scores": {split: {metric: value}}, "stderr": ..., "measurements": {split:
        entry}, "kl", "lm_loss", "base_lm_loss"}`` for the edits ``pvms`` (id → pyvene model)."""
        out: Dict[str, Dict[str, Any]] = {pid: {"scores": {}, "stderr": {}, "measurements": {}} for pid in pvms}
        for split, questions in self.questions.items():
            scored = score_mc_many_split(
                {"base": self.model, **pvms},
                self.tokenizer,
                questions,
                task=self.task,
                batch_size=self.cfg.eval.batch_size,
                progress=False,
                **self.cfg.eval.task_options,
            )
            self.base.setdefault(split, scored["base"])
            for pid in pvms:
                result = scored[pid]
                out[pid]["scores"][split] = dict(result.metrics)
                out[pid]["stderr"][split] = dict(result.stderr)
                out[pid]["measurements"][split] = measurement(
                    self.task, split, result, self.base[split], measured_by="actedit sweep", data=self._source
                )
        for pid, pvm in pvms.items():
            effects = side_effects(as_generating(pvm), self.tokenizer, self.texts)
            out[pid].update(kl=effects.kl, lm_loss=effects.edited_loss, base_lm_loss=effects.base_loss)
        return out

    @property
    def _source(self) -> Optional[str]:
        return self.cfg.eval.source or self.cfg.data.source


GENERATING_POLICIES = (PositionPolicy.ANSWER, PositionPolicy.LAST, PositionPolicy.GENERATED)
"""Position policies that edit every token a model generates (ITI's and CAA's ``answer`` falls back
to ``last`` in generation: the last position of each forward call)."""


def as_generating(pvm):
    """``pvm``'s edits as they act on text the model generates: a copy whose modules with a policy of
    :data:`GENERATING_POLICIES` edit every position. The sweep measures KL and LM loss on neutral
    text with it, because a plain forward pass of an ``answer``-policy edit edits only the last
    token and would hide what the edit does to generations."""
    config = copy.deepcopy(config_of(pvm))
    for rep in config.representations:
        if rep.intervention.policy in GENERATING_POLICIES:
            rep.intervention.set_position_policy("all")
    return intervenable(pvm.model, config)


# ------------------------------------------------------------------------------- planning
def _plan(cfg: StudyConfig, row: str, model, model_identity: Dict[str, Any]) -> Tuple[List[_Point], PipelineConfig]:
    """The row's points (ids, fit keys, strengths set after the fit) and the one collection they
    share (its layers: the union of the points'; its data: the row's, which every data size reads
    a prefix of)."""
    spec = method_spec(cfg.row_method(row))
    base = cfg.pipeline(row)
    depth = model_depth(model)
    points: List[_Point] = []
    for raw in cfg.sweep_points(row):
        pcfg = dataclasses.replace(base, settings=raw["settings"], out=None, depth=None).for_model(model)
        points.append(_Point(row, raw["axis"], raw["value"], raw["examples"], pcfg))
    # one collection serves every point: what decides a collection but its layers must not vary
    collected = {
        json.dumps([p.config.site, getattr(p.config.settings, "base_tokens", None)], default=str) for p in points
    }
    if len(collected) > 1:
        raise ValueError(
            f"sweep.methods.{row}: its points collect different activations (site or base_tokens vary); a row's "
            "points share one collection: sweep such a setting with one row per value."
        )
    given = base.data.limit
    too_many = sorted(
        {p.examples for p in points if p.examples is not None and given is not None and p.examples > given}
    )
    if too_many:
        raise ValueError(
            f"sweep.methods.{row}.examples {too_many} exceed the row's data.limit ({given}): raise data.limit or "
            "lower the examples."
        )
    layers = sorted({layer for p in points for layer in p.config.settings.layers})
    collect_settings = dataclasses.replace(points[0].config.settings, layers=resolve_layers(layers, depth))
    what = {
        "method": spec.name,
        "site": points[0].config.site,
        "layers": layers,
        "data": asdict(base.data),
        "data_digest": _data_digest(base.data.name),
        "collect": {k: v for k, v in asdict(base.collect).items() if k != "dir"},
        "base_tokens": getattr(collect_settings, "base_tokens", None),
        "model": model_identity,
    }
    directory = Path(cfg.out) / "activations" / f"{row}-{_digest(what, 8)}"
    collect_cfg = dataclasses.replace(
        base,
        collect=dataclasses.replace(base.collect, dir=str(directory)),
        settings=collect_settings,
        out=None,
    )
    strength = spec.strength
    inference_only = getattr(spec.settings_class, "INFERENCE_ONLY", ())
    training = dict(cfg.methods[row].get("train") or {})
    unique: Dict[str, _Point] = {}
    for p in points:
        fitted = p.config.settings.to_dict()
        if strength is not None and strength in inference_only:
            p.strength_after_fit = float(fitted.pop(strength))
        common = {"row": row, "collection": what, "examples": p.examples, "train": training}
        p.fit_key = _digest({**common, "fitted": fitted})
        p.id = _digest({**common, "settings": p.config.settings.to_dict()})
        unique.setdefault(p.id, p)  # layer specs that resolve alike (0.4 and 12 on 30 layers) are one point
    return list(unique.values()), collect_cfg


def _data_digest(name: str) -> Optional[str]:
    """SHA-256 of a data file's bytes (a registered task's name: None; its source is in ``data``)."""
    path = Path(str(name)).expanduser()
    return file_sha256(path) if path.is_file() else None


# -------------------------------------------------------------------------------- fitting
def _fit_group(points: List[_Point], store: ActivationStore, model, tokenizer, out: Path, progress: bool):
    """One fit for points that share everything but a strength set after it; returns each point's
    ``IntervenableConfig`` (id → config)."""
    first = points[0]
    pcfg = first.config
    if pcfg.spec.trained:  # a resumable training of its own per fit
        train = dataclasses.replace(
            pcfg.train, checkpoint_dir=str(out / "sweep" / "training" / first.row / first.fit_key)
        )
        pcfg = dataclasses.replace(pcfg, train=train)
    view = store.first_examples(first.examples) if first.examples is not None else store
    config, _ = pipeline.make_edit(pcfg, model, tokenizer, store=view, progress=progress)
    configs = {}
    for p in points:
        mine = copy.deepcopy(config)
        strength = pcfg.spec.strength
        if p.strength_after_fit is not None and strength is not None:
            for rep in mine.representations:
                rep.intervention.set_inference_setting(strength, p.strength_after_fit)
            for edit in mine.actedit["edits"]:
                edit["hyperparameters"][strength] = p.strength_after_fit
        mine.actedit["data"] = {**mine.actedit.get("data", {}), "examples_per_split": p.examples}
        configs[p.id] = mine
    return configs


def _point_path(out: Path, p: _Point) -> Path:
    return out / "sweep" / "points" / p.row / f"{p.id}.json"


# -------------------------------------------------------------------------------- choosing
def choose(points: Sequence[Mapping[str, Any]], cfg: StudyConfig, metric: str) -> Optional[Mapping[str, Any]]:
    """The point the rule picks: the highest ``metric`` on the choice split among the points within
    the KL and LM-loss budgets (ties: the lower KL, then the earlier point); None when no point is
    within them."""
    assert cfg.sweep is not None
    rule, split = cfg.sweep.choose, cfg.sweep.choose_split
    allowed = [
        p
        for p in points
        if (rule.max_kl is None or p["kl"] <= rule.max_kl)
        and (rule.max_loss_increase is None or p["lm_loss"] - p["base_lm_loss"] <= rule.max_loss_increase)
    ]
    if not allowed:
        return None
    return max(allowed, key=lambda p: (p["scores"][split][metric], -p["kl"], -points.index(p)))


# ------------------------------------------------------------------------------------ sweep
def run_sweep(cfg: StudyConfig, *, model=None, tokenizer=None, quiet: bool = False) -> Dict[str, Any]:
    """Run (or resume) the sweep of ``cfg.sweep``; returns what ``OUT/sweep.json`` holds.

    ``model``/``tokenizer``: an already loaded model (the Python API); default: ``cfg.model``
    loaded as a study loads it."""
    if cfg.sweep is None:
        raise ValueError("this study config has no sweep: block; add one (see configs/sweeps.yaml).")
    if world().distributed:
        raise ValueError("a sweep runs in one process; start it without torchrun/accelerate launch.")
    started = time.perf_counter()
    sweep_cfg = cfg.sweep
    task = task_spec(cfg.eval.task)
    metric = sweep_cfg.choose.metric or task.metrics[-1]
    source = cfg.eval.source or cfg.data.source
    split_file = cfg.eval.split_file or cfg.data.split_file
    splits = [sweep_cfg.choose_split] + ([sweep_cfg.report_split] if sweep_cfg.report_split else [])
    questions = {split: task.load(source, split, split_file, cfg.eval.limit) for split in splits}
    for split, qs in questions.items():
        if not qs:
            raise ValueError(f"no {task.name} questions in split {split!r} to score the sweep on.")
    if model is None:
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(cfg.dtype, device)
        model, tokenizer = load_model(cfg.model, dtype=getattr(torch, dtype), **cfg.placement(device))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    scorer = _Scorer(cfg, task, model, tokenizer, questions)
    eval_key = {
        "format": SWEEP_FORMAT,
        "task": task.name,
        "questions": {s: [q.index for q in qs] for s, qs in questions.items()},
        "options": cfg.eval.task_options,
        "texts": len(scorer.texts),
    }
    identity = {
        "model": cfg.model,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "weights": weights_digest(model),
    }
    plans = {row: _plan(cfg, row, model, identity) for row in sweep_cfg.methods}  # every row checked first
    seconds: Dict[str, float] = {}
    rows: Dict[str, Dict[str, Any]] = {}
    for row, plan in plans.items():
        t0 = time.perf_counter()
        rows[row] = _sweep_row(cfg, row, plan, model, tokenizer, scorer, eval_key, metric, say, quiet)
        seconds[row] = round(time.perf_counter() - t0, 2)
    base = {s: dict(r.metrics) for s, r in scorer.base.items()}
    summary = {
        "format": SWEEP_FORMAT,
        "task": task.name,
        "metric": metric,
        "rule": asdict(sweep_cfg.choose),
        "rule_text": sweep_cfg.choose.describe(metric),
        "choose_split": sweep_cfg.choose_split,
        "report_split": sweep_cfg.report_split,
        "mode": sweep_cfg.mode,
        "n_questions": {s: len(qs) for s, qs in questions.items()},
        "base": base or _cached_base(rows),
        "rows": rows,
        "seconds": {"rows": seconds, "total": round(time.perf_counter() - started, 2)},
        "peak_rss_mib": peak_rss_mib(),
        "machine": machine_info(),
        "versions": versions("torch", "transformers", "pyvene"),
    }
    _write_outputs(summary, out)
    return summary


def _cached_base(rows: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, float]]:
    """The base model's scores as the points' recorded measurements hold them (a rerun that found
    every point scored did not score the base model again)."""
    for info in rows.values():
        for p in info["points"]:
            return {split: dict(m["base"]) for split, m in p["measurements"].items()}
    return {}


def _sweep_row(cfg, row, plan, model, tokenizer, scorer: _Scorer, eval_key, metric, say, quiet) -> Dict[str, Any]:
    assert cfg.sweep is not None
    out = Path(cfg.out)
    points, collect_cfg = plan
    say(f"[sweep] {row}: {len(points)} points, {len({p.fit_key for p in points})} fits")
    for p in points:
        cached = _read(_point_path(out, p))
        if cached and cached.get("key") == eval_key:
            p.result = cached["result"]
    todo = [p for p in points if p.result is None]
    configs: Dict[str, Any] = {}
    if todo:
        store = pipeline.collect(collect_cfg, model, tokenizer, progress=not quiet, quiet=quiet)
        groups: Dict[str, List[_Point]] = {}
        for p in todo:
            groups.setdefault(p.fit_key, []).append(p)
        for group in groups.values():
            t0 = time.perf_counter()
            fitted = _fit_group(group, store, model, tokenizer, out, progress=not quiet)
            for p in group:
                configs[p.id] = fitted[p.id]
                p.result = {"fit_seconds": round((time.perf_counter() - t0) / len(group), 3)}
        per_call = cfg.sweep.points_per_call
        for start in range(0, len(todo), per_call):
            chunk = todo[start : start + per_call]
            t0 = time.perf_counter()
            scored = scorer.score({p.id: intervenable(model, configs[p.id]) for p in chunk})
            for p in chunk:
                assert p.result is not None
                p.result.update(scored[p.id], score_seconds=round((time.perf_counter() - t0) / len(chunk), 3))
                p.result["layers"] = sorted(
                    {int(r.layer) for r in configs[p.id].representations if getattr(r.intervention, "is_enabled", True)}
                )
                write_json(
                    _point_path(out, p), {"key": eval_key, "point": _describe(p), "result": p.result}, default=float
                )
            say(f"[sweep] {row}: {min(start + per_call, len(todo))}/{len(todo)} points scored")
    records = [{**_describe(p), **(p.result or {})} for p in points]
    chosen = choose(records, cfg, metric)
    path = out / "artifacts" / row
    if chosen is not None:
        point = next(p for p in points if p.id == chosen["id"])
        _save_chosen(cfg, point, chosen, records, path, model, tokenizer, configs, metric, collect_cfg)
    else:
        say(f"[sweep] {row}: no point is within the rule ({cfg.sweep.choose.describe(metric)}); nothing saved")
    return {
        "method": cfg.row_method(row),
        "points": records,
        "default": points[0].id,
        "chosen": chosen["id"] if chosen is not None else None,
        "artifact": str(path) if chosen is not None else None,
    }


def _describe(p: _Point) -> Dict[str, Any]:
    return {
        "id": p.id,
        "row": p.row,
        "axis": p.axis,
        "value": p.value,
        "examples": p.examples,
        "settings": p.config.settings.to_dict(),
    }


def _read(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _save_chosen(
    cfg, point: _Point, chosen, records, path: Path, model, tokenizer, configs, metric, collect_cfg
) -> None:
    """The chosen point as an artifact (kept when it already holds this point and this sweep), the
    sweep (rule, every point's scores) on its card and its scores on both splits recorded as
    measurements."""
    assert cfg.sweep is not None
    record = json.loads(
        json.dumps(
            {
                "rule": cfg.sweep.choose.describe(metric),
                "choose_split": cfg.sweep.choose_split,
                "chosen": point.id,
                "axis": point.axis,
                "value": point.value,
                "points": [
                    {k: r.get(k) for k in ("id", "axis", "value", "examples", "scores", "kl", "lm_loss")}
                    for r in records
                ],
            },
            default=float,
        )
    )
    try:
        verify_artifact(path)
        done = artifact_metadata(path).get("sweep") == record
    except (FileNotFoundError, ValueError):
        done = False
    if not done:
        config = configs.get(point.id)
        if config is None:  # scored in an earlier run: fit it again (same settings, same data)
            store = pipeline.collect(collect_cfg, model, tokenizer, progress=False, quiet=True)
            config = _fit_group([point], store, model, tokenizer, Path(cfg.out), progress=False)[point.id]
        save_artifact(intervenable(model, config), path, metadata={"sweep": record})
    for entry in chosen["measurements"].values():
        add_measurement(path, entry)


# ------------------------------------------------------------------------------------ output
AXIS_FILES = ("strength", "layers", "examples")
"""The axes drawn against the metric, each in ``OUT/sweep_<axis>.png`` when a row sweeps it."""


def _axis_x(point: Mapping[str, Any], axis: str) -> Optional[float]:
    """Where a point of ``axis`` is drawn: its value; for layers, its single edited layer (None for a
    point editing several, which a layer plot cannot place)."""
    if axis == "layers":
        layers = point.get("layers") or []
        return float(layers[0]) if len(layers) == 1 else None
    if axis == "examples" and point["value"] == "all":
        return None
    value = point["value"]
    return float(value) if isinstance(value, (int, float)) else None


def _write_outputs(summary: Dict[str, Any], out: Path) -> None:
    write_json(out / "sweep.json", summary, default=float)
    splits = [summary["choose_split"]] + ([summary["report_split"]] if summary["report_split"] else [])
    metric = summary["metric"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    metrics = task_spec(summary["task"]).metrics
    writer.writerow(
        ["row", "method", "point", "axis", "value", "examples", "layers", "settings"]
        + [f"{m}_{s}" for s in splits for m in metrics]
        + [f"{m}_{s}_stderr" for s in splits for m in metrics]
        + ["kl", "lm_loss", "base_lm_loss", "chosen", "default"]
    )
    for row, info in summary["rows"].items():
        for p in info["points"]:
            writer.writerow(
                [row, info["method"], p["id"], p["axis"], json.dumps(p["value"]), p["examples"] or "all"]
                + [" ".join(str(x) for x in p.get("layers", [])), json.dumps(p["settings"], sort_keys=True)]
                + [p["scores"][s][m] for s in splits for m in metrics]
                + [p["stderr"][s][m] for s in splits for m in metrics]
                + [p["kl"], p["lm_loss"], p["base_lm_loss"], p["id"] == info["chosen"], p["id"] == info["default"]]
            )
    write_atomic(out / "sweep.csv", buffer.getvalue())
    rows = {row: info["points"] for row, info in summary["rows"].items()}
    chosen = {row: info["chosen"] for row, info in summary["rows"].items()}
    base = summary["base"]
    plot_sweep_tradeoff(
        rows,
        out / "sweep_tradeoff.png",
        metric=metric,
        splits=splits,
        chosen=chosen,
        base={s: v[metric] for s, v in base.items() if metric in v},
        max_kl=summary["rule"].get("max_kl"),
    )
    for axis in AXIS_FILES:
        drawn = {}
        for row, points in rows.items():
            on_axis = [{**p, "x": _axis_x(p, axis)} for p in points if p["axis"] == axis]
            if not on_axis:
                continue
            default = next(p for p in points if p["id"] == summary["rows"][row]["default"])
            strength = method_spec(summary["rows"][row]["method"]).strength
            centre = {"strength": default["settings"].get(strength or ""), "layers": _axis_x(default, "layers")}
            if centre.get(axis) is not None:  # the row's own settings are a point of its curve too
                on_axis.append({**default, "x": float(centre[axis])})
            drawn[row] = [p for p in on_axis if p["x"] is not None]
        if any(drawn.values()):
            drawn = {row: drawn.get(row, []) for row in rows}  # every row keeps its colour across the plots
            plot_sweep_axis(
                drawn,
                out / f"sweep_{axis}.png",
                axis=axis,
                metric=metric,
                splits=splits,
                base={s: v[metric] for s, v in base.items() if metric in v},
            )
    write_atomic(out / "sweep.md", sweep_report(summary))


def _shown(value: Any) -> str:
    """A point's value in a table: ``—`` for the default point, else as JSON."""
    return "—" if value is None else json.dumps(value)


def sweep_report(summary: Mapping[str, Any]) -> str:
    """``OUT/sweep.md``: per row its points (each split's metric, KL, LM loss) and the chosen one
    against the row's own settings on the report split."""
    metric, choose_split, report_split = summary["metric"], summary["choose_split"], summary["report_split"]
    splits = [choose_split] + ([report_split] if report_split else [])
    base = summary["base"]
    lines = [
        f"# Sweep on {summary['task']} ({summary['mode']})",
        "",
        f"Chosen per row on the {choose_split} split by the rule: {summary['rule_text']}. Questions: "
        + ", ".join(f"{s} {n}" for s, n in summary["n_questions"].items())
        + ". Base model: "
        + ", ".join(f"{metric.upper()} {100 * base[s][metric]:.2f} % on {s}" for s in splits if s in base)
        + f". Took {summary['seconds']['total']:.0f} s"
        + (f", peak resident memory {summary['peak_rss_mib'] / 1024:.1f} GiB." if summary.get("peak_rss_mib") else "."),
        "",
    ]
    for row, info in summary["rows"].items():
        lines += [
            f"## {row} ({info['method']})",
            "",
            "| point | axis | value | examples | layers | "
            + " | ".join(f"{metric.upper()} {s} (%)" for s in splits)
            + " | KL | LM loss (base) |",
            "|---|---|---|---|---|" + "---|" * len(splits) + "---|---|",
        ]
        for p in info["points"]:
            mark = " **chosen**" if p["id"] == info["chosen"] else ""
            scores = " | ".join(
                f"{100 * p['scores'][s][metric]:.2f} ± {100 * p['stderr'][s][metric]:.2f}" for s in splits
            )
            lines.append(
                f"| `{p['id'][:8]}`{mark} | {p['axis']} | {_shown(p['value'])} | {p['examples'] or 'all'} | "
                f"{' '.join(str(x) for x in p.get('layers', []))} | {scores} | {p['kl']:.4f} | "
                f"{p['lm_loss']:.3f} ({p['base_lm_loss']:.3f}) |"
            )
        chosen = next((p for p in info["points"] if p["id"] == info["chosen"]), None)
        default = next(p for p in info["points"] if p["id"] == info["default"])
        if chosen is None:
            lines += ["", "No point met the rule; no artifact was saved."]
        elif report_split:
            lines += [
                "",
                f"Chosen ({chosen['axis']} = {_shown(chosen['value'])}): {metric.upper()} on {report_split} "
                f"{100 * chosen['scores'][report_split][metric]:.2f} % against the row's own settings' "
                f"{100 * default['scores'][report_split][metric]:.2f} %; artifact `{info['artifact']}`.",
            ]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ python
def sweep(
    method: str,
    model,
    tokenizer,
    data: Data = "truthfulqa",
    *,
    strength: Optional[Sequence[float]] = None,
    layers: Optional[Sequence[Any]] = None,
    examples: Optional[Sequence[Any]] = None,
    settings: Optional[Mapping[str, Sequence[Any]]] = None,
    base: Optional[Mapping[str, Any]] = None,
    train: Optional[Mapping[str, Any]] = None,
    choose: Optional[Mapping[str, Any]] = None,
    task: str = "truthfulqa",
    source: Optional[str] = None,
    split_file: Optional[str] = None,
    limit: Optional[int] = None,
    eval_limit: Optional[int] = None,
    mode: str = "curves",
    out: str = "runs/sweep",
    quiet: bool = False,
) -> Dict[str, Any]:
    """Sweep one method's settings on ``model`` and keep the point a rule chooses; returns what
    ``OUT/sweep.json`` holds (the chosen artifact is ``OUT/artifacts/<method>``).

    ::

        result = actedit.sweep("caa", model, tokenizer, base={"layers": 12}, strength=[0.5, 1, 2, 4],
                               choose={"max_kl": 0.1}, source="data/truthfulqa", out="runs/caa-sweep")
        pvm = actedit.load(result["rows"]["caa"]["artifact"], model)

    Args:
        method: a registered method.
        model, tokenizer: the model the edits are fitted on and scored with.
        data: what the edits are fitted on, as :func:`actedit.fit` takes it: a task name, a JSONL
            file, ``(prompt, positive, negative)`` triples or prompt pairs (examples are written to
            ``OUT/data-<their SHA-256>.jsonl``, which the artifacts record).
        strength, layers, examples, settings: the axes (see
            :class:`~actedit.study.config.MethodSweep`).
        base: the method's own settings, the sweep's centre (its ``default`` point).
        train: training settings of a trained method.
        choose: the rule (:class:`~actedit.study.config.ChoiceRule`: ``metric``, ``max_kl``,
            ``max_loss_increase``).
        task, source, split_file: the task scored and where its questions are.
        limit: the most training examples per split the data gives.
        eval_limit: score only the first N questions of each split.
        mode: ``curves`` or ``grid``.
        out: output directory.
    """
    axes: Dict[str, Any] = {"settings": dict(settings or {})}
    for key, values in (("strength", strength), ("layers", layers), ("examples", examples)):
        if values is not None:
            axes[key] = list(values)
    block: Dict[str, Any] = {"settings": dict(base or {})}
    if train:
        block["train"] = dict(train)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    if not isinstance(data, str):
        reads_pairs = get_format(method_spec(method).format).accepts is PromptPair
        dataset = examples_dataset(data, reads_pairs)
        data = str(dataset.to_jsonl(Path(out) / f"data-{dataset.digest()[:12]}.jsonl"))
    cfg = StudyConfig(
        model=name,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        data=pipeline.DataSettings(name=data, source=source, split_file=split_file, limit=limit),
        out=out,
        methods={method: block},
        compose="none",
        eval=EvalSettings(task=task, source=source, split_file=split_file, limit=eval_limit),
        sweep={"methods": {method: axes}, "choose": dict(choose or {}), "mode": mode},  # type: ignore[arg-type]
    )
    return run_sweep(cfg, model=model, tokenizer=tokenizer, quiet=quiet)


__all__ = ["GENERATING_POLICIES", "SWEEP_FORMAT", "as_generating", "choose", "run_sweep", "sweep", "sweep_report"]
