"""``actedit eval``: a task's metrics of a base model and an edit, with the analyses, as files.

Writes into ``--out``:

* ``results.json`` — the task's metrics (fractions; of the edit when one is given, else of the
  base model) with their stderr, ``base``/``edited`` blocks with per-question scores, the
  protocol, the flip table, side effects (LM loss, KL to the base model) and norm drift;
* ``report.md`` — a Markdown table (model × metrics ± stderr, norm drift, KL) and the flips;
* ``norms.png`` and ``flips.png`` when an edit is evaluated; ``probe_accuracy.png`` for an edit
  that recorded its layer selection; ``layer_curve.png`` with ``--layer-curve``.

Under a launcher (``torchrun``/``accelerate launch``, :mod:`actedit.data.distributed`) every
process loads the model (on its own GPU with CUDA) and scores its block of the questions
(:mod:`actedit.eval.distributed`), the layer curve included; rank 0 gathers the per-question
results in order, runs the analyses and writes every file; the other ranks write nothing.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from actedit.data.distributed import process_device, world
from actedit.data.models import load_model
from actedit.data.tasks import TaskSpec, task_spec
from actedit.eval.plots import plot_layer_count, plot_per_layer
from actedit.interventions.artifacts import add_measurement, artifact_metadata, load_artifact, resolve_artifact
from actedit.interventions.edits import actedit_version
from actedit.interventions.files import write_json

from .analysis import (
    CONSTANT_ANSWER_SHARE,
    LayerCountCurve,
    accuracy_vs_num_layers,
    analyze_edits,
    answer_picks,
    constant_answer,
    restrict_layers,
)
from .distributed import score_mc_many_split
from .effect import effect_table, measure_effect
from .mc import MCResult


def _block(result: MCResult) -> Dict[str, Any]:
    out = result.to_dict()
    out["per_question"] = out.pop("records")
    picks = answer_picks(result.records)
    if picks is not None:
        out["picks"] = picks
    return out


def evaluate(args, options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Run the evaluation described by ``args`` (``actedit eval``'s options: model, task, data,
    split, split_file, limit, intervention, out, batch_size, no_analyses, layer_curve) with the
    task's ``options``; returns the results dict it wrote (under a launcher: rank 0; the other
    ranks score their share and return an empty dict)."""
    task = task_spec(args.task)
    options = dict(options or {})
    task.options(options, "--option")
    out_dir = Path(args.out)
    main = world().is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    questions = task.load(args.data, args.split, args.split_file, args.limit)
    if not questions:
        raise ValueError(f"no questions to score in split {args.split!r} (limit {args.limit}).")
    started = time.time()
    model, tokenizer = load_model(args.model, device=process_device())
    pvm = load_artifact(args.intervention, model) if args.intervention else None
    # base and edit together: the edit starts from the base model's unedited lower layers
    scored = score_mc_many_split(
        {"base": model, **({"edited": pvm} if pvm is not None else {})},
        tokenizer,
        questions,
        task=task,
        batch_size=args.batch_size,
        **options,
    )
    curve = None
    if pvm is not None and not args.no_analyses and args.layer_curve:  # every rank scores its share
        curve = _layer_curve(args, task, options, pvm, tokenizer, questions)
    if not main:
        return {}
    base = scored["base"]
    results: Dict[str, Any] = {
        "model": args.model,
        "task": task.name,
        "data": args.data,
        "split": args.split,
        "n_questions": len(questions),
        "protocol": base.protocol,
        "base": _block(base),
    }
    if task.baselines is not None:
        results["baselines"] = task.baselines(questions)
    rows: List[Tuple[str, MCResult, Optional[float], Optional[float]]] = [("base", base, None, None)]
    final = base
    if pvm is not None:
        edited = final = scored["edited"]
        results["intervention"] = {
            "path": str(args.intervention),
            "metadata": artifact_metadata(resolve_artifact(args.intervention)),
        }
        results["edited"] = _block(edited)
        drift = kl = None
        if args.no_analyses:
            analysis = None
        else:
            analysis = analyze_edits(
                model,
                {"edited": pvm},
                tokenizer,
                base,
                {"edited": edited},
                [task.text(q) for q in questions[:32]],
                metric=task.metrics[0],
                plot_dir=out_dir,
            )["edited"]
            results["flips"] = analysis.flips.to_dict()
            results["side_effects"] = analysis.side_effects.to_dict()
            results["norm_drift"] = {str(k): v for k, v in analysis.norms.items()}
            results["effect"] = measure_effect(
                pvm, tokenizer, [task.text(q) for q in questions[:32]], name=str(args.intervention)
            ).to_dict()
            drift, kl = analysis.norm_drift, analysis.side_effects.kl
            _layer_plots(results, curve, out_dir)
        rows.append(("edited", edited, drift, kl))
    for metric in task.metrics:
        results[metric], results[f"{metric}_stderr"] = final.metrics[metric], final.stderr[metric]
    if pvm is not None and getattr(args, "record", True):
        entry = measurement(task, args.split, scored["edited"], base, measured_by="actedit eval", data=args.data)
        results["recorded_in"] = str(record_in_artifact(args.intervention, entry) or "")
    results["seconds"] = time.time() - started
    write_json(out_dir / "results.json", results, indent=2, default=float)
    (out_dir / "report.md").write_text(markdown_report(results, rows, task))
    return results


RUN_DETAILS = (
    "task",
    "mode",
    "full_sequence_reasons",
    "shared_prefix_tokens",
    "tokens_fed",
    "shared_lower_layers",
    "n_questions",
    "interventions",
    "processes",
    "model",
    "peft",
    "context_template",
    "continuation",
    "mc2_rule_meaning",
    "add_bos_token",
)
"""Keys of a score's protocol that describe how this run computed it (or repeat another field),
not what was measured: left out of the protocol an artifact records."""


def measurement(
    task: TaskSpec,
    split: str,
    edited: MCResult,
    base: Optional[MCResult],
    *,
    measured_by: str,
    data: Optional[str] = None,
) -> Dict[str, Any]:
    """What :func:`actedit.interventions.artifacts.add_measurement` records in an artifact for the
    edit's scores ``edited`` on ``split`` of ``task`` (and the base model's ``base`` on the same
    questions): task, split, number of questions and a hash of their indices, each metric with
    its standard error, the protocol (without :data:`RUN_DETAILS`), model, who measured it, when."""
    indices = ",".join(str(r.index) for r in edited.records)
    protocol = {k: v for k, v in edited.protocol.items() if k not in RUN_DETAILS}
    out: Dict[str, Any] = {
        "task": task.name,
        "task_title": task.title,
        "split": split,
        "n": edited.n_questions,
        "questions_sha256": hashlib.sha256(indices.encode()).hexdigest()[:16],
        "scores": {m: float(edited.metrics[m]) for m in task.metrics},
        "stderr": {m: float(edited.stderr[m]) for m in task.metrics},
        "protocol": protocol,
        "model": edited.protocol.get("model"),
        "data": data,
        "measured_by": measured_by,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "actedit_version": actedit_version(),
    }
    if base is not None:
        out["base"] = {m: float(base.metrics[m]) for m in task.metrics}
        out["base_stderr"] = {m: float(base.stderr[m]) for m in task.metrics}
    return out


def record_in_artifact(intervention: str, entry: Dict[str, Any]) -> Optional[Path]:
    """Record ``entry`` (:func:`measurement`) in the artifact ``intervention`` when it is a local
    directory; returns its path, or None for a Hub download (its cached copy is not the user's to
    change; download it with ``huggingface-cli download`` into a folder to record there)."""
    path = Path(str(intervention)).expanduser()
    if not path.is_dir():
        return None
    try:
        add_measurement(path, entry)
    except OSError as exc:  # a read-only artifact: the scores are in results.json all the same
        warnings.warn(f"could not record the scores in {path} ({exc}); they are in results.json.", stacklevel=2)
        return None
    return path


def _layer_plots(results: Dict[str, Any], curve: Optional[LayerCountCurve], out_dir: Path) -> None:
    """Probe accuracy per layer (from the artifact's layer selection) and, with --layer-curve,
    the metrics of the edit restricted to its best 1..K layers (``curve``)."""
    selection = results["intervention"]["metadata"].get("layer_selection") or {}
    if selection.get("accuracy"):
        accuracy = {int(k): float(v) for k, v in selection["accuracy"].items()}
        plot_per_layer(
            accuracy, "eval probe accuracy", out_dir / "probe_accuracy.png", highlight=selection.get("selected")
        )
    if curve is not None:
        results["layer_curve"] = curve.to_dict()
        plot_layer_count(curve, out_dir / "layer_curve.png")


def _layer_curve(args, task: TaskSpec, options, pvm, tokenizer, questions) -> LayerCountCurve:
    """The metrics of the edit restricted to its best 1..K layers (by the artifact's ranking)."""
    info = artifact_metadata(resolve_artifact(args.intervention))
    selection = info.get("layer_selection") or {}
    layers = sorted(
        {
            layer
            for edit in info.get("edits", [])
            for layer in list(edit.get("layers", [])) + list(edit.get("switched_off", []))
        }
    )
    ranked = [int(x) for x in selection.get("ranking", []) if int(x) in layers] or layers

    def score(chosen: List[int]) -> Dict[str, float]:
        return score_mc_many_split(
            {"model": restrict_layers(pvm, chosen)},
            tokenizer,
            questions,
            task=task,
            batch_size=args.batch_size,
            progress=False,
            **options,
        )["model"].metrics

    return accuracy_vs_num_layers(score, ranked, max_k=len(ranked), progress=world().is_main)


def baselines_sentence(baselines: Dict[str, Dict[str, float]], n_questions: int) -> str:
    """One sentence of what answering without a model scores (a task's ``baselines``), in %."""
    shown = "; ".join(
        f"{name} " + ", ".join(f"{metric.upper()} {100 * value:.2f}" for metric, value in values.items())
        for name, values in baselines.items()
    )
    return f"Without a model, on these {n_questions} questions: {shown}."


def constant_answer_warning(models: Sequence[str]) -> str:
    """The warning for models (``"name ('answer')"``) that give one answer to nearly every question."""
    return (
        f"Warning: {', '.join(models)} give one answer to nearly every question "
        f"(≥ {100 * CONSTANT_ANSWER_SHARE:.0f} %): such a score is that answer's share of gold labels, "
        "not knowledge of the task."
    )


def markdown_report(results: Dict[str, Any], rows, task: TaskSpec) -> str:
    protocol = results["protocol"]
    lines = [
        f"# {task.title} ({results['split']} split, {results['n_questions']} questions)",
        "",
        f"Model: `{results['model']}`. Protocol: {protocol.get('name', task.title)}"
        + (f"; MC2 rule: {protocol['mc2_rule']}" if "mc2_rule" in protocol else "")
        + f"; BOS token: {protocol.get('bos')}.",
        "",
        "| model | " + " | ".join(m.upper() for m in task.metrics) + " | mean norm drift | KL to base |",
        "|---|" + "---|" * len(task.metrics) + "---|---|",
    ]

    def fmt(x: Optional[float]) -> str:
        return "—" if x is None else f"{x:.4f}"

    for name, result, drift, kl in rows:
        scores = " | ".join(f"{100 * result.metrics[m]:.2f} ± {100 * result.stderr[m]:.2f}" for m in task.metrics)
        lines.append(f"| {name} | {scores} | {fmt(drift)} | {fmt(kl)} |")
    if results.get("baselines"):
        lines += ["", baselines_sentence(results["baselines"], results["n_questions"])]
    for name in ("base", "edited"):
        picks = results.get(name, {}).get("picks")
        if picks:
            shown = ", ".join(f"{k} {100 * v:.1f}" for k, v in picks.items())
            lines += ["", f"Answers {name} picks (% of questions): {shown}."]
            if constant_answer(picks) is not None:
                lines.append(constant_answer_warning([f"{name} ({constant_answer(picks)!r})"]))
    if "flips" in results:
        f = results["flips"]
        lines += [
            "",
            f"{task.metrics[0].upper()} flips (% of questions):",
            "",
            "| False→True | True→False | remains True | remains False | accuracy |",
            "|---|---|---|---|---|",
            f"| {f['false_to_true']:.2f} | {f['true_to_false']:.2f} | {f['remains_true']:.2f} | "
            f"{f['remains_false']:.2f} | {f['accuracy']:.2f} |",
        ]
    if results.get("effect"):
        effect = results["effect"]
        lines += ["", "What the edit does (`actedit.eval.effect`):", "", effect_table(effect), ""]
        lines += [f"**Warning:** {w}" for w in effect.get("warnings", [])] or ["No warning: not a no-op, not broken."]
    lines.append("")
    return "\n".join(lines)


__all__ = ["evaluate", "markdown_report", "measurement", "record_in_artifact"]
