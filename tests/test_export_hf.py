"""Baked checkpoints: ITI and CAA (and their composition) written into biases reload with stock
transformers in a fresh process, with neither actedit nor pyvene imported, and give the pyvene
edit's logits; what no bias reproduces is refused with its reason."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import actedit.interventions as ai
from actedit.cli import main as cli_main
from actedit.export.hf import ExportError, bake_biases, baked_model, export_hf
from actedit.interventions import build_caa_config, build_iti_config, compose, intervenable, save_artifact
from actedit.interventions.compat import head_dim
from actedit.interventions.edits import interventions_of
from conftest import STOCK_RELOAD_INPUTS, every_method_edit, run_fresh_python, save_tiny_chat_model, tiny_model

_FRESH_CHILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(**inputs).logits
torch.save(logits, sys.argv[3])
print(json.dumps({"foreign": sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("actedit", "pyvene")}),
                  "config": {k: getattr(model.config, k, None) for k in ("attention_bias", "mlp_bias")}}))
"""


def fresh_logits(checkpoint, tmp_path):
    """Logits of ``checkpoint`` on STOCK_RELOAD_INPUTS in a fresh process that imports only torch
    and transformers; also what that process imported and the flags it read."""
    torch.save(STOCK_RELOAD_INPUTS, tmp_path / "inputs.pt")
    child = run_fresh_python(
        _FRESH_CHILD, str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"), cwd=tmp_path
    )
    return torch.load(tmp_path / "out.pt"), child


def iti_config(model, policy="all", layers=(0, 2)):
    g = torch.Generator().manual_seed(3)
    heads, hd = int(model.config.num_attention_heads), int(head_dim(model.config))
    spec = {
        layer: {
            "directions": torch.nn.functional.normalize(torch.randn(heads, hd, generator=g), dim=-1),
            "sigmas": torch.rand(heads, generator=g) + 0.5,
            "heads": [0, heads - 1],
        }
        for layer in layers
    }
    return build_iti_config(model, spec, alpha=4.0, position_policy=policy)


def caa_config(model, policy="all", layer=1):
    g = torch.Generator().manual_seed(4)
    vector = torch.randn(model.config.hidden_size, generator=g)
    return build_caa_config(model, {layer: vector}, multiplier=1.5, position_policy=policy)


REAL = STOCK_RELOAD_INPUTS["attention_mask"].bool()
"""The real tokens of the inputs: an edit acts on real tokens only, a bias on padding too (whose
logits nothing reads)."""


def edited_logits(pvm):
    with torch.no_grad():
        return pvm(dict(STOCK_RELOAD_INPUTS), unit_locations=None)[1].logits


@pytest.mark.parametrize("edit", ["iti", "caa", "both"])
def test_baked_checkpoint_reloads_with_stock_transformers_and_matches_the_edit(edit, tmp_path):
    model = tiny_model("llama")
    configs = {"iti": [iti_config(model)], "caa": [caa_config(model)], "both": [iti_config(model), caa_config(model)]}
    pvm = intervenable(model, compose(*configs[edit]) if edit == "both" else configs[edit][0])
    expected = edited_logits(pvm)
    with torch.no_grad():
        plain = model(**STOCK_RELOAD_INPUTS).logits
    assert (expected - plain)[REAL].abs().max() > 1e-2  # the edit changes the logits
    artifact = save_artifact(pvm, tmp_path / "artifact")
    out = export_hf(artifact, tiny_model("llama"), tmp_path / "baked")
    logits, child = fresh_logits(out, tmp_path)
    assert child["foreign"] == []  # neither actedit nor pyvene in the serving process
    assert child["config"] == {"attention_bias": edit != "caa", "mlp_bias": edit != "iti"}
    torch.testing.assert_close(logits[REAL], expected[REAL], rtol=0, atol=2e-5)
    record = json.loads((out / "actedit_export.json").read_text())
    assert {e["method"] for e in record["edits"]} == {"iti", "caa"} if edit == "both" else {edit}
    assert "actedit" in (out / "README.md").read_text() and not list(tmp_path.glob(".baked.*"))


def test_every_implied_bias_is_written_and_zero_except_the_baked_ones():
    model = tiny_model("llama")
    pvm = intervenable(model, compose(iti_config(model, layers=(2,)), caa_config(model, layer=1)))
    new, baked = baked_model(pvm)
    assert sorted(baked.biases) == [(1, "down_proj"), (2, "o_proj")]
    biases = {name: p for name, p in new.named_parameters() if name.endswith(".bias")}
    for layer in range(3):
        for path in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            part = "self_attn" if path.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            bias = biases.pop(f"model.layers.{layer}.{part}.{path}.bias")
            baked_here = (layer, path) in baked.biases
            assert bool(bias.abs().max() > 0) == baked_here, (layer, path)
    assert biases == {}
    # the biases are the formulas: W_o·δ (ITI) and m·v (CAA)
    iti_module = next(m for m in interventions_of(pvm) if isinstance(m, ai.ITIIntervention))
    w_o = model.model.layers[2].self_attn.o_proj.weight.double()
    torch.testing.assert_close(baked.biases[(2, "o_proj")], w_o @ iti_module.shift().double())
    caa_module = next(m for m in interventions_of(pvm) if isinstance(m, ai.CAAIntervention))
    torch.testing.assert_close(baked.biases[(1, "down_proj")], 1.5 * caa_module.vector.double())
    for name, p in model.named_parameters():  # the source model is left as it was
        torch.testing.assert_close(new.get_parameter(name), p)


@pytest.mark.parametrize("name", ["hpr", "sea", "actadd", "diff", "composed"])
def test_edits_no_bias_reproduces_are_refused_with_the_reason(name):
    model = tiny_model("llama")
    config = every_method_edit(model)[name]
    pvm = intervenable(model, config)
    reasons = {"hpr": "angle network", "sea": "norm", "actadd": "first positions", "diff": "network"}
    with pytest.raises(ExportError, match="cannot bake into weights the .* edit") as info:
        bake_biases(pvm)
    for method, reason in reasons.items():  # the composition: every method that cannot, with its reason
        assert (f"the {method} edit" in str(info.value) and reason in str(info.value)) == (name in (method, "composed"))


def test_policies_other_than_all_are_refused_or_baked_at_every_position_on_request(tmp_path):
    model = tiny_model("llama")
    pvm = intervenable(model, iti_config(model, policy="answer"))
    with pytest.raises(ExportError, match="policy 'answer'.*every_position=True"):
        bake_biases(pvm)
    new, baked = baked_model(pvm, every_position=True)
    assert baked.edits[0]["policy"] == "answer"
    everywhere = intervenable(tiny_model("llama"), iti_config(model, policy="all"))
    with torch.no_grad():
        torch.testing.assert_close(
            new(**STOCK_RELOAD_INPUTS).logits[REAL], edited_logits(everywhere)[REAL], rtol=0, atol=2e-5
        )


def test_gemma3_takes_iti_in_its_o_proj_bias_and_refuses_caa(tmp_path):
    """Gemma-3 normalises o_proj's output before the residual add: ITI's W_o·δ is still exact there
    (it shifts o_proj's input), CAA's residual shift has no slot (no mlp_bias)."""
    model = tiny_model("gemma3")
    pvm = intervenable(model, iti_config(model))
    expected = edited_logits(pvm)
    artifact = save_artifact(pvm, tmp_path / "artifact")
    out = export_hf(artifact, tiny_model("gemma3"), tmp_path / "baked")
    logits, child = fresh_logits(out, tmp_path)
    assert child["foreign"] == [] and child["config"] == {"attention_bias": True, "mlp_bias": None}
    torch.testing.assert_close(logits[REAL], expected[REAL], rtol=0, atol=2e-5)
    with pytest.raises(ExportError, match="needs a down_proj bias, which gemma3_text models do not have"):
        bake_biases(intervenable(model, caa_config(model)))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_families_without_a_slot_are_refused_by_name(family):
    model = tiny_model(family)
    with pytest.raises(ExportError, match=f"{family}.*supported families: gemma3_text, llama"):
        bake_biases(intervenable(model, caa_config(model)))


def test_switched_off_modules_are_skipped_and_an_edit_without_any_is_refused():
    model = tiny_model("llama")
    config = caa_config(model)
    pvm = intervenable(model, compose(config, copy.deepcopy(caa_config(model, layer=2))))
    modules = interventions_of(pvm)
    modules[1].set_enabled(False)
    assert [e["layer"] for e in bake_biases(pvm).edits] == [1]
    modules[0].set_enabled(False)
    with pytest.raises(ExportError, match="no switched-on edit"):
        bake_biases(pvm)


def test_cli_export_writes_a_checkpoint_and_refuses_to_overwrite(tmp_path, capsys):
    base = save_tiny_chat_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    pvm = intervenable(model, caa_config(model))
    expected = edited_logits(pvm)
    artifact = save_artifact(pvm, tmp_path / "artifact")
    args = ["export", str(artifact), "--to", "hf", str(tmp_path / "baked"), "--model", str(base)]
    assert cli_main(args) == 0
    assert "baked 1 edit(s)" in capsys.readouterr().out
    logits, _ = fresh_logits(tmp_path / "baked", tmp_path)
    torch.testing.assert_close(logits[REAL], expected[REAL], rtol=0, atol=2e-5)
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "baked").get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()
    )
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_hf(artifact, model, tmp_path / "baked")
    assert cli_main(args) == 1 and "exists" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite"]) == 0


def test_sites_sums_and_biases_the_model_already_has(tmp_path):
    """CAA at mlp_output, two CAA edits of one layer summed, ITI added to an o_proj bias the model
    already has (which stays as it was in the source model); an edit at a site no slot takes is
    refused."""
    model = tiny_model("llama", attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.normal_()
    source_bias = model.model.layers[2].self_attn.o_proj.bias.clone()
    g = torch.Generator().manual_seed(5)
    d = model.config.hidden_size
    twice = [build_caa_config(model, {1: torch.randn(d, generator=g)}, position_policy="all") for _ in range(2)]
    at_mlp = build_caa_config(model, {0: torch.randn(d, generator=g)}, position_policy="all", component="mlp_output")
    pvm = intervenable(model, compose(*twice, at_mlp, iti_config(model, layers=(2,))))
    new, baked = baked_model(pvm)
    assert sorted(baked.biases) == [(0, "down_proj"), (1, "down_proj"), (2, "o_proj")]
    with torch.no_grad():
        torch.testing.assert_close(new(**STOCK_RELOAD_INPUTS).logits[REAL], edited_logits(pvm)[REAL], rtol=0, atol=2e-5)
    torch.testing.assert_close(model.model.layers[2].self_attn.o_proj.bias, source_bias, rtol=0, atol=0)
    assert baked.flags == ("attention_bias", "mlp_bias")
    vector = torch.randn(d, generator=g)
    wrong_site = build_caa_config(model, {1: vector}, position_policy="all", component="attention_output")
    with pytest.raises(ExportError, match="only an addition to block_output or mlp_output"):
        bake_biases(intervenable(model, wrong_site))


def test_from_position_zero_counts_as_every_position():
    model = tiny_model("llama")
    config = build_caa_config(model, {1: torch.ones(model.config.hidden_size)}, position_policy="from_position")
    assert [e["policy"] for e in bake_biases(intervenable(model, config)).edits] == ["from_position"]
    late = build_caa_config(
        model, {1: torch.ones(model.config.hidden_size)}, position_policy="from_position", position_start=2
    )
    with pytest.raises(ExportError, match="from_position"):
        bake_biases(intervenable(model, late))


def test_checkpoint_keeps_dtype_tied_embeddings_generation_config_and_permissions(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True).to(torch.bfloat16)
    model.tie_weights()
    model.generation_config.eos_token_id = [2, 5]
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.3
    pvm = intervenable(model, caa_config(model))
    artifact = save_artifact(pvm, tmp_path / "artifact")
    out = export_hf(artifact, model, tmp_path / "baked")
    stored = load_file(out / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}  # written in the model's dtype
    assert "lm_head.weight" not in stored  # tied: stored once
    # transformers 4.x loads in fp32 unless told (5.x: the checkpoint's dtype); bf16 values either way
    reloaded = AutoModelForCausalLM.from_pretrained(out).to(torch.bfloat16)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert reloaded.generation_config.eos_token_id == [2, 5] and reloaded.generation_config.temperature == 0.3
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # shared like any directory, not 0700
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**STOCK_RELOAD_INPUTS).logits[REAL].float(),
            edited_logits(pvm)[REAL].float(),
            rtol=0,
            atol=0.1,  # bf16: the bias is rounded once, the edit's sum h + m·v at every token
        )


def test_overwrite_replaces_only_an_earlier_export(tmp_path):
    model = tiny_model("llama")
    artifact = save_artifact(intervenable(model, caa_config(model)), tmp_path / "artifact")
    out = export_hf(artifact, model, tmp_path / "baked")
    (out / "stale.txt").write_text("from an earlier export")
    export_hf(artifact, model, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "actedit_export.json").is_file()
    for precious in (artifact, tmp_path / "notes"):
        precious.mkdir(exist_ok=True)
        (precious / "keep.txt").write_text("mine")
        with pytest.raises(FileExistsError, match="not an earlier export"):
            export_hf(artifact, model, precious, overwrite=True)
        assert (precious / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
