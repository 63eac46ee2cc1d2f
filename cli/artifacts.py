"""``actedit info`` and ``actedit push``: what an artifact holds, and sharing it on the Hub."""

from __future__ import annotations

import argparse
import json

from actedit.interventions.artifacts import (
    effect_table,
    metrics_table,
    push_to_hub,
    resolve_artifact,
    verify_artifact,
)


def info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact directory")
    parser.add_argument("--json", action="store_true", help="print the raw metadata as JSON")


def run_info(args) -> int:
    info = verify_artifact(resolve_artifact(args.artifact))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    base = info.get("base_model") or {}
    print(
        f"base model: {base.get('name_or_path') or base.get('model_class')} "
        f"({base.get('model_type')}, hidden {base.get('hidden_size')}, {base.get('num_hidden_layers')} layers)"
    )
    for edit in info.get("edits", []):
        print(f"- {edit['method']} at {edit['component']} layers {edit['layers']} {edit.get('hyperparameters', {})}")
    if info.get("metrics"):
        print("scores recorded:")
        print(metrics_table(info))
    if info.get("effect"):
        print("effect when made (share of tokens acted on, relative change ‖h′−h‖/‖h‖):")
        print(effect_table(info["effect"]))
        for warning in info["effect"].get("warnings", []):
            print(f"warning: {warning}")
    print(f"actedit {info.get('actedit_version')} (format {info.get('format')})")
    return 0


def push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact directory")
    parser.add_argument("repo_id", help="Hub repo id, owner/name")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN / cached login)")


def run_push(args) -> int:
    print(push_to_hub(args.artifact, args.repo_id, private=args.private, token=args.token))
    return 0


__all__ = ["info_arguments", "push_arguments", "run_info", "run_push"]
