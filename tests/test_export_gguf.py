"""llama.cpp control vectors: CAA edits written as a control-vector GGUF read back (by the gguf
library) as what llama.cpp expects, imported back into an equal CAA edit; refusals; and, where
llama-cpp-python is installed (optional: ``pip install 'actedit[llamacpp]'``), llama.cpp itself
applying the exported file to the embedded SmolLM2 GGUF changes the next-token logits as the pyvene
edit does, and a file placed one block off does not."""

import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from test_export_hf import REAL, edited_logits, iti_config
from transformers import AutoModelForCausalLM

from actedit.cli import main as cli_main
from actedit.export.gguf import export_gguf, import_gguf, read_control_vectors, write_control_vectors
from actedit.export.hf import ExportError
from actedit.interventions import build_caa_config, compose, intervenable, load_artifact, save_artifact
from conftest import save_tiny_chat_model, tiny_model


def caa_edit(model, layers=(1, 2), policy="all"):
    g = torch.Generator().manual_seed(9)
    d = model.config.hidden_size
    configs = [
        build_caa_config(model, {layer: torch.randn(d, generator=g)}, multiplier=1.5, position_policy=policy)
        for layer in layers
    ]
    return intervenable(model, compose(*configs) if len(configs) > 1 else configs[0])


def test_export_writes_what_llama_cpp_reads_and_import_gives_the_same_edit(tmp_path, capsys):
    model = tiny_model("llama")
    pvm = caa_edit(model)
    artifact = save_artifact(pvm, tmp_path / "artifact")
    out = export_gguf(artifact, model, tmp_path / "cv.gguf")
    reader = GGUFReader(out)  # the gguf library's own reading
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    assert [(t.name, t.tensor_type.name, list(t.shape)) for t in reader.tensors] == [
        ("direction.1", "F32", [32]),
        ("direction.2", "F32", [32]),
    ]
    for module, layer in zip(pvm.interventions.values(), (1, 2), strict=True):
        module = module[0] if isinstance(module, tuple) else module
        expected = (module.multiplier * module.vector).numpy()
        np.testing.assert_allclose(np.asarray(reader.tensors[layer - 1].data), expected, rtol=0, atol=1e-6)
    imported = import_gguf(out, model, tmp_path / "imported")
    torch.testing.assert_close(edited_logits(load_artifact(imported, model))[REAL], edited_logits(pvm)[REAL])


def test_cli_export_and_import_round_trip(tmp_path, capsys):
    base = save_tiny_chat_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    pvm = caa_edit(model)
    artifact = save_artifact(pvm, tmp_path / "artifact")
    assert cli_main(["export", str(artifact), "--to", "gguf", str(tmp_path / "cv.gguf"), "--model", str(base)]) == 0
    assert cli_main(["import", str(tmp_path / "cv.gguf"), "--model", str(base), "--out", str(tmp_path / "back")]) == 0
    assert "blocks [1, 2]" in capsys.readouterr().out
    torch.testing.assert_close(edited_logits(load_artifact(tmp_path / "back", model))[REAL], edited_logits(pvm)[REAL])


def test_refusals_name_the_reason(tmp_path):
    model = tiny_model("llama")
    cases = {
        "block 0": caa_edit(model, layers=(0,)),
        "inside the block": intervenable(model, iti_config(model, layers=(2,))),
        "policy 'answer'": caa_edit(model, layers=(1,), policy="answer"),
    }
    for reason, pvm in cases.items():
        artifact = save_artifact(pvm, tmp_path / reason.replace(" ", "_").replace("'", ""))
        with pytest.raises(ExportError, match=reason):
            export_gguf(artifact, model, tmp_path / "cv.gguf")
    with pytest.raises(ExportError, match=r"is a \.gguf file"):
        export_gguf(save_artifact(caa_edit(model), tmp_path / "ok"), model, tmp_path / "cv.bin")
    with pytest.raises(ExportError, match="direction.0"):
        write_control_vectors(tmp_path / "zero.gguf", {0: torch.ones(32)}, "llama")


def test_import_checks_the_file_against_the_model(tmp_path):
    model = tiny_model("llama")
    write_control_vectors(tmp_path / "wide.gguf", {1: torch.ones(64)}, "llama")
    with pytest.raises(ValueError, match="64 values; the model's width is 32"):
        import_gguf(tmp_path / "wide.gguf", model, tmp_path / "a")
    write_control_vectors(tmp_path / "deep.gguf", {7: torch.ones(32)}, "llama")
    with pytest.raises(ValueError, match="beyond the model's 3 blocks"):
        import_gguf(tmp_path / "deep.gguf", model, tmp_path / "b")
    write_control_vectors(tmp_path / "qwen.gguf", {1: torch.ones(32)}, "qwen2")
    with pytest.raises(ValueError, match="made for a qwen2 model"):
        import_gguf(tmp_path / "qwen.gguf", model, tmp_path / "c")
    writer = GGUFWriter(str(tmp_path / "model.gguf"), "llama")  # a model file, not a control vector
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not a llama.cpp control vector"):
        read_control_vectors(tmp_path / "model.gguf")
    with pytest.raises(FileNotFoundError):
        read_control_vectors(tmp_path / "missing.gguf")


# ---------------------------------------------------------------- llama.cpp itself (optional)
def _llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(
            "llama-cpp-python is not installed: the optional extra actedit[llamacpp] (builds llama.cpp from "
            "source, about 7 minutes) runs this check against llama.cpp itself"
        )
    import llama_cpp  # lazy: optional, heavy

    return llama_cpp


def _next_token_logits(llama_cpp, llm, ids, vectors=None):
    """llama.cpp's logits after ``ids``, with ``vectors`` (block → vector) applied as a control
    vector through llama_set_adapter_cvec (data from block 1 on), or none."""
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
    ctx = llm.ctx
    apply = getattr(llama_cpp, "llama_set_adapter_cvec", None) or llama_cpp.llama_apply_adapter_cvec
    if vectors:
        data = np.zeros((n_layer, n_embd), dtype=np.float32)
        for layer, vector in vectors.items():
            data[layer - 1] = vector.numpy()
        flat = np.ascontiguousarray(data.reshape(-1))
        pointer = flat.ctypes.data_as(llama_cpp.ctypes.POINTER(llama_cpp.ctypes.c_float))
        assert apply(ctx, pointer, flat.size, n_embd, 1, n_layer) == 0
    else:
        assert apply(ctx, None, 0, n_embd, -1, -1) == 0
    llm.reset()
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[len(ids) - 1]), dtype=torch.float64)


def test_llama_cpp_applies_the_exported_file_as_the_pyvene_edit(tmp_path):
    llama_cpp = _llama_cpp()
    from actedit.data.models import load_model, resolve_alias

    model, tokenizer = load_model("smollm2-135m-instruct")
    layer, g = 12, torch.Generator().manual_seed(11)
    vector = torch.randn(model.config.hidden_size, generator=g)
    vector *= 20.0 / vector.norm()  # a clear change of the logits beside the engines' own differences
    pvm = intervenable(model, build_caa_config(model, {layer: vector}, multiplier=1.0, position_policy="all"))
    ids = tokenizer("Q: What happens if you crack your knuckles a lot?\nA:").input_ids
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits[0, -1].double()
        edited = pvm({"input_ids": torch.tensor([ids])}, unit_locations=None)[1].logits[0, -1].double()
    exported = export_gguf(save_artifact(pvm, tmp_path / "artifact"), model, tmp_path / "cv.gguf")
    vectors = read_control_vectors(exported)["vectors"]
    assert sorted(vectors) == [layer]

    llm = llama_cpp.Llama(
        model_path=str(resolve_alias("smollm2-135m-instruct")), n_ctx=256, logits_all=True, verbose=False
    )
    try:
        base = _next_token_logits(llama_cpp, llm, ids)
        steered = _next_token_logits(llama_cpp, llm, ids, vectors)
        off_by_one = [_next_token_logits(llama_cpp, llm, ids, {at: vectors[layer]}) for at in (layer - 1, layer + 1)]
    finally:
        llm.close()

    def agreement(delta):
        """(cosine, relative error) of a change of llama.cpp's logits against the pyvene edit's."""
        ours = edited - plain
        cosine = float(torch.nn.functional.cosine_similarity(delta, ours, dim=0))
        return cosine, float((delta - ours).norm() / ours.norm())

    assert float((base - plain).abs().max()) < ENGINE_TOLERANCE  # same weights, llama.cpp's own kernels

    def matches(cosine, error):
        return cosine > 0.99 and error < 0.15

    cosine, error = agreement(steered - base)
    assert matches(cosine, error), (cosine, error)
    for logits in off_by_one:  # the same vector one block earlier or later fails the same check
        cosine_off, error_off = agreement(logits - base)
        assert not matches(cosine_off, error_off) and error_off > 2 * error, (error, cosine_off, error_off)


ENGINE_TOLERANCE = 1.0
"""Largest next-token logit difference accepted between llama.cpp and transformers on the same
Q4_1 weights (llama.cpp quantises the activations to 8 bits in its Q4_1 matrix products;
transformers multiplies the de-quantised weights in fp32)."""
