"""Memory of fits and training as the activation store grows: streamed (the default) vs in memory.

Usage:
  python benchmarks/bench_stream_memory.py [--sizes 20,160] [--methods hpr,iti,caa]
         [--data ../shared/data/truthfulqa] [--work ~/.cache/actedit/bench/stream] [--json OUT]

For each method and each size (TruthfulQA questions per split, train and eval; default 20 and
160: 40 and 201 questions, HPR's eval split holding 41) the method's activation store is
collected once with the embedded SmolLM2-135M-Instruct (``actedit collect``, float32, every layer
the method reads), then each fit or training runs in a child process of its own, twice: streamed
(``fit_inputs(stream=True)``; HPR/Diff ``train.stream: true``) and with every layer read into
memory first (the reference). The child does only that (no model is loaded; HPR trains 1 epoch,
top 5 layers). Memory: the child's peak RSS (``ru_maxrss``) and its peak anonymous memory
(``RssAnon`` sampled every 20 ms; RSS also counts the store pages a streamed read has mapped,
page cache that the kernel drops under pressure). The table gives the store size on disk, each
path's memory and time, and whether the two paths' fitted modules are equal bit for bit (SHA-256
of every tensor).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from _env import machine_info, versions  # benchmarks/_env.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def child(method: str, store_dir: str, stream: bool) -> None:
    """Fit or train ``method`` on the store; print the modules' digest as JSON."""
    import torch

    from actedit.data.store import ActivationStore
    from actedit.interventions.registry import FitContext, method_spec
    from actedit.train.pipeline import fit_inputs, method_settings
    from actedit.train.trainer import new_interventions, train_top_layers

    spec = method_spec(method)
    store = ActivationStore(store_dir)
    started = time.perf_counter()
    if spec.trained:
        settings, train = method_settings(method, {"top_layers": 5}, {"epochs": 1, "progress": False, "stream": stream})
        pairs = {s: store.paired_activations(spec.site, split=s, stream=stream) for s in ("train", "eval")}
        modules = new_interventions(spec, pairs["train"].width, store.layers, **settings.intervention_arguments())
        result, _ = train_top_layers(modules, pairs["train"], pairs["eval"], k=5, config=train)
        fitted = result.modules
    else:
        settings, _ = method_settings(method, {"layers": store.layers}, None)
        num_heads = store.heads(spec.site)[0] if method == "iti" else 1
        context = FitContext(width=store.width(spec.site), num_heads=num_heads)
        fitted = spec.fit(fit_inputs(store, spec, spec.site, store.layers, stream=stream), settings, context).modules
    digest = hashlib.sha256()
    for layer in sorted(fitted):
        for name, value in sorted(fitted[layer].state_dict().items()):
            digest.update(f"{layer}.{name}".encode())
            digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"digest": digest.hexdigest(), "seconds": time.perf_counter() - started, "peak_rss_mib": peak}))


def _sample_anonymous(pid: int, peak: List[int], stop: threading.Event) -> None:
    """Keep in ``peak[0]`` the largest RssAnon (KiB) of process ``pid`` seen every 20 ms."""
    while not stop.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]))
        stop.wait(0.02)


def measured(command) -> Dict[str, Any]:
    """Run ``command``; its last stdout line (JSON, with the child's own peak RSS) and its peak
    anonymous memory (sampled ``RssAnon``: what the process itself holds)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=_sample_anonymous, args=(proc.pid, peak, stop), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return {
        **json.loads(out.strip().splitlines()[-1]),
        "peak_anon_mib": round(peak[0] / 1024, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def collect(method: str, size: int, args) -> Path:
    directory = Path(args.work).expanduser() / f"{method}-{size}"
    if not (directory / "manifest.json").is_file() or not json.loads((directory / "manifest.json").read_text()).get(
        "complete"
    ):
        command = [
            str(Path(sys.executable).parent / "actedit"),
            "collect",
            "--method",
            method,
            "--data",
            str(Path(args.data).resolve()),
            "--set",
            f"data.limit={size}",
            "--set",
            f"collect.dir={directory}",
        ]
        if method in ("caa", "actadd"):
            command += ["--set", "settings.layers=all"]
        subprocess.run(command, check=True, env=dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1"))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20,160")
    parser.add_argument("--methods", default="hpr,iti,caa")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "truthfulqa"))
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "actedit" / "bench" / "stream"))
    parser.add_argument("--json", default="runs/bench_stream_memory.json")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "STORE", "STREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, store_dir, stream = args.child
        child(method, store_dir, stream == "1")
        return

    rows = []
    for method in args.methods.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            directory = collect(method, size, args)
            store_mib = sum(p.stat().st_size for p in directory.iterdir()) / 2**20
            cases = {
                label: measured([sys.executable, __file__, "--child", method, str(directory), flag])
                for label, flag in (("streamed", "1"), ("in memory", "0"))
            }
            row = {
                "method": method,
                "train_questions": size,
                "store_mib": round(store_mib, 1),
                **{f"{k}_{m}": v[m] for k, v in cases.items() for m in ("peak_rss_mib", "peak_anon_mib")},
                **{f"{k}_seconds": round(v["seconds"], 2) for k, v in cases.items()},
                "equal": cases["streamed"]["digest"] == cases["in memory"]["digest"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    env = {"machine": machine_info(), "versions": versions("torch", "numpy", "actedit")}
    print(f"\n# fit/train memory vs store size; {env['machine']['cpu']}; torch {env['versions']['torch']}")
    print(
        "| method | train questions | store MiB | streamed: peak RSS / anonymous MiB, s | "
        "in memory: peak RSS / anonymous MiB, s | equal |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            f"{r[k + '_peak_rss_mib']:.0f} / {r[k + '_peak_anon_mib']:.0f}, {r[k + '_seconds']:.1f}"
            for k in ("streamed", "in memory")
        ]
        print(f"| {r['method']} | {r['train_questions']} | {r['store_mib']:.0f} | {' | '.join(cells)} | {r['equal']} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
