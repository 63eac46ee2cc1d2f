"""The study's results: ``OUT/results.json`` (:func:`summarise`) and ``OUT/report.md`` (:func:`markdown_report`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from actedit.data.environment import environment
from actedit.data.tasks import task_spec
from actedit.eval.analysis import answer_picks, constant_answer
from actedit.eval.effect import effect_table
from actedit.eval.report import baselines_sentence, constant_answer_warning
from actedit.interventions.artifacts import artifact_metadata

from .finetunes import FINETUNES, finetune_info


def summarise(
    cfg,
    n_questions: int,
    results: Dict[str, Any],
    analyses: Dict[str, Any],
    artifacts: Dict[str, Path],
    step_seconds: Dict[str, Dict[str, float]],
    steps_seconds: Dict[str, float],
    edits: List[str],
    total: float,
    model,
) -> Dict[str, Any]:
    """``results.json``: per model the task's metrics and their stderr (``mc1``, ``mc1_stderr``,
    ...), the layers edited, flips, KL and norm drift, seconds per step; the study's settings,
    protocol and environment."""
    methods: Dict[str, Any] = {}
    rows_of = {name: row for name, row, _ in cfg.runs()}
    for name in ["base"] + edits:
        r = results[name]
        entry: Dict[str, Any] = {}
        for metric, value in r.metrics.items():
            entry[metric] = value
            entry[f"{metric}_stderr"] = r.stderr[metric]
        entry["score_seconds"] = round(r.seconds, 2)
        picks = answer_picks(r.records)
        if picks is not None:
            entry["picks"] = picks
        if name != "base":
            row = rows_of.get(name)
            if row is not None and cfg.is_finetune(row):
                info = finetune_info(FINETUNES[cfg.row_method(row)], artifacts[name])
            else:
                info = artifact_metadata(artifacts[name])
            entry["artifact"] = str(artifacts[name])
            entry["layers"] = sorted({int(layer) for e in info.get("edits", []) for layer in e.get("layers", [])})
            entry["edits"] = [{k: e.get(k) for k in ("method", "component", "layers")} for e in info.get("edits", [])]
            if info.get("effect"):
                entry["effect"] = info["effect"]
                entry["warnings"] = list(info["effect"].get("warnings", []))
            a = analyses.get(name)
            if a is not None:
                entry["flips"] = a.flips.to_dict()
                entry["kl_to_base"] = a.side_effects.kl
                entry["lm_loss"] = a.side_effects.edited_loss
                entry["base_lm_loss"] = a.side_effects.base_loss
                entry["norm_drift"] = a.norm_drift
            entry["seconds"] = {**step_seconds.get(name, {}), "score": round(r.seconds, 2)}
        methods[name] = entry
    base_losses = [m["base_lm_loss"] for m in methods.values() if "base_lm_loss" in m]
    if base_losses:
        methods["base"]["lm_loss"] = base_losses[0]
    metrics = list(task_spec(cfg.eval.task).metrics)
    rows: Dict[str, Any] = {"base": methods["base"]}
    seeded: Dict[str, Any] = {}
    for row in cfg.method_names:
        names = [name for name, r, _ in cfg.runs() if r == row]
        if names == [row]:
            rows[row] = methods[row]
        else:
            rows[row] = over_seeds({name.rsplit("seed", 1)[1]: methods[name] for name in names}, metrics)
            seeded.update({name: methods[name] for name in names})
    for row in cfg.method_names:
        rows[row]["method"] = cfg.row_method(row)
    if "composed" in methods:
        rows["composed"] = methods["composed"]
    return {
        "study": {
            "model": cfg.model,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "dtype_requested": cfg.dtype,
            "data": asdict(cfg.data),
            "eval": asdict(cfg.eval),
            "methods": cfg.methods,
            "compose": cfg.composed_methods,
            "seeds": cfg.seeds,
            "out": cfg.out,
        },
        "task": cfg.eval.task,
        "metrics": list(task_spec(cfg.eval.task).metrics),
        "n_questions": n_questions,
        "protocol": results["base"].protocol,
        "methods": rows,
        "runs": seeded,
        "seconds": {"steps": steps_seconds, "total": round(total, 2)},
        "environment": environment(model),
    }


SEED_MEANS = ("kl_to_base", "lm_loss", "base_lm_loss", "norm_drift", "score_seconds")
"""Numbers of a row's runs that its entry gives as the mean over seeds (the metrics get mean ± sd)."""


def over_seeds(runs: Dict[str, Dict[str, Any]], metrics: List[str]) -> Dict[str, Any]:
    """A trained row's entry from its runs (seed → run entry): every metric's mean over seeds,
    its sample standard deviation (``<metric>_sd``, n − 1 in the denominator) and the mean of the
    runs' single-run stderr (``<metric>_stderr``); KL, LM loss, drift and flips as means; the
    layers, edits and effect of the first seed's run; each run's metrics under ``seeds``."""
    first = next(iter(runs.values()))
    entry = {k: v for k, v in first.items() if k not in metrics and not k.endswith(("_stderr", "_sd"))}
    for metric in metrics:
        scores = np.array([run[metric] for run in runs.values()], dtype=float)
        entry[metric] = float(scores.mean())
        entry[f"{metric}_sd"] = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
        entry[f"{metric}_stderr"] = float(np.mean([run[f"{metric}_stderr"] for run in runs.values()]))
    for key in SEED_MEANS:
        values = [run[key] for run in runs.values() if run.get(key) is not None]
        if len(values) == len(runs):
            entry[key] = float(np.mean(values))
    if all("flips" in run for run in runs.values()):
        entry["flips"] = {
            k: float(np.mean([run["flips"][k] for run in runs.values()]))
            for k, v in first["flips"].items()
            if isinstance(v, (int, float))
        }
    if all("picks" in run for run in runs.values()):
        entry["picks"] = {k: float(np.mean([run["picks"][k] for run in runs.values()])) for k in first["picks"]}
        entry["picks_by_seed"] = {seed: run["picks"] for seed, run in runs.items()}
    entry["seeds"] = {seed: {m: run[m] for m in metrics} for seed, run in runs.items()}
    entry["layers_by_seed"] = {seed: run.get("layers") for seed, run in runs.items()}
    entry["warnings"] = sorted({w for run in runs.values() for w in run.get("warnings", [])})
    return entry


def _group_table(by_group: Optional[Dict[str, Any]], metrics: List[str]) -> List[str]:
    """Each run's metrics per group of questions (BBQ: ambiguous / disambiguated context)."""
    if not by_group:
        return []
    groups = list(next(iter(by_group.values())))
    header = [f"{m.upper()} {g} (%)" for g in groups for m in metrics]
    lines = [
        "",
        "By group of questions (the task's own breakdown; every run):",
        "",
        "| run | " + " | ".join(header) + " |",
    ]
    lines.append("|---|" + "---|" * len(header))
    for name, values in by_group.items():
        cells = [f"{100 * values[g][m]:.2f}" if g in values else "—" for g in groups for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _picks_table(methods: Dict[str, Any]) -> List[str]:
    """Which answer each model picks (% of questions), and a warning for a constant answer: a
    model that always gives one answer scores that answer's share of gold labels, whatever it knows."""
    picked = {name: m["picks"] for name, m in methods.items() if m.get("picks")}
    if not picked:
        return []
    names = list(next(iter(picked.values())))
    lines = [
        "",
        "Answers picked (% of questions; the highest-scoring choice, by position or by its text):",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {name} | " + " | ".join(f"{100 * p[k]:.1f}" for k in names) + " |" for name, p in picked.items()]
    constant = []
    for name, m in methods.items():
        runs = m.get("picks_by_seed") or {"": m.get("picks")}
        for seed, picks in runs.items():
            answer = constant_answer(picks)
            if answer is not None:
                constant.append(f"{name}{' seed ' + seed if seed else ''} ({answer!r})")
    if constant:
        lines += ["", constant_answer_warning(constant)]
    return lines


def _score(entry: Dict[str, Any], metric: str) -> str:
    """``mean ± stderr`` of one run, or for a row over seeds ``mean ± sd (n seeds; stderr …)``."""
    if "seeds" in entry:
        return (
            f"{100 * entry[metric]:.2f} ± {100 * entry[metric + '_sd']:.2f} sd ({len(entry['seeds'])} seeds; "
            f"stderr {100 * entry[metric + '_stderr']:.2f})"
        )
    return f"{100 * entry[metric]:.2f} ± {100 * entry[metric + '_stderr']:.2f}"


def _num(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _gib(mib) -> str:
    return "—" if mib is None else f"{mib / 1024:.2f}"


def markdown_report(summary: Dict[str, Any]) -> str:
    """The study's Markdown report: one row per model, then flips and timings."""
    s = summary["study"]
    env = summary["environment"]
    metrics = summary["metrics"]
    spec = task_spec(summary["task"])
    protocol = summary["protocol"]
    options = ", ".join(f"{k} {protocol[k]}" for k in ("mc2_rule",) if k in protocol)
    lines = [
        f"# actedit study: {s['model']} on {spec.title} ({s['eval']['split']} split, "
        f"{summary['n_questions']} questions)",
        "",
        f"Protocol: {protocol.get('name', spec.title)}{' (' + options + ')' if options else ''}, model dtype "
        f"{s['dtype']}. Machine: {env['machine'].get('cpu')}, {env['machine'].get('cores')} cores, "
        f"{env['machine'].get('torch_threads')} torch threads; torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, pyvene {env.get('pyvene')}.",
        "",
        "| model | layers | "
        + " | ".join(f"{m.upper()} (%)" for m in metrics)
        + " | norm drift | KL to base | LM loss |",
        "|---|---|" + "---|" * len(metrics) + "---|---|---|",
    ]
    for name, m in summary["methods"].items():
        layers = m.get("layers")
        shown = (
            "—"
            if not layers
            else (f"{layers[0]}–{layers[-1]} ({len(layers)})" if len(layers) > 6 else ", ".join(map(str, layers)))
        )
        scores = " | ".join(_score(m, k) for k in metrics)
        lines.append(
            f"| {name} | {shown} | {scores} | {_num(m.get('norm_drift'))} | {_num(m.get('kl_to_base'))} | "
            f"{_num(m.get('lm_loss', m.get('base_lm_loss')), 3)} |"
        )
    if summary.get("baselines"):
        lines += ["", baselines_sentence(summary["baselines"], summary["n_questions"])]
    lines += _picks_table(summary["methods"])
    lines += _group_table(summary.get("by_group"), metrics)
    lines += [
        "",
        "Norm drift: mean over layers of |‖h′‖ − ‖h‖| / ‖h‖ of the residual stream on the first "
        f"{s['eval']['norm_texts']} test questions. KL to base and LM loss: on neutral text "
        "(`actedit.eval.analysis.NEUTRAL_TEXTS`), where edits with the `answer` policy (ITI, CAA) have no "
        "marked answer and edit only the last position.",
    ]
    if s.get("seeds"):
        seeded = [n for n, m in summary["methods"].items() if "seeds" in m]
        lines += [
            "",
            f"Trained rows ({', '.join(seeded) or 'none'}) were trained once per seed {s['seeds']} (module "
            "initialisation and batch order): their scores are the mean ± the sample standard deviation over "
            "seeds, beside the mean single-run stderr; layers, effect and warnings are the first seed's, drift, "
            "KL, LM loss and flips the means. Closed-form rows are deterministic and ran once; every run shares "
            "the activations and the base model's scores. Per seed:",
            "",
        ]
        lines += [
            f"- {n}: "
            + "; ".join(
                f"seed {seed} " + ", ".join(f"{k.upper()} {100 * v:.2f}" for k, v in values.items())
                for seed, values in m["seeds"].items()
            )
            for n, m in summary["methods"].items()
            if "seeds" in m
        ]
    flips = {n: m["flips"] for n, m in summary["methods"].items() if "flips" in m}
    if flips:
        lines += [
            "",
            f"{metrics[0].upper()} prediction flips against the base model (% of questions, HPR Table 3):",
            "",
            "| edit | False→True | True→False | remains True | remains False |",
            "|---|---|---|---|---|",
        ]
        for n, f in flips.items():
            lines.append(
                f"| {n} | {f['false_to_true']:.2f} | {f['true_to_false']:.2f} | {f['remains_true']:.2f} | "
                f"{f['remains_false']:.2f} |"
            )
    effects = {n: m["effect"] for n, m in summary["methods"].items() if m.get("effect")}
    if effects:
        lines += [
            "",
            "## What each edit does",
            "",
            "Per edited layer: the share of real tokens the edit acts on (its position policy; for HPR, the "
            "tokens its probe marks negative) and ‖h′ − h‖ / ‖h‖ at the edit's site, on the first "
            f"{s['eval']['norm_texts']} test questions and on neutral text (`actedit.eval.effect`).",
        ]
        for n, effect in effects.items():
            gen = effect.get("generation") or {}
            lines += ["", f"### {n}", "", effect_table(effect)]
            if gen:
                lines += [
                    "",
                    f"Greedy answers: the base model's loss on them {gen['edited_surprise']:.2f} nats/token (on its "
                    f"own answers {gen['base_surprise']:.2f}); repeated word 3-grams "
                    f"{100 * gen['edited_repetition']:.0f} % (base {100 * gen['base_repetition']:.0f} %). "
                    f"First answer: {gen['edited_answers'][0][:120]!r}",
                ]
        warned = [(n, w) for n, e in effects.items() for w in e.get("warnings", [])]
        lines += ["", "## Warnings", ""]
        lines += [f"- **{n}**: {w}" for n, w in warned] if warned else ["None: no edit is a no-op or breaks the model."]
    peaks = summary.get("memory", {}).get("peak_rss_mib", {})
    lines += [
        "",
        "Seconds and peak resident memory per step:",
        "",
        "| step | seconds | peak RSS (GiB) |",
        "|---|---|---|",
    ]
    for step, sec in summary["seconds"]["steps"].items():
        lines.append(f"| {step} | {sec:.1f} | {_gib(peaks.get('steps', {}).get(step))} |")
    lines += [
        "",
        f"Total: {summary['seconds']['total']:.0f} s, peak resident memory {_gib(peaks.get('total'))} GiB. "
        "Plots: scores.png, flips.png, norms.png, artifacts/<method>_probe_accuracy.png for trained methods.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["SEED_MEANS", "markdown_report", "over_seeds", "summarise"]
