"""Options shared by several commands: ``--set key.sub=value`` overrides and flags that stand for
one config key each (commands that read a YAML config), ``--model`` (commands that load an artifact),
``--device``/``--device-map``/``--offload-folder`` (commands that load a model)."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Mapping

import yaml

from actedit.data.models import DEVICE_MAP_STRATEGIES, check_device_map


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


DEVICE_MAP_HELP = (
    f"spread the model over devices with accelerate instead of --device: {', '.join(DEVICE_MAP_STRATEGIES)} or a "
    "mapping of module names to devices, e.g. '{model.embed_tokens: 0, model.layers: cpu, lm_head: disk}' (YAML/JSON)"
)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default cpu), ``--device-map`` and ``--offload-folder``: where a command
    puts the model it loads (:func:`placement_of` turns them into ``load_model`` arguments)."""
    parser.add_argument("--device", default=None, help="torch device for the whole model (default cpu)")
    parser.add_argument(
        "--device-map", default=None, metavar="MAP", help=DEVICE_MAP_HELP + "; 'disk' needs --offload-folder"
    )
    parser.add_argument(
        "--offload-folder", default=None, metavar="DIR", help="with --device-map: where modules offloaded to disk go"
    )


def parse_device_map(text: Any) -> Any:
    """A ``--device-map`` value: a strategy name as is, a YAML/JSON mapping as a dict; None stays None."""
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)  # a strategy name is a YAML string: itself
    except yaml.YAMLError as exc:
        raise ValueError(f"--device-map {text!r} is neither a strategy nor a YAML/JSON mapping: {exc}") from exc


def placement_of(args: argparse.Namespace) -> Dict[str, Any]:
    """``load_model`` keyword arguments for :func:`add_device_options`'s flags (checked: a clear
    error for both --device and --device-map, a bad map or disk without a folder)."""
    device_map = parse_device_map(getattr(args, "device_map", None))
    device = getattr(args, "device", None)
    offload_folder = getattr(args, "offload_folder", None)
    check_device_map(device_map, device=device, offload_folder=offload_folder, where="--device-map")
    if device_map is None:
        return {"device": device}
    return {"device_map": device_map, "offload_folder": offload_folder}


def overrides_of(args: argparse.Namespace, flags: Mapping[str, str]) -> List[str]:
    """``args.overrides`` followed by ``KEY=VALUE`` for each flag of ``flags`` (flag → config key) given."""
    given = [(key, getattr(args, flag)) for flag, key in flags.items()]
    return list(args.overrides) + [f"{key}={value}" for key, value in given if value is not None]


__all__ = [
    "DEVICE_MAP_HELP",
    "add_device_options",
    "add_model_option",
    "add_set_option",
    "overrides_of",
    "parse_device_map",
    "placement_of",
]
