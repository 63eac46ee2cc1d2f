"""The one-call API for every registered method on SmolLM2-135M-Instruct, as a user runs it.

    python scripts/one_call.py [--data ../shared/data/truthfulqa] [--limit 40] [--out /tmp/one-call]

For each method: ``actedit.fit(...)`` (the call is printed), ``actedit.save``, a reload with stock
``pyvene.IntervenableModel.load`` whose logits must equal the fitted model's, and a greedy answer
to one question. HPR, SEA and ITI learn from the first ``--limit`` TruthfulQA questions of each of
HPR's train and eval splits; CAA from three hand-written triples, ActAdd from one prompt pair.
Prints a table with the machine and versions.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyvene as pv
import torch

import actedit
from actedit.data.environment import machine_info, versions
from actedit.interventions.edits import config_of
from actedit.interventions.registry import methods

TRIPLES = [
    ("Is the Earth flat?", "No, the Earth is round.", "Yes, the Earth is flat."),
    ("Can you see the Great Wall of China from space?", "No, not with the naked eye.", "Yes, easily."),
    ("Do we only use 10% of our brains?", "No, we use all of it.", "Yes, only 10%."),
]
QUESTION = "What happens if you crack your knuckles a lot?"


def calls(data_dir: str, limit: int) -> dict:
    """Each registered method's call: (data shown, data, keyword arguments)."""
    task = dict(source=data_dir, limit=limit)
    return {
        "hpr": ("'truthfulqa'", "truthfulqa", dict(task, top_layers=5, train={"epochs": 1})),
        "diff": ("'truthfulqa'", "truthfulqa", dict(task, top_layers=5, train={"epochs": 1})),
        "sea": ("'truthfulqa'", "truthfulqa", dict(task, layers="1/3:")),
        # ITI's and CAA's strengths: what scripts/sweep_one_call.py chose on the eval split (README)
        "iti": ("'truthfulqa'", "truthfulqa", dict(task, top_heads=48, strength=2.0)),
        "caa": ("TRIPLES", TRIPLES, dict(layers=0.4, multiplier=0.5)),
        "actadd": ("[('Love', 'Hate')]", [("Love", "Hate")], dict(layers=6, coefficient=5.0)),
    }


def shown(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/truthfulqa")
    parser.add_argument("--limit", type=int, default=40, help="TruthfulQA questions per split")
    parser.add_argument("--out", default="/tmp/one-call")
    args = parser.parse_args()

    model, tokenizer = actedit.load_model("smollm2-135m-instruct")
    registry = calls(args.data, args.limit)
    missing = [s.name for s in methods() if s.name not in registry]
    if missing:
        raise SystemExit(f"no call written for registered method(s) {missing}; add them to calls().")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    rows = []
    for spec in methods():
        label, data, kwargs = registry[spec.name]
        print(f"pvm = actedit.fit({spec.name!r}, model, tokenizer, {label}, {shown(kwargs)})", flush=True)
        start = time.perf_counter()
        pvm = actedit.fit(spec.name, model, tokenizer, data, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        directory = actedit.save(pvm, Path(args.out) / spec.name)
        stock = pv.IntervenableModel.load(str(directory), model)
        with torch.no_grad():
            fitted = pvm(dict(inputs))[1].logits
            reloaded = stock(dict(inputs))[1].logits
        _, out = pvm.generate(dict(inputs), max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        layers = sorted({r["layer"] if isinstance(r, dict) else r.layer for r in config_of(pvm).representations})
        size = sum(f.stat().st_size for f in Path(directory).iterdir() if f.is_file()) / 2**20
        rows.append(
            (
                spec.name,
                seconds,
                layers,
                size,
                float((fitted - reloaded).abs().max()),
                answer.strip().replace("\n", " ")[:70],
            )
        )
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    base = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    info, ver = machine_info(), versions("torch", "transformers", "pyvene", "actedit")
    print(f"\n# machine: {info['cpu']}, {info['cores']} cores; " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    print(f"# question: {QUESTION!r}; base answer: {base.strip()[:70]!r}")
    print("| method | fit s | layers edited | artifact MiB | max |logit diff| after stock load | answer |")
    print("|---|---|---|---|---|---|")
    for name, seconds, layers, size, diff, answer in rows:
        span = f"{layers[0]}–{layers[-1]} ({len(layers)})" if len(layers) > 3 else ", ".join(map(str, layers))
        print(f"| {name} | {seconds:.1f} | {span} | {size:.2f} | {diff:.1e} | {answer!r} |")


if __name__ == "__main__":
    main()
