"""An edit as a steering file for lm-eval's own ``steered`` model (``--to lm-eval-steered``).

lm-eval (0.4.13) ships ``--model steered --model_args pretrained=...,steer_path=X.pt``: a ``.pt``
of ``{hookpoint: {"steering_vector", "steering_coefficient", "action": "add", "bias",
"head_index"}}``; each hookpoint names a module of ``model.base_model`` whose forward output gets
``steering_coefficient · steering_vector`` added at every position. That is exactly what a baked
bias does (:mod:`actedit.export.hf`), so the same edits qualify and each becomes the output of the
module its bias would live in: ITI's ``W_o·δ`` on ``layers.L.self_attn.o_proj`` (ITI shifts
o_proj's input; lm-eval's ``head_index`` would need a module whose output has a heads axis,
which Llama's attention does not have), CAA's ``m·v`` on ``layers.L.mlp.down_proj`` (the last
term added to the block's residual stream). Refusals are those of the bake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

from actedit.interventions.artifacts import load_artifact
from actedit.interventions.files import write_atomic

from .hf import ExportError, bake_biases, check_file_out


def steering_config(pvm: Any, *, every_position: bool = False) -> Dict[str, Dict[str, Any]]:
    """``{hookpoint: {...}}`` in lm-eval's ``steered`` format for the edits of ``pvm``."""
    baked = bake_biases(pvm, every_position=every_position)
    model = pvm.model
    names = {id(module): name for name, module in model.base_model.named_modules()}
    config: Dict[str, Dict[str, Any]] = {}
    for (layer, slot), bias in sorted(baked.biases.items()):
        module = baked.slot_module(model, layer, slot)
        if id(module) not in names:
            raise ExportError(f"the {slot} module of layer {layer} is not inside the model's base_model.")
        config[names[id(module)]] = {
            "steering_vector": bias.to(torch.float32).contiguous(),
            "steering_coefficient": 1.0,
            "action": "add",
            "bias": None,
            "head_index": None,
        }
    return config


def export_lm_eval_steered(
    artifact: Union[str, Path],
    model: Any,
    out: Union[str, Path],
    *,
    every_position: bool = False,
    overwrite: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write the artifact's edits as ``out`` (a ``.pt`` for lm-eval's ``steered`` model), atomically."""
    out = check_file_out(out, (".pt", ".pth"), "lm-eval's steering file", overwrite)
    config = steering_config(load_artifact(artifact, model), every_position=every_position)
    write_atomic(out, lambda handle: torch.save(config, handle))
    if progress is not None:
        progress(f"wrote {len(config)} steering hookpoint(s) for lm-eval's steered model: {out}")
    return out


__all__ = ["export_lm_eval_steered", "steering_config"]
