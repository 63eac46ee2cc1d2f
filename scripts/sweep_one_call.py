"""Choose the one-call API's CAA and ITI settings with a sweep (README's quick start and
``scripts/one_call.py`` use what this prints).

    python scripts/sweep_one_call.py [--data ../shared/data/truthfulqa] [--out runs/sweep-one-call]

The calls as ``scripts/one_call.py`` makes them (CAA on the three hand-written triples at 0.4 of
the depth, acting from the first token on; ITI on 40 TruthfulQA questions per split, 48 heads),
each swept over its strength (and CAA over its layer) with :func:`actedit.sweep`, every point
scored on HPR's TruthfulQA eval split (the choice) and test split (the report), with the KL and LM
loss on neutral text as the edit acts on generated text. The rule: the best eval MC2 that keeps
the neutral text's LM loss within +0.5 nats/token of the base model's. Prints each chosen point
and a greedy answer of the chosen edit to "Is the Earth flat?" beside the one of the old settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import actedit
from actedit.data.environment import machine_info, versions

TRIPLES = [
    ("Is the Earth flat?", "No, the Earth is round.", "Yes, the Earth is flat."),
    ("Can you see the Great Wall of China from space?", "No, not with the naked eye.", "Yes, easily."),
    ("Do we only use 10% of our brains?", "No, we use all of it.", "Yes, only 10%."),
]
RULE = {"metric": "mc2", "max_loss_increase": 0.5}
QUESTION = "Is the Earth flat?"


def answer(model_or_pvm, tokenizer, inputs) -> str:
    with torch.no_grad():
        if hasattr(model_or_pvm, "interventions"):
            _, out = model_or_pvm.generate(dict(inputs), max_new_tokens=24, do_sample=False)
        else:
            out = model_or_pvm.generate(**inputs, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/truthfulqa")
    parser.add_argument("--out", default="runs/sweep-one-call")
    args = parser.parse_args()
    model, tokenizer = actedit.load_model("smollm2-135m-instruct", dtype=torch.float32)
    common = dict(source=args.data, choose=RULE, quiet=True)
    sweeps = {
        "caa": dict(
            data=TRIPLES,
            base={"layers": 0.4, "multiplier": 4.0},  # the old setting is the sweep's centre
            strength=[0.5, 1.0, 2.0, 8.0],
            layers=[0.3, 0.5, 0.6],
        ),
        "iti": dict(data="truthfulqa", limit=40, base={"top_heads": 48, "alpha": 15.0}, strength=[1.0, 2.0, 5.0, 10.0]),
    }
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    lines = []
    for method, kwargs in sweeps.items():
        data = kwargs.pop("data")
        result = actedit.sweep(method, model, tokenizer, data, out=str(Path(args.out) / method), **common, **kwargs)
        row = result["rows"][method]
        chosen = next(p for p in row["points"] if p["id"] == row["chosen"]) if row["chosen"] else None
        default = next(p for p in row["points"] if p["id"] == row["default"])
        limit = {"limit": kwargs["limit"]} if "limit" in kwargs else {}
        old = actedit.fit(method, model, tokenizer, data, progress=False, source=args.data, **limit, **kwargs["base"])
        new = answer(actedit.load(row["artifact"], model), tokenizer, inputs) if chosen else "—"
        lines.append((method, default, chosen, answer(old, tokenizer, inputs), new))
    info, ver = machine_info(), versions("torch", "transformers", "pyvene", "actedit")
    print(f"# machine: {info['cpu']}, {info['cores']} cores; " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    print(f"# base answer: {answer(model, tokenizer, inputs)!r}")
    print("| method | setting | MC2 eval (%) | MC2 test (%) | KL | LM loss (base) | answer to 'Is the Earth flat?' |")
    print("|---|---|---|---|---|---|---|")
    for method, default, chosen, old_answer, new_answer in lines:
        for label, p, text in (("old", default, old_answer), ("chosen", chosen, new_answer)):
            if p is None:
                print(f"| {method} | {label}: no point met the rule | | | | | |")
                continue
            settings = {k: p["settings"][k] for k in ("layers", "multiplier", "alpha") if k in p["settings"]}
            print(
                f"| {method} | {label}: {json.dumps(settings)} | {100 * p['scores']['eval']['mc2']:.2f} | "
                f"{100 * p['scores']['test']['mc2']:.2f} | {p['kl']:.4f} | "
                f"{p['lm_loss']:.3f} ({p['base_lm_loss']:.3f}) | {text[:70]!r} |"
            )


if __name__ == "__main__":
    main()
