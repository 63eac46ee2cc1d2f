"""``actedit collect``, ``actedit fit`` and ``actedit train``: one method's steps from a YAML
config (:mod:`actedit.train.pipeline`)."""

from __future__ import annotations

import argparse

from actedit.eval.plots import plot_layer_selection
from actedit.interventions.registry import method_names
from actedit.train.pipeline import PipelineConfig, build, collect, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set collect.batch_size=8 (repeatable)")
    parser.add_argument("--model", default=None, help="override `model`")
    parser.add_argument("--method", default=None, help=f"override `method` ({', '.join(method_names())})")
    parser.add_argument("--data", default=None, help="override `data.source`")
    parser.add_argument("--out", default=None, help="override `out` (artifact directory)")


def _config_from_args(args) -> PipelineConfig:
    overrides = list(args.overrides)
    for flag, key in (("model", "model"), ("method", "method"), ("data", "data.source"), ("out", "out")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


def run_collect(args) -> int:
    store = collect(_config_from_args(args))
    print(f"activations in {store.path}")
    return 0


def _run_build(args, trained: bool) -> int:
    cfg = _config_from_args(args)
    if cfg.spec.trained != trained:
        kind = "trained, not fitted: use `actedit train`" if cfg.spec.trained else \
            "closed-form, not trained: use `actedit fit`"
        raise ValueError(f"'{cfg.method}' is {kind}.")
    path, metadata = build(cfg)
    plot_layer_selection(metadata, path)
    print(f"artifact written to {path}")
    return 0


def run_fit(args) -> int:
    return _run_build(args, trained=False)


def run_train(args) -> int:
    return _run_build(args, trained=True)


__all__ = ["add_arguments", "run_collect", "run_fit", "run_train"]
