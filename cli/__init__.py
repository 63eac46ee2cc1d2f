"""The ``actedit`` command line.

Subcommands are registered with :func:`register` in :data:`COMMANDS` (name → (help,
add_arguments, run)); each ``run(args)`` returns an exit code. Errors that are the user's (bad paths, bad configs, wrong
models) are printed as one clear line, without a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import sys

# OpenMP's wait policy is left to the user. PASSIVE (idle threads sleep at once) protects a
# machine shared with other busy processes, where spinning threads waiting for a descheduled peer
# slowed torch down many times over; on a machine of its own it costs the study: collection 5-10%,
# generation ~10%, and twice the time per HPR training step (each of a step's ~100 small
# operations wakes the sleeping thread). Set OMP_WAIT_POLICY=PASSIVE before running on a shared
# machine (the HPR trainer then uses one thread).
from typing import Callable, Dict, Optional, Sequence, Tuple

COMMANDS: Dict[str, Tuple[str, Callable, Callable]] = {}


def register(name: str, help_text: str, add_arguments: Callable, run: Callable) -> None:
    """Add a subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` runs it."""
    COMMANDS[name] = (help_text, add_arguments, run)


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact directory")
    parser.add_argument("--json", action="store_true", help="print the raw metadata as JSON")


def run_info(args) -> int:
    from actedit.interventions.artifacts import resolve_artifact, verify_artifact

    info = verify_artifact(resolve_artifact(args.artifact))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    base = info.get("base_model") or {}
    print(f"base model: {base.get('name_or_path') or base.get('model_class')} "
          f"({base.get('model_type')}, hidden {base.get('hidden_size')}, {base.get('num_hidden_layers')} layers)")
    for edit in info.get("edits", []):
        print(f"- {edit['method']} at {edit['component']} layers {edit['layers']} {edit.get('hyperparameters', {})}")
    if info.get("metrics"):
        print("metrics:", json.dumps(info["metrics"]))
    print(f"actedit {info.get('actedit_version')} (format {info.get('format')})")
    return 0


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact directory")
    parser.add_argument("repo_id", help="Hub repo id, owner/name")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN / cached login)")


def run_push(args) -> int:
    from actedit.interventions.artifacts import push_to_hub

    print(push_to_hub(args.artifact, args.repo_id, private=args.private, token=args.token))
    return 0


register("info", "show what an artifact holds (methods, layers, base model, metrics)", _info_arguments, run_info)
register("push", "upload an artifact directory to the Hugging Face Hub", _push_arguments, run_push)


def _register_evaluation() -> None:
    from actedit.eval import chat, report, study

    register("run", "run a whole study from a YAML file: collect, fit/train every method, compose, evaluate, "
             "report (default: configs/default.yaml)", study.add_arguments, study.run)
    register("eval", "TruthfulQA MC1/MC2 of a model and an edit (lm-eval protocol), with analyses and plots",
             report.add_arguments, report.run)
    register("chat", "chat with an edited model; re-select edited layers live "
             "('### target layers: 13,14,15 / all / none')", chat.add_arguments, chat.run)


def _register_training() -> None:
    from actedit.train import pipeline

    register("collect", "collect the activations a method needs (sharded, resumable)", pipeline.add_arguments,
             pipeline.run_collect)
    register("fit", "fit a closed-form edit (CAA, ITI, SEA, ActAdd) and write its artifact", pipeline.add_arguments,
             pipeline.run_fit)
    register("train", "train HPR on collected activations, select layers, write the artifact",
             pipeline.add_arguments, pipeline.run_train)


_register_training()
_register_evaluation()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="actedit", description="Activation editing as pyvene interventions.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    run = COMMANDS[args.command][2]
    try:
        return int(run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as exc:
        if args.debug:
            raise
        print(f"actedit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
