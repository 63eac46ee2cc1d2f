"""The cost of an N-point sweep against N separate runs, as a user would run both.

One method (default CAA with the default study's settings: layer 0.4 of the depth, answer
policy) and N strengths on SmolLM2-135M-Instruct, each point scored on HPR's TruthfulQA eval and
test questions, in one run side by side:

* **sweep**: ``actedit sweep`` (one process: one collection, one fit, every point set on a copy of
  it, the points scored together beside the base model, KL and LM loss on neutral text);
* **separate**: per strength ``actedit fit --strength S`` (the activation store is shared, so each
  fit after the first reuses it: the cheapest way to run them separately), then ``actedit eval`` on
  the eval split (``--no-analyses``) and on the test split (its analyses give the KL).

Every point's MC1/MC2 must be equal on both sides (printed). Usage::

    python benchmarks/bench_sweep.py [--data ../shared/data/truthfulqa] [--strengths 0.5,1,2,4,8]
                                     [--limit 100] [--out runs/bench_sweep]

Prints a table with the machine and versions and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402
from _env import machine_info, versions  # noqa: E402  (benchmarks/_env.py)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa"
SETTINGS = {"layers": 0.4, "multiplier": 1.0, "position_policy": "answer"}


def actedit(*args: str) -> float:
    """Run ``actedit ARGS`` in a fresh process (as a user does); returns its wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "actedit.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"actedit {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument(
        "--strengths", default="0.5,2,4,8", help="CAA multipliers beside the row's own 1 (N = their count + 1)"
    )
    parser.add_argument("--limit", type=int, default=100, help="questions of each split scored (eval has 41)")
    parser.add_argument("--out", default="runs/bench_sweep")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    strengths = [float(x) for x in args.strengths.split(",")]
    if 1.0 in strengths:  # the row's own multiplier is the sweep's default point: keep N points on both sides
        raise SystemExit("--strengths must not hold 1 (the row's own multiplier, the sweep's default point).")
    common = {"model": "smollm2-135m-instruct", "dtype": "float32", "data": {"name": "truthfulqa", "source": args.data}}

    study = {
        **common,
        "out": str(out / "sweep"),
        "methods": {"caa": {"settings": SETTINGS}},
        "compose": "none",
        "eval": {"limit": args.limit, "task_options": {"mc2_rule": "split"}},
        "sweep": {"methods": {"caa": {"strength": strengths}}, "choose": {"metric": "mc2"}},
    }
    (out / "sweep.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    seconds = {"sweep": actedit("sweep", str(out / "sweep.yaml"), "--quiet")}
    summary = json.loads((out / "sweep" / "sweep.json").read_text())
    points = {p["settings"]["multiplier"]: p for p in summary["rows"]["caa"]["points"]}

    fit = {
        **{k: v for k, v in common.items() if k != "dtype"},  # actedit fit and eval load the model in float32
        "method": "caa",
        "collect": {"dir": str(out / "separate" / "activations")},
        "settings": {k: v for k, v in SETTINGS.items() if k != "multiplier"},  # --strength gives it
    }
    (out / "fit.yaml").write_text(yaml.safe_dump(fit, sort_keys=False))
    separate = 0.0
    equal = []
    for strength in [1.0, *strengths]:
        where = out / "separate" / f"m{strength:g}"
        separate += actedit("fit", str(out / "fit.yaml"), "--strength", str(strength), "--out", str(where / "artifact"))
        scores = {}
        for split, extra in (("eval", ["--no-analyses"]), ("test", [])):
            separate += actedit(
                "eval",
                "--model",
                "smollm2-135m-instruct",
                "--data",
                args.data,
                "--split",
                split,
                "--limit",
                str(args.limit),
                "--intervention",
                str(where / "artifact"),
                "--no-record",
                "--out",
                str(where / split),
                *extra,
            )
            scores[split] = json.loads((where / split / "results.json").read_text())["edited"]["metrics"]
        swept = points[strength]["scores"]
        equal.append(all(abs(scores[s][m] - swept[s][m]) < 1e-6 for s in scores for m in scores[s]))
    seconds["separate"] = separate
    report = {
        "machine": machine_info(),
        "versions": versions("torch", "transformers", "pyvene", "actedit"),
        "points": len(points),
        "limit": args.limit,
        "n_questions": summary["n_questions"],
        "seconds": seconds,
        "ratio": seconds["separate"] / seconds["sweep"],
        "scores_equal": all(equal),
    }
    info = report["machine"]
    print(
        f"machine : {info['cpu']}, {info['cores']} cores, flags {' '.join(info.get('cpu_flags', []))}; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    )
    print(
        f"points  : CAA at multipliers 1 (the row's own), {', '.join(f'{s:g}' for s in strengths)}; questions "
        + ", ".join(f"{k} {v}" for k, v in summary["n_questions"].items())
        + "; float32"
    )
    print()
    print("| run | seconds |")
    print("|---|---|")
    print(f"| `actedit sweep` ({len(points)} points) | {seconds['sweep']:.1f} |")
    print(f"| {len(points)} × (`actedit fit` + 2 × `actedit eval`), shared store | {seconds['separate']:.1f} |")
    print(f"| ratio | {report['ratio']:.1f}× |")
    print()
    print(f"scores equal on both sides (every point, both splits, to 1e-6): {report['scores_equal']}")
    (out / "bench_sweep.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
