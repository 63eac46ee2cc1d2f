"""Baked checkpoints (``actedit export --to hf``) against the pyvene edits they come from.

Fits ITI and CAA with the default study's settings (``configs/default.yaml``: ITI top-48 heads,
α = 15, answer policy; CAA at 0.4 of the depth, multiplier 1, answer policy) on HPR's TruthfulQA
train/eval split, bakes each into a checkpoint (a bias acts at every position, so
``every_position=True``), reloads the checkpoint with stock transformers, and scores on the test
questions (lm-eval's MC1/MC2 protocol, MC2 rule ``split`` as the study):

* the pyvene edit as made (answer policy: the choice's tokens only when scoring),
* the same edit at every position (policy ``all``), which is what a bias does,
* the baked checkpoint, which must equal the previous row to float rounding.

Usage::

    python benchmarks/bench_export.py [--data ../shared/data/truthfulqa] [--n-test 409] [--out runs/bench_export]

Prints a table with the machine and versions and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _env import machine_info, versions  # noqa: E402  (benchmarks/_env.py)
from transformers import AutoModelForCausalLM  # noqa: E402

import actedit  # noqa: E402
from actedit.data.truthfulqa import load_split, load_truthfulqa, select  # noqa: E402
from actedit.eval.mc import score_mc, score_mc_many  # noqa: E402
from actedit.export.hf import export_hf  # noqa: E402
from actedit.interventions import config_of, intervenable, save_artifact  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa"
FITS = {
    "iti": dict(top_heads=48, alpha=15.0),
    "caa": dict(layers=0.4, multiplier=1.0, position_policy="answer"),
}


def every_position(pvm):
    """A copy of ``pvm``'s edits with position policy ``all``, on the same base model."""
    config = copy.deepcopy(config_of(pvm))
    for rep in config.representations:
        rep.intervention.set_position_policy("all")
    return intervenable(pvm.model, config)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--n-test", type=int, default=409, help="test questions scored (default all 409)")
    parser.add_argument("--out", default="runs/bench_export")
    args = parser.parse_args(argv)
    out = Path(args.out)
    model, tokenizer = actedit.load_model("smollm2-135m-instruct")
    questions = load_truthfulqa(args.data)
    test = select(questions, "test", load_split(Path(args.data) / "hpr_ids_splits.json"))[: args.n_test]

    rows, timings, models = [], {}, {"base": model}
    baked = {}
    for method, settings in FITS.items():
        start = time.perf_counter()
        pvm = actedit.fit(method, model, tokenizer, "truthfulqa", source=args.data, progress=False, **settings)
        timings[f"{method} fit"] = time.perf_counter() - start
        artifact = save_artifact(pvm, out / "artifacts" / method)
        start = time.perf_counter()
        directory = export_hf(
            artifact, model, out / "baked" / method, tokenizer=tokenizer, every_position=True, overwrite=True
        )
        timings[f"{method} export"] = time.perf_counter() - start
        baked[method] = AutoModelForCausalLM.from_pretrained(directory).eval()
        policy = config_of(pvm).representations[0].intervention.policy.name.lower()
        models[f"{method} (pyvene, {policy} policy)"] = pvm
        models[f"{method} (pyvene, every position)"] = every_position(pvm)

    options = dict(progress=False, mc2_rule="split")
    start = time.perf_counter()
    results = score_mc_many(models, tokenizer, test, **options)
    for method, checkpoint in baked.items():
        results[f"{method} (baked checkpoint)"] = score_mc(checkpoint, tokenizer, test, **options)
    timings["scoring"] = time.perf_counter() - start

    prompt = tokenizer("Q: What happens if you crack your knuckles a lot?\nA:", return_tensors="pt")
    with torch.no_grad():
        for method, checkpoint in baked.items():
            applied = models[f"{method} (pyvene, every position)"](dict(prompt), unit_locations=None)[1].logits
            diff = float((checkpoint(**prompt).logits - applied).abs().max())
            results[f"{method} (baked checkpoint)"].protocol["max_logit_diff_vs_every_position"] = diff
    for name, result in results.items():
        rows.append(
            {
                "model": name,
                "mc1": result.metrics["mc1"],
                "mc2": result.metrics["mc2"],
                "mc1_stderr": result.stderr["mc1"],
                "mc2_stderr": result.stderr["mc2"],
                "max_logit_diff": result.protocol.get("max_logit_diff_vs_every_position"),
            }
        )
    report = {
        "machine": machine_info(),
        "versions": versions("torch", "transformers", "pyvene", "actedit"),
        "n_test": len(test),
        "dtype": str(next(model.parameters()).dtype),
        "rows": rows,
        "seconds": timings,
    }
    info = report["machine"]
    print(
        f"machine : {info['cpu']}, {info['cores']} cores; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    )
    print(f"test    : {len(test)} questions, {report['dtype']}, MC2 rule 'split'")
    print()
    print("| model | MC1 (%) | MC2 (%) | max abs logit diff vs every position |")
    print("|---|---|---|---|")
    for row in rows:
        diff = "" if row["max_logit_diff"] is None else f"{row['max_logit_diff']:.1e}"
        print(
            f"| {row['model']} | {100 * row['mc1']:.2f} ± {100 * row['mc1_stderr']:.2f} | "
            f"{100 * row['mc2']:.2f} ± {100 * row['mc2_stderr']:.2f} | {diff} |"
        )
    print()
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_export.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
