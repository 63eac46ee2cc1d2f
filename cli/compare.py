"""``actedit compare``: completions of the base and the edited model side by side, and blind rating
(:mod:`actedit.eval.compare`; the ActAdd repository's ``print_n_comparisons`` and ``human_rating.py``).

    actedit compare ARTIFACT --prompt "I hate you because" -n 15 --blind rating/
    actedit compare --score-sheet rating/

The first samples ``-n`` completions per prompt from each model with ActAdd's settings
(temperature 1, top-p 0.3, raw prompt text), prints them in two columns and writes the report
as JSON (``--out``; default ``<artifact>_compare.json`` beside a local artifact, in the current
directory for a Hub id); ``--blind DIR`` also writes ``DIR/sheet.json`` (for the rater) and
``DIR/key.json`` (kept apart). The second reads the filled sheet and the key and prints the mean
rating of base and edited completions, per prompt and overall.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import List, Optional

from actedit.data.models import load_model
from actedit.eval.compare import (
    comparison_settings,
    describe_edits,
    sample_comparisons,
    score_blind_dir,
    write_blind,
)
from actedit.interventions.artifacts import load_artifact, resolve_artifact, verify_artifact
from actedit.interventions.files import write_json

from .options import add_device_options, add_model_option, placement_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``actedit compare``."""
    parser.add_argument(
        "artifact",
        nargs="?",
        default=None,
        metavar="ARTIFACT",
        help="artifact directory (or Hub repo id owner/name) saved by actedit / pyvene",
    )
    parser.add_argument(
        "--prompt",
        "-p",
        dest="prompts",
        action="append",
        default=[],
        metavar="TEXT",
        help="a prompt the models continue, e.g. 'I hate you because' (repeatable)",
    )
    parser.add_argument("--prompts-file", default=None, metavar="FILE", help="more prompts, one per line")
    parser.add_argument(
        "-n", "--num-comparisons", dest="n", type=int, default=15, help="samples per prompt and model (default 15)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (batch b of samples uses seed+b; default 0)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1, as ActAdd)")
    parser.add_argument("--top-p", type=float, default=0.3, help="nucleus sampling mass (default 0.3, as ActAdd)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="new tokens per completion (default 40)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per generate call (default 8)")
    add_model_option(parser)
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap each prompt as a user turn with the tokenizer's chat template (default: raw text continuation)",
    )
    parser.add_argument("--system", default=None, help="system prompt (with --chat-template only)")
    add_device_options(parser)
    parser.add_argument(
        "--width", type=int, default=None, help="width of the printed table (default: the terminal's, at most 160)"
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="JSON report (default: <artifact>_compare.json beside a local artifact, in the current directory "
        "for a Hub id); with --score-sheet: where to write the scores as JSON (default: none)",
    )
    parser.add_argument(
        "--blind",
        default=None,
        metavar="DIR",
        help="also write a blind rating sheet DIR/sheet.json (give it to the rater) and its key DIR/key.json",
    )
    parser.add_argument("--blind-seed", type=int, default=None, help="seed of the sheet's shuffle (default: --seed)")
    parser.add_argument(
        "--rating-question",
        default=None,
        help="what the rater rates, shown on the sheet (e.g. 'How happy is this completion?')",
    )
    parser.add_argument(
        "--score-sheet",
        default=None,
        metavar="DIR",
        help="instead of sampling: score the filled DIR/sheet.json with DIR/key.json (no ARTIFACT)",
    )


def read_prompts_file(path: str) -> List[str]:
    """The prompts of a text file, one per line (the line break removed, blank lines skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"No prompts file at {path!r}; give a text file with one prompt per line.")
    return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def default_out_path(artifact: str) -> Path:
    """``<artifact>_compare.json`` beside a local artifact; ``owner_name_compare.json`` in the current
    directory for a Hub id."""
    local = Path(artifact).expanduser()
    if local.exists():
        local = local.resolve()
        return local.parent / f"{local.name}_compare.json"
    return Path.cwd() / f"{artifact.strip('/').replace('/', '_')}_compare.json"


def _width(requested: Optional[int]) -> int:
    if requested is not None:
        return requested
    return max(60, min(160, shutil.get_terminal_size((100, 24)).columns))


def run_score(args) -> int:
    """``actedit compare --score-sheet DIR``: print (and with ``--out`` write) the unblinded mean ratings."""
    if args.artifact:
        raise ValueError("give either an ARTIFACT to sample from or --score-sheet DIR to score a sheet, not both.")
    scores = score_blind_dir(args.score_sheet)
    print(scores.table(), end="")
    if args.out:
        print(f"-> {write_json(args.out, scores.to_dict(), indent=2, ensure_ascii=False)}")
    return 0


def run(args) -> int:
    """``actedit compare``: sample, print the table, write the report (and the blind sheet and key)."""
    if args.score_sheet:
        return run_score(args)
    if not args.artifact:
        raise ValueError(
            "give an ARTIFACT (directory or Hub repo id) to compare, e.g. actedit compare runs/x/artifacts/caa "
            "--prompt 'I hate you because', or --score-sheet DIR to score a filled blind sheet."
        )
    prompts = list(args.prompts) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ValueError("give at least one --prompt 'I hate you because' or a --prompts-file FILE (one per line).")
    if args.n < 1:
        raise ValueError(f"-n must be at least 1 (samples per prompt and model), got {args.n}.")
    if args.system and not args.chat_template:
        raise ValueError("--system is a system turn of the chat template; add --chat-template or drop --system.")
    # checked before the model loads: a bad temperature or top-p fails at once
    settings = comparison_settings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        use_chat_template=args.chat_template,
        system_prompt=args.system,
    )
    width = _width(args.width)
    directory = resolve_artifact(args.artifact)
    info = verify_artifact(directory)
    spec = args.model or (info.get("base_model") or {}).get("name_or_path")
    if not spec:
        raise ValueError("the artifact does not record its base model; pass --model.")
    print(f"-----> Loading {spec}; edit: {describe_edits(info.get('edits', []))}", flush=True)
    model, tokenizer = load_model(spec, **placement_of(args))
    edited = load_artifact(directory, model)
    report = sample_comparisons(edited, tokenizer, prompts, args.n, settings, progress=True)
    print(report.table(width=width), end="")
    out = report.save(Path(args.out) if args.out else default_out_path(args.artifact))
    print(f"-> {out} ({len(prompts)} prompts x {args.n} samples per model, {report.seconds:.1f} s)")
    if args.blind:
        seed = args.seed if args.blind_seed is None else args.blind_seed
        sheet, key = write_blind(report, args.blind, seed, question=args.rating_question)
        print(f"-> blind rating sheet {sheet} (give it to the rater) and its key {key} (keep it apart)")
        print(f"   score the filled sheet with: actedit compare --score-sheet {Path(args.blind)}")
    return 0


__all__ = ["add_arguments", "default_out_path", "read_prompts_file", "run", "run_score"]
