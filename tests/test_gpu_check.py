"""The GPU check (``scripts/gpu_check.sh``) runs on a GPU only where one is lent; here its script runs
on the CPU with a tiny model, so that it keeps working between GPU runs: every step, the CPU
reload with equal tensors, the composition and the device-map case (layers on disk)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import require_truthfulqa

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_on_a_cpu(tmp_path):
    data = require_truthfulqa()
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu_check.py"),
        *("--device", "cpu", "--dtype", "float32", "--shape", "tiny", "--data", str(data)),
        *("--train-questions", "6", "--test-questions", "4", "--new-tokens", "2", "--repeats", "1"),
        *("--methods", "caa,iti", "--out", str(tmp_path)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"base", "caa", "iti", "composed"}
    for name in ("caa", "iti", "composed"):
        assert rows[name]["tensors_equal"] and rows[name]["cpu_vs_gpu_max_abs"] == 0.0  # one device: exact
        assert rows[name]["gen_b1"] > 0 and rows[name]["gen_b8"] > 0
    spread = report["device_map"]
    assert spread["intervention_devices"] == ["cpu"] and spread["logits_equal"], spread
    assert "| composed |" in done.stdout
