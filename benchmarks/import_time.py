"""What loading an edit costs at import: ``import actedit.interventions.<method>`` (what stock
``pyvene.IntervenableModel.load`` runs to rebuild an edit) in fresh processes.

Prints, per run, the seconds of the whole import and of actedit's own part (after torch,
transformers and pyvene are imported), and the actedit modules it loads; a table of medians.

    python benchmarks/import_time.py [--runs 5] [--method hpr] [--python PYTHON]

``--python`` measures another environment (e.g. an older checkout's venv) the same way, so that
two trees can be compared side by side on one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from _env import environment

CHILD = """
import json, sys, time
start = time.perf_counter()
import torch, transformers, pyvene
middle = time.perf_counter()
import actedit.interventions.{method}
end = time.perf_counter()
print(json.dumps({{"total": end - start, "actedit": end - middle,
                  "modules": sorted(m for m in sys.modules if m.startswith("actedit"))}}))
"""


def measure(python: str, method: str) -> dict:
    done = subprocess.run([python, "-c", CHILD.format(method=method)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--method", default="hpr")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the environment measured")
    args = parser.parse_args()
    runs = [measure(args.python, args.method) for _ in range(args.runs)]
    modules = runs[-1]["modules"]
    above_core = [m for m in modules if m.startswith("actedit.") and not m.startswith("actedit.interventions")]
    print(json.dumps(environment(), default=str))
    print(f"| import | median s ({args.runs} runs) |\n|---|---|")
    print(
        f"| whole (torch, transformers, pyvene, actedit.interventions.{args.method}) | "
        f"{statistics.median(r['total'] for r in runs):.2f} |"
    )
    print(f"| actedit's own part | {statistics.median(r['actedit'] for r in runs):.3f} |")
    print(f"actedit modules loaded: {len(modules)}; above the core: {above_core or 'none'}")


if __name__ == "__main__":
    main()
