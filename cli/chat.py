"""``actedit chat``: chat with an edited model, re-selecting its edited layers live
(:class:`actedit.eval.chat.ChatSession`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, TextIO

from actedit.data.generate import GenerationSettings
from actedit.data.models import load_model
from actedit.eval.chat import ChatSession, describe_layers
from actedit.interventions.artifacts import resolve_artifact, verify_artifact
from actedit.interventions.base import ActEditIntervention

from .options import add_device_options, add_model_option, placement_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``actedit chat``."""
    parser.add_argument(
        "--intervention",
        "-i",
        required=True,
        metavar="DIR",
        help="artifact directory (or Hub repo id owner/name) saved by actedit / pyvene",
    )
    add_model_option(parser)
    parser.add_argument("--max-new-tokens", type=int, default=100, help="new tokens per answer (default 100)")
    parser.add_argument(
        "--layers",
        default=None,
        help="layers edited at start: those the artifact switched on (default), 'all' (every layer it holds, "
        "including the trained layers an artifact with keep_layers: all saved switched off), 'none' or e.g. '13,14,15'",
    )
    parser.add_argument(
        "--position-policy",
        default=None,
        help="override every intervention's position policy (e.g. 'last' as the HPR demo, 'all')",
    )
    parser.add_argument("--system", default=None, help="system prompt (chat template only)")
    parser.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")
    add_device_options(parser)


def run(args, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None) -> int:
    """``actedit chat``: load the model and the artifact, then run a session on stdin/stdout."""
    stdout = stdout or sys.stdout
    directory = resolve_artifact(args.intervention)
    info = verify_artifact(directory)
    spec = args.model or (info.get("base_model") or {}).get("name_or_path")
    if not spec:
        raise ValueError("the artifact does not record its base model; pass --model.")
    stdout.write(f"-----> Loading {spec}\n")
    stdout.flush()
    model, tokenizer = load_model(spec, **placement_of(args))
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        batch_size=1,
        system_prompt=args.system,
        use_chat_template=False if args.no_chat_template else None,
    )
    session = ChatSession.from_artifact(directory, model, tokenizer, settings=settings, layers=args.layers)
    if args.position_policy is not None:
        for items in session.edits.values():
            for _, module in items:
                if isinstance(module, ActEditIntervention):
                    module.set_position_policy(args.position_policy)
    methods = sorted({e.get("method", "?") for e in info.get("edits", [])})
    stdout.write(
        f"-----> Edit: {', '.join(methods) or '?'} at layers {describe_layers(session.available_layers)}; "
        f"targeting layers: {session.describe()}. Type '### help' for commands.\n"
    )
    return session.run(stdin, stdout)


__all__ = ["add_arguments", "run"]
