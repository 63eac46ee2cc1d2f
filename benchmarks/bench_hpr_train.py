"""HPR training time: all layers vectorised in one pass vs a Python loop over layers, same data.

Usage:
  python benchmarks/bench_hpr_train.py --synthetic [--layers 30] [--d 576] [--pairs 2048] [--epochs 1]
         [--batch-size 16] [--threads N] [--modes vectorized,loop] [--json OUT]
  python benchmarks/bench_hpr_train.py --store DIR [--split train] [--pairs N] ...

Target workload (the issue): SmolLM2-135M-Instruct (hidden 576, 30 layers) on TruthfulQA's HPR
train split. Measured with the model's own tokenizer on the 367 train questions: 4,911
(true, false) response pairs, 59,674 aligned response-token pairs ("X. {choice}" responses,
positions up to the shorter response, end-of-turn tokens included, the collection default); the
eval split has 615 response pairs, 7,645 token pairs. Five epochs at batch 16 are 5 x 3,730 =
18,650 optimiser steps. The benchmark times ``--epochs`` over ``--pairs`` pairs (default 2,048: a
few minutes on 2 CPU cores) and extrapolates the full run from the time per step (the step cost
does not depend on N); with ``--store`` the full run is the store's own number of pairs.

``--synthetic`` draws pairs of that shape (per layer: a random content vector orthogonal to a
random direction u, the pair at ±margin along u, plus noise). ``--store DIR`` reads collected
activations with ``actedit.data.store.ActivationStore(DIR).paired_activations(split=...)``.

Both modes start from the same seeded modules and see the same batches; the table reports the
largest weight difference between them (float rounding only).

On a shared machine use ``--threads 1``: with torch's default (one thread per core) another busy
process stalls every parallel region, and steps get an order of magnitude slower.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from _env import machine_info, versions  # benchmarks/_env.py (the script's folder is on sys.path)

from actedit.data.store import ActivationStore, PairedActivations
from actedit.train.trainer import TrainSettings, new_interventions, train_interventions, train_top_layers

FULL_TRAIN_PAIRS = 59_674
FULL_EVAL_PAIRS = 7_645
FULL_EPOCHS = 5


def synthetic_pairs(
    layers: int, d: int, n: int, seed: int = 0, margin: float = 1.0, noise: float = 0.3
) -> PairedActivations:
    """Separable pairs of the target shape, float32."""
    g = torch.Generator().manual_seed(seed)
    pos, neg = {}, {}
    for layer in range(layers):
        u = F.normalize(torch.randn(d, generator=g), dim=0)
        c = torch.randn(n, d, generator=g)
        c -= (c @ u)[:, None] * u
        pos[layer] = c + margin * u + noise * torch.randn(n, d, generator=g)
        neg[layer] = c - margin * u + noise * torch.randn(n, d, generator=g)
    return PairedActivations(pos, neg, check_finite=False)


def store_pairs(directory: str, split: str, layers: Optional[int], max_pairs: Optional[int]):
    """Pairs from a collected activation store, optionally the first ``max_pairs`` of them, and
    the store's total number of pairs."""
    data = ActivationStore(directory).paired_activations(split=split)
    keep = data.layers if layers is None else data.layers[:layers]
    n = data.num_pairs if max_pairs is None else min(max_pairs, data.num_pairs)
    rows = torch.arange(n)
    pos_rows, neg_rows = data.rows(rows)
    index = torch.stack([pos_rows, neg_rows], 1)
    return PairedActivations(
        {k: data.positive[k] for k in keep}, {k: data.negative[k] for k in keep}, index=index, check_finite=False
    ), data.num_pairs


def run(
    data: PairedActivations, mode: str, epochs: int, batch_size: int, seed: int, device: Optional[str], k: int = 5
) -> dict:
    config = TrainSettings(
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        vectorize=(mode != "loop"),
        progress=False,
        select_best=(mode == "probe_first"),
        device=device,
    )
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    modules = new_interventions("hpr", data.width, data.layers, seed=seed)
    if mode == "probe_first":  # probes of all layers, then angle nets of the top k (selected on the train pairs)
        result, _ = train_top_layers(modules, data, data, k=k, config=config)
    else:
        result = train_interventions(modules, data, None, config=config)
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "seconds": seconds,
        "steps": result.steps,
        "ms_per_step": 1e3 * seconds / result.steps,
        "final_train_loss": result.history[-1].train_loss,
        "modules": result.modules,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--synthetic", action="store_true", help="synthetic pairs of the target shape (default)")
    source.add_argument("--store", default=None, help="directory of an ActivationStore")
    parser.add_argument("--split", default="train")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--pairs", type=int, default=2048, help="pairs to time on (capped at those available)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument(
        "--modes",
        default="vectorized,loop",
        help="vectorized (joint, all layers), loop (joint, per layer) and/or probe_first (top --k)",
    )
    parser.add_argument("--k", type=int, default=5, help="layers whose angle nets probe_first trains")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("vectorized", "loop", "probe_first") for m in modes):
        parser.error("--modes takes vectorized, loop and/or probe_first")
    if args.store:
        data, full_pairs = store_pairs(args.store, args.split, args.layers, args.pairs)
        source_name = f"store {args.store} ({args.split})"
    else:
        data = synthetic_pairs(args.layers, args.d, args.pairs, args.seed)
        source_name = "synthetic"
        full_pairs = FULL_TRAIN_PAIRS
    n_layers, d, n = len(data.layers), data.width, data.num_pairs
    full_steps = math.ceil(full_pairs / args.batch_size) * FULL_EPOCHS
    info_machine, info_versions = machine_info(), versions("torch", "numpy", "pyvene", "actedit")

    results = [run(data, mode, args.epochs, args.batch_size, args.seed, args.device, args.k) for mode in modes]
    by_mode = {r["mode"]: r for r in results}
    diff = None
    if {"vectorized", "loop"} <= set(by_mode):
        a, b = by_mode["vectorized"]["modules"], by_mode["loop"]["modules"]
        diff = max(
            float((pa - dict(b[layer].named_parameters())[name]).detach().abs().max())
            for layer in a
            for name, pa in a[layer].named_parameters()
        )
    ratio = (
        by_mode["loop"]["seconds"] / by_mode["vectorized"]["seconds"]
        if {"loop", "vectorized"} <= set(by_mode)
        else None
    )
    ratio_pf = (
        by_mode["vectorized"]["seconds"] / by_mode["probe_first"]["seconds"]
        if {"probe_first", "vectorized"} <= set(by_mode)
        else None
    )

    print(
        f"# HPR training, {source_name}: {n_layers} layers x d={d}, {n:,} pairs, {args.epochs} epoch(s), "
        f"batch {args.batch_size}, fp32, {args.device or 'cpu'}"
    )
    print(
        f"# machine: {info_machine['cpu']}, {info_machine['cores']} cores, {info_machine['memory_gib']} GiB, "
        f"torch threads {info_machine['torch_threads']}, load average {info_machine['load_average']}"
        + (f", GPU {info_machine['cuda']}" if info_machine["cuda"] else "")
    )
    print("# versions: " + ", ".join(f"{k} {v}" for k, v in info_versions.items()))
    print(
        f"| mode | steps | seconds | ms/step | est. full run ({full_pairs:,} pairs x {FULL_EPOCHS} epochs "
        f"= {full_steps:,} steps) |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        # scale by the training schedule's steps (probe_first runs two stages over the same schedule)
        est = r["seconds"] * full_steps / (math.ceil(n / args.batch_size) * args.epochs)
        r["estimated_full_run_seconds"] = est
        print(f"| {r['mode']} | {r['steps']:,} | {r['seconds']:.1f} | {r['ms_per_step']:.1f} | {est / 60:.1f} min |")
    if ratio is not None:
        print(f"speed-up vectorized over loop: {ratio:.2f}x; largest weight difference between modes: {diff:.2e}")
    if ratio_pf is not None:
        print(f"speed-up probe_first (angle nets of {args.k} layers) over joint vectorized training: {ratio_pf:.2f}x")
    out = {
        "source": source_name,
        "layers": n_layers,
        "d": d,
        "pairs": n,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": args.device or "cpu",
        "full_train_pairs": full_pairs,
        "full_eval_pairs": FULL_EVAL_PAIRS,
        "full_steps": full_steps,
        "machine": info_machine,
        "versions": info_versions,
        "ratio_loop_over_vectorized": ratio,
        "max_abs_weight_diff": diff,
        "ratio_vectorized_over_probe_first": ratio_pf,
        "results": [{k: v for k, v in r.items() if k != "modules"} for r in results],
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
