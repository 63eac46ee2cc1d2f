"""``actedit export``: an artifact for another engine: a checkpoint with the edit baked in
(``--to hf``), a steering file for lm-eval's ``steered`` model (``--to lm-eval-steered``) or
llama.cpp control vectors (``--to gguf``); ``actedit import``: control vectors back as an artifact."""

from __future__ import annotations

import argparse

import torch

from actedit.data.models import load_model
from actedit.export.gguf import export_gguf, import_gguf
from actedit.export.hf import check_out, export_hf
from actedit.export.lmeval import export_lm_eval_steered
from actedit.interventions.artifacts import resolve_artifact, verify_artifact

from .options import add_model_option

TARGETS = ("hf", "lm-eval-steered", "gguf")
"""What ``--to`` accepts."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact directory or Hub id")
    parser.add_argument(
        "--to",
        required=True,
        choices=TARGETS,
        help="hf: a Hugging Face checkpoint with the edit in its biases (ITI, CAA and their compositions); "
        "lm-eval-steered: a .pt for lm-eval's --model steered (the same edits); "
        "gguf: llama.cpp control vectors (CAA; edits that shift a block's output, block 1 on)",
    )
    parser.add_argument("out", help="hf: the directory to write (whole or not at all); lm-eval-steered: the .pt file")
    add_model_option(parser)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the written weights (default float32)",
    )
    parser.add_argument(
        "--every-position",
        action="store_true",
        help="bake an edit whose position policy is not 'all' at every position (a different edit)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it is an earlier export (or an empty directory)"
    )


def run(args) -> int:
    if args.to == "hf":
        check_out(args.out, args.overwrite)  # before minutes of loading
    directory = resolve_artifact(args.artifact)
    info = verify_artifact(directory)
    spec = args.model or (info.get("base_model") or {}).get("name_or_path")
    if not spec:
        raise ValueError("the artifact does not record its base model; pass --model.")
    model, tokenizer = load_model(spec, dtype=getattr(torch, args.dtype))
    if args.to in ("lm-eval-steered", "gguf"):
        write = export_lm_eval_steered if args.to == "lm-eval-steered" else export_gguf
        write(directory, model, args.out, every_position=args.every_position, overwrite=args.overwrite, progress=print)
        return 0
    export_hf(
        directory,
        model,
        args.out,
        tokenizer=tokenizer,
        every_position=args.every_position,
        overwrite=args.overwrite,
        progress=print,
    )
    return 0


def import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a llama.cpp control-vector .gguf (actedit's, repeng's, EasySteer's)")
    parser.add_argument("--model", "-m", required=True, metavar="SPEC", help="the base model the vectors are for")
    parser.add_argument("--out", required=True, help="the artifact directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run_import(args) -> int:
    model, _ = load_model(args.model)
    import_gguf(args.file, model, args.out, overwrite=args.overwrite, progress=print)
    return 0


__all__ = ["TARGETS", "add_arguments", "import_arguments", "run", "run_import"]
