"""Options shared by several commands: ``--set key.sub=value`` overrides and flags that stand for
one config key each (commands that read a YAML config), ``--model`` (commands that load an artifact)."""

from __future__ import annotations

import argparse
from typing import List, Mapping


def add_set_option(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable), collected in ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config entry, e.g. --set {example} (repeatable)",
    )


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model/-m SPEC`` for a command that loads an artifact: the base model to load it on
    (default None: the one the artifact records), in ``args.model``."""
    parser.add_argument(
        "--model",
        "-m",
        default=None,
        metavar="SPEC",
        help="base model: alias (e.g. smollm2-135m-instruct), .gguf file, directory or Hub id; "
        "default: the base model recorded in the artifact",
    )


def overrides_of(args: argparse.Namespace, flags: Mapping[str, str]) -> List[str]:
    """``args.overrides`` followed by ``KEY=VALUE`` for each flag of ``flags`` (flag → config key) given."""
    given = [(key, getattr(args, flag)) for flag, key in flags.items()]
    return list(args.overrides) + [f"{key}={value}" for key, value in given if value is not None]


__all__ = ["add_model_option", "add_set_option", "overrides_of"]
