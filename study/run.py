"""``actedit run``: the whole study from one YAML file (:mod:`actedit.study.config`).

Loads the task's questions and the model, checks every method's layers against the model, then
for every method listed: collects its activations, fits or trains it (layer selection included)
and saves its artifact; composes the methods' edits into one more artifact; scores the base model
and every edit on the task's evaluation split (:mod:`actedit.eval.mc`); measures side effects
(norm drift, KL to the base model on neutral text, prediction flips); writes
``OUT/results.json``, ``OUT/report.md`` and the plots. Everything method- or task-specific comes
from the registries.

Everything a step produces is written atomically and reused by a rerun with the same settings:
activation stores resume from their last shard, training from its last epoch, finished
artifacts and scores are loaded instead of recomputed. So an interrupted study continues where
it stopped.

Under a launcher (``torchrun``/``accelerate launch``, :mod:`actedit.data.distributed`) every
process loads the model (with CUDA on its own GPU: ``"cuda"`` is the process's device) and the
study runs in step on all of them: each activation store is collected shard by shard by all
processes (:func:`~actedit.data.collect.collect_activations`), every fit, training, fine-tune and
composition runs on rank 0 while the others wait, and the scoring splits the questions over the
processes (:mod:`actedit.eval.distributed`). Rank 0 alone writes artifacts, scores, plots and the
report; whether a step is done is decided by rank 0 and told to all. ``device_map`` (one model
spread over several devices) is refused under a launcher.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from actedit.data.distributed import run_on_main, world
from actedit.data.environment import PeakRSS, peak_rss_mib, release_free_memory
from actedit.data.models import load_model
from actedit.data.tasks import task_spec
from actedit.eval.analysis import analyze_edits
from actedit.eval.distributed import score_mc_many_split
from actedit.eval.effect import measure_effect
from actedit.eval.mc import MCResult
from actedit.eval.plots import plot_layer_selection, plot_scores
from actedit.eval.report import measurement
from actedit.interventions.artifacts import (
    MANIFEST,
    ArtifactError,
    add_measurement,
    edit_identity,
    load_artifact,
    save_artifact,
    verify_artifact,
)
from actedit.interventions.edits import intervenable
from actedit.interventions.files import write_json
from actedit.train import pipeline
from actedit.train.api import compose

from .config import StudyConfig, resolve_dtype
from .finetunes import FINETUNES, effect_path, finetune_dataset
from .report import markdown_report, summarise
from .sweep import run_sweep

EVAL_FORMAT = 2
"""Version of the cached scores in ``OUT/eval/<name>.json`` (a change recomputes them)."""


# ------------------------------------------------------------------------------------ files
def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _artifact_ready(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        verify_artifact(path)
    except (ArtifactError, ValueError, FileNotFoundError):
        return False
    return True


def _sha(path: Path) -> Optional[str]:
    """Identity of an artifact's edit (:func:`~actedit.interventions.artifacts.edit_identity`): the
    scores recorded in it do not change it, so recording them keeps its cached scores valid."""
    return edit_identity(path) if (path / MANIFEST).is_file() else None


class _Steps:
    """Numbered step headers, and each step's seconds and peak resident memory (MiB, see
    :class:`~actedit.data.environment.PeakRSS`)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.seconds: Dict[str, float] = {}
        self.peak_mib: Dict[str, Optional[float]] = {}

    def run(self, name: str, fn, *args, **kwargs):
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {name}", flush=True)
        release_free_memory()  # start from what the process still uses, not from an earlier step's heap
        t0 = time.perf_counter()
        peak = PeakRSS()
        try:
            with peak:
                return fn(*args, **kwargs)
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 2)
            self.peak_mib[name] = peak.mib


def metrics_by_group(task, questions, results: Dict[str, MCResult]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Model → the task's group (e.g. BBQ's context condition) → each metric's mean over its questions."""
    group_of = {q.index: task.group(q) for q in questions}
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, result in results.items():
        groups: Dict[str, List[Dict[str, float]]] = {}
        for record in result.records:
            groups.setdefault(group_of[record.index], []).append(record.values)
        out[name] = {
            group: {m: float(sum(v[m] for v in values) / len(values)) for m in task.metrics}
            for group, values in sorted(groups.items())
        }
    return out


def _write_splits(cfg: StudyConfig, task, out: Path) -> None:
    """``OUT/splits.json``: the question indices of the task's train/eval/test splits and the rule
    that made them, for tasks whose split is actedit's own (seeded) rather than a file's."""
    if task.splits is None:
        return
    source = cfg.eval.source or cfg.data.source
    split_file = cfg.eval.split_file or cfg.data.split_file
    splits = task.splits(source, split_file)
    rule = task.split_rule(split_file) if task.split_rule else None
    write_json(out / "splits.json", {"task": task.name, "source": source, "rule": rule, **splits})


# ------------------------------------------------------------------------------------ study
def run_study(cfg: StudyConfig, *, quiet: bool = False) -> Dict[str, Any]:
    """Run (or resume) the study ``cfg``; returns the results written to ``OUT/results.json`` (under
    a launcher: rank 0; the other ranks return an empty dict once the scores are in)."""
    if cfg.sweep is not None:  # a sweep block: the rows' settings swept instead of one edit each
        return run_sweep(cfg, quiet=quiet)
    started = time.perf_counter()
    w = world()  # under a launcher: joins the process group, "cuda" becomes this process's GPU
    if w.distributed and getattr(cfg, "device_map", None) is not None:
        raise ValueError(
            f"device_map ({cfg.device_map}) spreads one model over several devices, but {w.size} processes are "
            "running (torchrun/accelerate launch), each holding the whole model on its own device: remove "
            "device_map, or run one process."
        )
    out = Path(cfg.out)
    runs = cfg.runs()
    composed = cfg.composed_methods
    edits = [name for name, _, _ in runs] + (["composed"] if composed else [])
    steps = _Steps(2 + 2 * len(runs) + bool(composed) + 1 + bool(edits) + 1, quiet or not w.is_main)
    task = task_spec(cfg.eval.task)

    # data first: a missing dataset should fail before the model loads
    source = cfg.eval.source or cfg.data.source
    questions = steps.run(
        f"load {task.name} ({cfg.eval.split})",
        task.load,
        source,
        cfg.eval.split,
        cfg.eval.split_file or cfg.data.split_file,
        cfg.eval.limit,
    )
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    placement = cfg.placement(device)  # {"device": ...} or {"device_map": ..., "offload_folder": ...}
    model, tokenizer = steps.run(
        f"load model {cfg.model} ({dtype}, {cfg.placement_text(device)})",
        load_model,
        cfg.model,
        dtype=getattr(torch, dtype),
        **placement,
    )
    # every run's layer specs against this model's depth, before any work
    pipelines = {name: cfg.pipeline(row, seed).for_model(model) for name, row, seed in runs if not cfg.is_finetune(row)}
    if w.is_main:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves no empty folder
    run_on_main(_write_splits, cfg, task, out)

    effect_texts = [task.text(q) for q in questions[: cfg.eval.norm_texts]]
    artifacts, step_seconds = _build_edits(cfg, pipelines, model, tokenizer, steps, out, effect_texts)
    if composed:
        path = out / "artifacts" / "composed"

        def build_composed():
            if not _artifact_ready(path):
                first_runs = {row: next(name for name, r, _ in runs if r == row) for row in composed}
                edits = [artifacts[first_runs[row]] for row in composed]
                pvm = compose(*edits, model=model, metadata={"composed_of": composed})
                save_artifact(pvm, path, metadata=_effect(pvm, tokenizer, effect_texts, "composed"))

        steps.run(f"compose {' + '.join(composed)}", run_on_main, build_composed)
        artifacts["composed"] = path

    finetuned = {name: row for name, row, _ in runs if cfg.is_finetune(row)}
    pvms = {
        name: (
            FINETUNES[cfg.row_method(finetuned[name])].load(model, artifacts[name])
            if name in finetuned
            else load_artifact(artifacts[name], model)
        )
        for name in edits
    }
    key = {
        "format": EVAL_FORMAT,
        "task": task.name,
        "questions": [q.index for q in questions],
        "options": cfg.eval.task_options,
        "dtype": dtype,
        "model": cfg.model,
    }
    results = steps.run(
        f"score base model{' + ' + ', '.join(edits) if edits else ''} on {len(questions)} questions",
        _score_all,
        cfg,
        model,
        tokenizer,
        questions,
        pvms,
        artifacts,
        key,
        out / "eval",
        {name: FINETUNES[cfg.row_method(row)] for name, row in finetuned.items()},
    )
    if not w.is_main:  # rank 0 analyses and reports
        return {}
    for name in edits:  # each artifact carries its scores (metadata and card); its identity is unchanged
        if name not in finetuned:
            entry = measurement(
                task, cfg.eval.split, results[name], results["base"], measured_by="actedit run", data=source
            )
            add_measurement(artifacts[name], entry)
    analyses: Dict[str, Any] = {}
    if edits and cfg.eval.analyses:
        norm_texts = [task.text(q) for q in questions[: cfg.eval.norm_texts]]
        analyses = steps.run(
            "analyses (flips, KL, norm drift)",
            analyze_edits,
            model,
            pvms,
            tokenizer,
            results["base"],
            results,
            norm_texts,
            metric=task.metrics[0],
            plot_dir=out,
        )

    def write_report():
        summary = summarise(
            cfg,
            len(questions),
            results,
            analyses,
            artifacts,
            step_seconds,
            steps.seconds,
            edits,
            time.perf_counter() - started,
            model,
        )
        summary["memory"] = _memory(steps)
        if task.baselines is not None:
            summary["baselines"] = task.baselines(questions)
        if task.group is not None:
            summary["by_group"] = metrics_by_group(task, questions, results)
        plot_scores(
            dict(summary["methods"]),
            out / "scores.png",
            metrics=task.metrics,
            task=task.title.split(" (")[0],
        )
        write_json(out / "results.json", summary, default=float)
        (out / "report.md").write_text(markdown_report(summary))
        return summary

    summary = steps.run("write report", write_report)
    summary["seconds"]["total"] = round(time.perf_counter() - started, 2)
    summary["memory"] = _memory(steps)
    write_json(out / "results.json", summary, default=float)
    return summary


def _memory(steps: _Steps) -> Dict[str, Any]:
    """``results.json``'s ``memory``: each step's peak resident memory and the process's (MiB).
    The process's is the kernel's ``VmHWM`` or the largest step's, whichever is higher: the kernel
    folds its per-thread RSS counters into ``VmHWM`` lazily, so a sampled ``VmRSS`` can exceed it
    by a few hundred KiB."""
    total = peak_rss_mib()
    measured = [mib for mib in steps.peak_mib.values() if mib is not None]
    if total is not None and measured:
        total = max(total, max(measured))
    return {"peak_rss_mib": {"steps": dict(steps.peak_mib), "total": total}}


def _build_edits(cfg: StudyConfig, pipelines, model, tokenizer, steps: _Steps, out: Path, effect_texts: List[str]):
    """Each run's artifact: reused when complete, else collected (or its complete store reused)
    and fitted or trained."""
    artifacts: Dict[str, Path] = {}
    step_seconds: Dict[str, Dict[str, float]] = {}
    previous = _read_json(out / "results.json") or {}
    previous_runs = {**previous.get("methods", {}), **previous.get("runs", {})}
    for name, row, seed in cfg.runs():
        if cfg.is_finetune(row):
            artifacts[name], step_seconds[name] = _finetune(cfg, name, row, seed, model, tokenizer, steps, effect_texts)
            continue
        pcfg = pipelines[name]
        path = Path(pcfg.out)
        record = step_seconds.setdefault(name, {})
        verb = "train" if pcfg.spec.trained else "fit"
        if run_on_main(_artifact_ready, path):
            steps.run(f"{name}: collect (reused)", lambda: None)
            steps.run(f"{name}: {verb} (reused)", lambda: None)
            previous = previous_runs.get(name, {})
            record.update({k: v for k, v in previous.get("seconds", {}).items() if k in ("collect", "fit")})
        else:
            collect_step, fit_step = f"{name}: collect activations", f"{name}: {verb}"
            store = steps.run(collect_step, pipeline.collect, pcfg, model, tokenizer)  # every rank its shards
            steps.run(fit_step, run_on_main, _fit_and_save, pcfg, model, tokenizer, store, effect_texts)
            record.update(collect=steps.seconds[collect_step], fit=steps.seconds[fit_step])
        artifacts[name] = path
    return artifacts, step_seconds


def _finetune(cfg: StudyConfig, name: str, row: str, seed, model, tokenizer, steps: _Steps, effect_texts: List[str]):
    """A fine-tuning run (:mod:`actedit.study.finetunes`): reused when saved, else trained on the
    row's data and saved, its effect measured (``effect.json`` beside it). Returns (path, seconds)."""
    spec, settings, data, path = cfg.finetune(row, seed)
    if run_on_main(spec.ready, path):
        steps.run(f"{name}: fine-tune (reused)", lambda: None)
        steps.run(f"{name}: effect (reused)", lambda: None)
        return path, {}

    def train():
        spec.train(model, tokenizer, finetune_dataset(data), settings, path, True)

    def effect():
        tuned = spec.load(model, path)
        write_json(effect_path(path), _effect(tuned, tokenizer, effect_texts, name), default=float)

    steps.run(f"{name}: fine-tune ({spec.name})", run_on_main, train)
    steps.run(f"{name}: effect", run_on_main, effect)
    return path, {"fit": steps.seconds[f"{name}: fine-tune ({spec.name})"]}


def _fit_and_save(pcfg, model, tokenizer, store, effect_texts: List[str]) -> Path:
    config, metadata = pipeline.make_edit(pcfg, model, tokenizer, store=store)
    pvm = intervenable(model, config)
    path = save_artifact(pvm, pcfg.out, metadata=_effect(pvm, tokenizer, effect_texts, pcfg.method))
    plot_layer_selection(metadata, path)
    return path


def _effect(pvm, tokenizer, texts: List[str], name: str) -> Dict[str, Any]:
    """The artifact metadata of an edit's measured effect (:mod:`actedit.eval.effect`; its
    warnings are issued now and kept in the artifact, its card and the report)."""
    return {"effect": measure_effect(pvm, tokenizer, texts or None, name=name).to_dict()}


def _score_all(
    cfg: StudyConfig, model, tokenizer, questions, pvms, artifacts, key, eval_dir: Path, finetunes=None
) -> Dict[str, MCResult]:
    """Scores read from ``OUT/eval/<name>.json`` when their key and artifact (or fine-tuned
    weights) match; the rest scored together, the edits sharing the base model's unedited lower
    layers (under a launcher: each process its block of the questions, every process gets all
    scores, rank 0 writes them)."""
    finetunes = finetunes or {}

    def identity(name: str) -> Optional[str]:
        return finetunes[name].identity(artifacts[name]) if name in finetunes else _sha(artifacts[name])

    names: List[str] = ["base"] + list(pvms)

    def cached_scores() -> Dict[str, Dict[str, Any]]:
        out = {}
        for name in names:
            cached = _read_json(eval_dir / f"{name}.json")
            if cached and cached.get("key") == key and (name == "base" or cached.get("artifact_sha") == identity(name)):
                out[name] = cached["result"]
        return out

    done: Dict[str, MCResult] = {name: MCResult.from_dict(r) for name, r in run_on_main(cached_scores).items()}
    todo = [name for name in pvms if name not in done]
    if todo or "base" not in done:  # the base model runs whenever an edit does: it carries their lower layers
        targets = {"base": model, **{name: pvms[name] for name in todo}}
        scored = score_mc_many_split(
            targets, tokenizer, questions, task=cfg.eval.task, batch_size=cfg.eval.batch_size, **cfg.eval.task_options
        )
        main = world().is_main
        for name, result in scored.items():
            if name in done:
                continue
            done[name] = result
            if not main:
                continue
            write_json(
                eval_dir / f"{name}.json",
                {
                    "key": key,
                    "artifact_sha": None if name == "base" else identity(name),
                    "result": result.to_dict(),
                },
                default=float,
            )
    return {name: done[name] for name in names}


__all__ = ["EVAL_FORMAT", "run_study"]
