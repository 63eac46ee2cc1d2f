"""``actedit sweep``: which layer, how strong, how many examples, chosen on the eval split
(:mod:`actedit.study.sweep`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from actedit.interventions.registry import method_spec
from actedit.study import load_study
from actedit.study.sweep import run_sweep

from .options import add_set_option, overrides_of

SWEEPS_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sweeps.yaml"
"""The embedded sweep config (every method's strength and data curves on TruthfulQA)."""

AXIS_FLAGS = {"strength": "strength", "layers": "layers", "examples": "examples"}
"""Flag → the axis of each swept row it sets (a comma-separated list)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", default=None, help="study YAML with a sweep: block (default: configs/sweeps.yaml)"
    )
    parser.add_argument(
        "--method",
        dest="rows",
        action="append",
        default=[],
        metavar="ROW",
        help="sweep only this row of methods (repeatable; a row without axes in sweep.methods gets the flags' axes)",
    )
    parser.add_argument("--strength", default=None, help="strengths, e.g. 0.5,1,2,4 (every swept row)")
    parser.add_argument("--layers", default=None, help="layer specs, e.g. 6,9,12 or '\"1/3:\",all' (every swept row)")
    parser.add_argument("--examples", default=None, help="training examples per split, e.g. 25,50,100,all")
    parser.add_argument("--metric", default=None, help="the metric chosen on (default: the task's last, MC2)")
    parser.add_argument("--max-kl", type=float, default=None, help="the chosen point's largest KL on neutral text")
    parser.add_argument(
        "--max-loss-increase", type=float, default=None, help="the chosen point's largest LM-loss increase (nats/token)"
    )
    parser.add_argument("--data", default=None, help="overrides data.source (TruthfulQA: its directory)")
    parser.add_argument("--out", default=None, help="output directory (overrides out)")
    add_set_option(parser, "eval.limit=40")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _axis_overrides(args, rows, probe) -> list:
    """``--set``-style overrides for the axis and rule flags; ``--strength`` goes to the rows whose
    method has a strength (SEA has none)."""
    out = []
    for flag, axis in AXIS_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        targets = [r for r in rows if axis != "strength" or method_spec(probe.row_method(r)).strength is not None]
        if not targets:
            raise ValueError(f"--{flag}: none of the rows {', '.join(rows)} has a strength setting.")
        out += [f"sweep.methods.{row}.{axis}=[{value}]" for row in targets]
    for flag, key in (("metric", "metric"), ("max_kl", "max_kl"), ("max_loss_increase", "max_loss_increase")):
        if getattr(args, flag) is not None:
            out.append(f"sweep.choose.{key}={getattr(args, flag)}")
    return out


def run(args) -> int:
    path = args.config or str(SWEEPS_CONFIG)
    overrides = overrides_of(args, {"data": "data.source", "out": "out"})
    probe = load_study(path, overrides)  # which rows the axis flags apply to
    swept = list(probe.sweep.methods) if probe.sweep is not None else []
    rows = args.rows or swept
    if not rows:
        raise ValueError(f"{path} has no sweep: block; name the rows to sweep with --method and give their axes.")
    cfg = load_study(path, overrides + _axis_overrides(args, rows, probe))
    if cfg.sweep is None:
        raise ValueError("no axis to sweep: give --strength, --layers or --examples, or a sweep: block.")
    unknown = [row for row in rows if row not in cfg.sweep.methods]
    if unknown:
        raise ValueError(f"--method {', '.join(unknown)}: no axes for it; give --strength, --layers or --examples.")
    cfg.sweep.methods = {row: cfg.sweep.methods[row] for row in rows}
    print_summary(run_sweep(cfg, quiet=args.quiet), Path(cfg.out))
    return 0


def print_summary(summary, out: Path) -> None:
    """One line per swept row (the chosen point against the row's own settings) and where the files are."""
    metric, split = summary["metric"], summary["report_split"] or summary["choose_split"]
    for row, info in summary["rows"].items():
        chosen = next((p for p in info["points"] if p["id"] == info["chosen"]), None)
        default = next(p for p in info["points"] if p["id"] == info["default"])
        if chosen is None:
            print(f"{row}: no point met the rule ({summary['rule_text']})")
            continue
        print(
            f"{row}: chose {chosen['axis']}={chosen['value']} ({metric.upper()} on {split} "
            f"{100 * chosen['scores'][split][metric]:.2f} %, own settings "
            f"{100 * default['scores'][split][metric]:.2f} %, KL {chosen['kl']:.4f}) -> {info['artifact']}"
        )
    print(f"done in {summary['seconds']['total']:.0f} s: {out / 'sweep.md'}, sweep.csv, sweep_tradeoff.png")


__all__ = ["SWEEPS_CONFIG", "add_arguments", "print_summary", "run"]
