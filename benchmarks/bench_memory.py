"""Peak resident memory of ``actedit run``: the default study and a 0.5B Qwen2-shaped model's study.

Usage:
  python benchmarks/bench_memory.py [--cases default,qwen2-0.5b] [--data ../shared/data/truthfulqa]
         [--checkout DIR] [--work DIR] [--json OUT]

Each case runs ``actedit run configs/default.yaml`` as a child process of this script (the
``actedit`` command and the config of ``--checkout``, default this checkout, so another
checkout's code can be measured the same way: ``--checkout /tmp/before``). Cases:

* ``default``: the embedded default study (SmolLM2-135M-Instruct, every method, all 409 test
  questions), nothing overridden;
* ``qwen2-0.5b``: the same study with ``model`` set to a model of Qwen2-0.5B's shape (24
  layers, hidden 896, 14 heads / 2 KV heads, MLP 4,864, vocabulary 151,936, tied embeddings;
  random weights, bf16, 494 M parameters) and SmolLM2's tokenizer, ``data.limit=40`` and
  ``eval.limit=20``: the run the memory issue was found on. The model is built once under
  ``--models`` (default ``~/.cache/actedit/bench``), outside the tree. Memory does not depend
  on the weights' values.

The peak of the whole run is the child's ``ru_maxrss`` (``os.wait4``), which works for any
checkout; the peak of each step comes from the run's ``results.json`` when its code records it
(``memory.peak_rss_mib``). Prints a table per case, the CPU flags and the versions, and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from _env import machine_info, versions  # benchmarks/_env.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]

QWEN2_05B_SHAPE = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
"""Qwen2-0.5B(-Instruct)'s published config, the fields that set its memory."""


def build_qwen2_shape(folder: Path) -> Path:
    """A random-weight model of Qwen2-0.5B's shape with SmolLM2's tokenizer (built once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers as tf

    from actedit.data.models import load_model

    _, tokenizer = load_model("smollm2-135m-instruct")
    torch.manual_seed(0)
    config = tf.Qwen2Config(
        **QWEN2_05B_SHAPE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = tf.Qwen2ForCausalLM(config).to(torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)
    return folder


def run_case(name: str, args, overrides: List[str]) -> Dict[str, Any]:
    checkout = Path(args.checkout).resolve()
    out = Path(args.work).resolve() / name
    command = [
        str(checkout / ".venv" / "bin" / "actedit"),
        "run",
        str(checkout / "configs" / "default.yaml"),
        "--data",
        str(Path(args.data).resolve()),
        "--out",
        str(out),
    ]
    for item in overrides:
        command += ["--set", item]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    log = out.parent / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(command, cwd=checkout, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"case {name} failed with exit code {code}; see {log}")
    results = json.loads((out / "results.json").read_text())
    memory = results.get("memory", {}).get("peak_rss_mib", {})
    return {
        "case": name,
        "overrides": overrides,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "seconds": round(seconds, 1),
        "step_peak_rss_mib": memory.get("steps", {}),
        "step_seconds": results.get("seconds", {}).get("steps", {}),
        "scores": {m: {k: v for k, v in r.items() if k in ("mc1", "mc2")} for m, r in results["methods"].items()},
        "log": str(log),
    }


def print_case(result: Dict[str, Any]) -> None:
    print(f"\n### {result['case']}  ({' '.join(result['overrides']) or 'no overrides'})")
    print(f"peak RSS of the run: {result['peak_rss_mib'] / 1024:.2f} GiB; {result['seconds']:.0f} s")
    peaks = result["step_peak_rss_mib"]
    if peaks:
        print("\n| step | seconds | peak RSS (GiB) |\n|---|---|---|")
        for step, mib in peaks.items():
            print(f"| {step} | {result['step_seconds'].get(step, float('nan')):.1f} | {mib / 1024:.2f} |")
    else:
        print("(this checkout records no per-step peaks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="default,qwen2-0.5b")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "truthfulqa"))
    parser.add_argument("--checkout", default=str(REPO), help="the checkout whose actedit and config run")
    parser.add_argument("--work", default="runs/bench_memory", help="output folder of the runs")
    parser.add_argument("--models", default=str(Path.home() / ".cache" / "actedit" / "bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    info = machine_info()
    print(f"CPU: {info.get('cpu')} | cores: {info.get('cores')} | flags: {', '.join(info.get('cpu_flags', []))}")
    print(f"versions: {versions('torch', 'transformers', 'pyvene')} | checkout: {args.checkout}")
    results = []
    for case in args.cases.split(","):
        if case == "default":
            overrides: List[str] = []
        elif case == "qwen2-0.5b":
            model = build_qwen2_shape(Path(args.models).expanduser() / "qwen2-0.5b-shape")
            overrides = [f"model={model}", "data.limit=40", "eval.limit=20"]
        else:
            raise SystemExit(f"unknown case {case!r}; known: default, qwen2-0.5b")
        result = run_case(case, args, overrides)
        print_case(result)
        results.append(result)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": info, "versions": versions("torch", "transformers", "pyvene"), "cases": results}, indent=1
            )
        )


if __name__ == "__main__":
    sys.exit(main())
