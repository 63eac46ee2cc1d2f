"""llama.cpp control vectors: additive residual edits as a GGUF file, and such files back as
CAA artifacts (``actedit export --to gguf``, ``actedit import``).

The format (llama.cpp ``common/common.cpp`` and ``src/llama-adapter.cpp``; repeng and EasySteer
write the same): a GGUF file with ``general.architecture = "controlvector"``,
``controlvector.model_hint`` (the model type; repeng and EasySteer require it) and
``controlvector.layer_count``, and one float32 1-D tensor ``direction.N`` per block N, added to the
output of 0-based block N (transformers' ``model.layers[N]``) at every position. llama.cpp hands
the vectors to the model from block 1 on: a ``direction.0`` makes the whole file invalid, so an
edit of block 0's output cannot be a control vector.

What qualifies is an edit that shifts a block's output by a constant at every position: an edit
whose bake (:attr:`~actedit.interventions.registry.MethodSpec.bake`) is a residual ``down_proj``
bias, the block's last term (CAA at ``block_output`` or ``mlp_output``). ITI's shift lands after
the attention, before the MLP reads the residual stream, so it is not a block-output shift;
HPR, SEA, Diff and ActAdd have no bake at all. Import reads every ``direction.N`` into one CAA
artifact (multiplier 1, policy ``all``, as llama.cpp applies it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
from gguf import GGUFReader, GGUFWriter

from actedit.interventions.artifacts import load_artifact, save_artifact
from actedit.interventions.caa import build_caa_config
from actedit.interventions.edits import intervenable
from actedit.interventions.files import write_atomic

from .hf import ExportError, bake_biases, check_file_out

ARCHITECTURE = "controlvector"


def control_vectors(pvm: Any, *, every_position: bool = False) -> Dict[int, torch.Tensor]:
    """Block index → the float32 vector added to that block's output, for the edits of ``pvm``."""
    baked = bake_biases(pvm, every_position=every_position)
    vectors: Dict[int, torch.Tensor] = {}
    for (layer, slot), bias in sorted(baked.biases.items()):
        if slot != "down_proj":
            methods = sorted({e["method"] for e in baked.edits if e["layer"] == layer and slot in e["slots"]})
            raise ExportError(
                f"the {', '.join(methods)} edit at layer {layer} adds to the {slot} output, inside the block "
                "(the MLP reads it): a control vector shifts a block's output, which that is not."
            )
        if layer == 0:
            raise ExportError(
                "the edit shifts block 0's output, but llama.cpp applies control vectors from block 1 on "
                "(a direction.0 makes the whole file invalid); edit a later layer."
            )
        vectors[layer] = bias.to(torch.float32)
    return vectors


def write_control_vectors(path: Union[str, Path], vectors: Dict[int, torch.Tensor], model_hint: str) -> Path:
    """Write ``vectors`` (block → vector) as a llama.cpp control-vector GGUF file, atomically."""
    path = Path(path)
    if not vectors:
        raise ExportError("no control vectors to write.")
    if min(vectors) < 1:
        raise ExportError(f"control vectors start at block 1 (llama.cpp rejects direction.0); got {sorted(vectors)}.")

    with tempfile.TemporaryDirectory() as scratch:  # GGUFWriter writes to a path; the file then lands atomically
        written = Path(scratch) / path.name
        writer = GGUFWriter(str(written), ARCHITECTURE)
        writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
        writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vectors))
        for layer, vector in sorted(vectors.items()):
            writer.add_tensor(f"direction.{layer}", vector.detach().cpu().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return write_atomic(path, written.read_bytes())


def read_control_vectors(path: Union[str, Path]) -> Dict[str, Any]:
    """``{"model_hint", "layer_count", "vectors": {block: float32 vector}}`` of a control-vector
    GGUF file (actedit's, repeng's, EasySteer's), with clear errors for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no control-vector file at {path}.")
    reader = GGUFReader(path)

    def field(name: str) -> Any:
        entry = reader.fields.get(name)
        return None if entry is None else entry.contents()

    arch = field("general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"{path} is not a llama.cpp control vector (general.architecture is {arch!r}).")
    vectors: Dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise ValueError(f"{path}: unexpected tensor {tensor.name!r} (a control vector holds direction.N).")
        layer = int(index)
        if layer == 0:
            raise ValueError(f"{path} holds direction.0, which llama.cpp rejects (vectors start at block 1).")
        data = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        vectors[layer] = torch.from_numpy(data.copy())
    if not vectors:
        raise ValueError(f"{path} holds no direction.N tensor.")
    return {
        "model_hint": field(f"{ARCHITECTURE}.model_hint"),
        "layer_count": field(f"{ARCHITECTURE}.layer_count"),
        "vectors": vectors,
    }


def export_gguf(
    artifact: Union[str, Path],
    model: Any,
    out: Union[str, Path],
    *,
    every_position: bool = False,
    overwrite: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """Write the artifact's block-output shifts as a llama.cpp control-vector file ``out``."""
    out = check_file_out(out, (".gguf",), "a llama.cpp control vector", overwrite)
    vectors = control_vectors(load_artifact(artifact, model), every_position=every_position)
    write_control_vectors(out, vectors, str(getattr(model.config, "model_type", "")))
    if progress is not None:
        progress(f"wrote control vectors for blocks {sorted(vectors)} (llama.cpp --control-vector): {out}")
    return out


def import_gguf(
    path: Union[str, Path],
    model: Any,
    out: Union[str, Path],
    *,
    overwrite: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> Path:
    """A control-vector file as a CAA artifact on ``model`` (multiplier 1, policy ``all``).

    The file's model hint is checked against the model's type, its vectors' width against the
    residual stream's and its blocks against the depth, each with an error naming both sides.
    """
    read = read_control_vectors(path)
    config = model.config
    hint, model_type = read["model_hint"], getattr(config, "model_type", None)
    if hint and model_type and hint != model_type:
        raise ValueError(f"{path} was made for a {hint} model (controlvector.model_hint), not this {model_type} model.")
    width, depth = int(config.hidden_size), int(config.num_hidden_layers)
    for layer, vector in read["vectors"].items():
        if vector.numel() != width:
            raise ValueError(f"{path}: direction.{layer} has {vector.numel()} values; the model's width is {width}.")
        if layer >= depth:
            raise ValueError(f"{path}: direction.{layer} is beyond the model's {depth} blocks.")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another directory or pass overwrite=True (CLI: --overwrite).")
    caa = build_caa_config(
        model,
        read["vectors"],
        multiplier=1.0,
        position_policy="all",
        metadata={"imported_from": {"file": str(path), "format": "llama.cpp control vector", "model_hint": hint}},
    )
    save_artifact(intervenable(model, caa), out)  # written whole or not at all
    if progress is not None:
        progress(f"imported control vectors for blocks {sorted(read['vectors'])} as a CAA artifact: {out}")
    return out


__all__ = [
    "ARCHITECTURE",
    "control_vectors",
    "export_gguf",
    "import_gguf",
    "read_control_vectors",
    "write_control_vectors",
]
