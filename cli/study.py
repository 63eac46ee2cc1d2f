"""``actedit run``: a whole study from one YAML file (:mod:`actedit.study`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from actedit.data.distributed import world
from actedit.study import default_config_path, load_study, run_study

from .options import DEVICE_MAP_HELP, add_set_option, overrides_of
from .sweep import print_summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", nargs="?", default=None, help="study YAML (default: the embedded configs/default.yaml)"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="directory with mc_task.json and hpr_ids_splits.json (overrides data.source; default: the Hub)",
    )
    parser.add_argument("--out", default=None, help="output directory (overrides out)")
    parser.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help=f"overrides device_map: {DEVICE_MAP_HELP}; disk goes to OUT/offload",
    )
    add_set_option(parser, "eval.limit=20")
    parser.add_argument("--quiet", action="store_true", help="no step headers")


def run(args) -> int:
    overrides = overrides_of(args, {"data": "data.source", "out": "out", "device_map": "device_map"})
    cfg = load_study(args.config or str(default_config_path()), overrides)
    summary = run_study(cfg, quiet=args.quiet)
    if not world().is_main:  # under a launcher, rank 0 reports
        return 0
    if cfg.sweep is not None:
        print_summary(summary, Path(cfg.out))
        return 0
    m = summary["methods"]
    metrics = summary["metrics"]
    best = max((n for n in m if n != "base"), key=lambda n: m[n][metrics[-1]], default=None)
    shown = "/".join(x.upper() for x in metrics)
    line = f"done in {summary['seconds']['total']:.0f} s: base {shown} " + "/".join(
        f"{100 * m['base'][x]:.1f}" for x in metrics
    )
    if best:
        line += f", best edit {best} " + "/".join(f"{100 * m[best][x]:.1f}" for x in metrics)
    print(
        f"{line}; report {Path(cfg.out) / 'report.md'}, results {Path(cfg.out) / 'results.json'}, "
        f"artifacts {Path(cfg.out) / 'artifacts'}"
    )
    return 0


__all__ = ["add_arguments", "run"]
