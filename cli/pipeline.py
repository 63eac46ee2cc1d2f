"""``actedit collect``, ``actedit fit`` and ``actedit train``: one method's steps from a YAML
config (:mod:`actedit.train.pipeline`).

Under a launcher (``torchrun``/``accelerate launch``, :mod:`actedit.data.distributed`) every
process loads the model (on its own GPU with CUDA) and collects its share of the store's shards;
``fit``/``train`` then fit or train on rank 0 alone (the others wait) and rank 0 writes the artifact."""

from __future__ import annotations

import argparse
from typing import Any, Tuple

from actedit.data.distributed import process_device, run_on_main, world
from actedit.data.models import load_model
from actedit.eval.effect import measure_effect
from actedit.eval.plots import plot_layer_selection
from actedit.interventions.registry import method_names
from actedit.train.pipeline import PipelineConfig, build, collect, load_config

from .options import add_set_option, overrides_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config (see configs/)")
    add_set_option(parser, "collect.batch_size=8")
    parser.add_argument("--model", default=None, help="override `model`")
    parser.add_argument("--method", default=None, help=f"override `method` ({', '.join(method_names())})")
    parser.add_argument("--data", default=None, help="override `data.source`")
    parser.add_argument("--out", default=None, help="override `out` (artifact directory)")
    parser.add_argument(
        "--strength",
        default=None,
        help="override the method's strength (settings.strength: HPR's and ITI's alpha, CAA's "
        "multiplier, ActAdd's coefficient)",
    )


def _config_from_args(args) -> PipelineConfig:
    flags = {"model": "model", "method": "method", "data": "data.source", "out": "out", "strength": "settings.strength"}
    return load_config(args.config, overrides_of(args, flags))


def _process_model(cfg: PipelineConfig) -> Tuple[Any, Any]:
    """``(model, tokenizer)`` on this process's GPU under a launcher with CUDA; ``(None, None)``
    otherwise (the pipeline loads the model where it always does)."""
    device = process_device()
    return load_model(cfg.model, device=device) if device is not None else (None, None)


def run_collect(args) -> int:
    cfg = _config_from_args(args)
    store = collect(cfg, *_process_model(cfg))
    if world().is_main:
        print(f"activations in {store.path}")
    return 0


def _build(cfg: PipelineConfig) -> int:
    def describe(pvm, tokenizer):
        return {"effect": measure_effect(pvm, tokenizer, name=cfg.method).to_dict()}

    model, tokenizer = _process_model(cfg)
    if world().distributed and cfg.collect.dir is not None:
        model, tokenizer = (model, tokenizer) if model is not None else load_model(cfg.model)
        collect(cfg, model, tokenizer)  # every rank its share; build() below finds the complete store

    def build_and_plot() -> None:
        path, metadata = build(cfg, model, tokenizer, describe=describe)
        plot_layer_selection(metadata, path)
        print(f"artifact written to {path}")

    run_on_main(build_and_plot)  # under a launcher: rank 0, the others wait (and get its error)
    return 0


def run_fit(args) -> int:
    """``actedit fit``: any method, in closed form or by training (a trained method's fit)."""
    return _build(_config_from_args(args))


def run_train(args) -> int:
    """``actedit train``: a trained method only (a closed-form one is refused, naming ``actedit fit``)."""
    cfg = _config_from_args(args)
    if not cfg.spec.trained:
        raise ValueError(f"'{cfg.method}' is closed-form, not trained: use `actedit fit`.")
    return _build(cfg)


__all__ = ["add_arguments", "run_collect", "run_fit", "run_train"]
