"""Each pyvene workaround in ``actedit.interventions.compat``, on a tiny model of the family it fixes."""

import json
import logging
import subprocess
import sys

import pytest
import pyvene as pv
import torch

import actedit.interventions as ai
from actedit.interventions import compat, load_artifact, save_artifact
from actedit.interventions.edits import site_width
from conftest import EDIT_NAMES, every_method_edit, tiny_model

INPUTS = {"input_ids": torch.tensor([[1, 5, 6, 7, 8]])}


def test_hidden_states_survive_pyvene_calls(llama):
    """pyvene removes every hook of the model; under transformers 5 that breaks output_hidden_states."""
    before = llama(**INPUTS, output_hidden_states=True).hidden_states
    assert len(before) == llama.config.num_hidden_layers + 1
    pvm = ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(32)}))
    pvm(dict(INPUTS))
    pvm.generate(dict(INPUTS), unit_locations=None, intervene_on_prompt=True, max_new_tokens=2, do_sample=False)
    after = llama(**INPUTS, output_hidden_states=True).hidden_states
    assert len(after) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_only_pyvene_hooks_are_removed(llama):
    seen = []
    handle = llama.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(1))
    pvm = ai.intervenable(llama, ai.build_caa_config(llama, {0: torch.ones(32)}))
    pvm(dict(INPUTS))
    pvm(dict(INPUTS))
    assert len(seen) == 2  # the user's hook is still there
    pyvene_hooks = [
        h
        for m in llama.modules()
        for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
        if compat._is_pyvene_hook(h)
    ]
    assert pyvene_hooks == []  # and pyvene's own hooks are gone after the call
    handle.remove()


def test_qwen2_head_components_size_from_hidden_over_heads():
    model = tiny_model("qwen2")
    assert site_width(model, "head_attention_value_output") == 8
    config = pv.IntervenableConfig(
        representations=[
            {
                "layer": 1,
                "component": "head_attention_value_output",
                "unit": "h.pos",
                "intervention_type": pv.VanillaIntervention,
            }
        ]
    )
    pvm = pv.IntervenableModel(config, model)  # raised AttributeError (no head_dim) before the fix
    assert int(pvm.interventions[pvm.sorted_keys[0]].embed_dim) == 8


def test_llama_with_explicit_head_dim():
    model = tiny_model("llama_head_dim")  # 4 heads of 16 = 64 != hidden 32
    assert site_width(model, "attention_value_output") == 64
    assert site_width(model, "head_attention_value_output") == 16
    directions = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    config = ai.build_iti_config(model, {1: {"directions": directions, "heads": [2]}}, position_policy="all")
    pvm = ai.intervenable(model, config)
    _, out = pvm(dict(INPUTS))
    assert not torch.allclose(out.logits, model(**INPUTS).logits)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_families_missing_from_pyvene(family, tmp_path):
    model = tiny_model(family)
    compat.check_model_supported(model, "block_output")
    hpr = ai.build_hpr_config(model, [1])
    with torch.no_grad():
        for p in hpr.representations[0].intervention.parameters():
            p.normal_(std=0.3)
    heads = model.config.num_attention_heads
    head_dim = site_width(model, "attention_value_output") // heads
    iti = ai.build_iti_config(
        model,
        {0: {"directions": torch.nn.functional.normalize(torch.randn(heads, head_dim), dim=-1), "heads": [1]}},
        position_policy="all",
    )
    sea = ai.build_sea_config(model, {2: (torch.eye(32)[:, :3], torch.eye(32)[:, 3:5])})
    pvm = ai.intervenable(model, ai.compose(hpr, iti, sea))
    with torch.no_grad():
        _, out = pvm(dict(INPUTS))
    assert not torch.allclose(out.logits, model(**INPUTS).logits)
    path = save_artifact(pvm, tmp_path / family)
    reloaded = load_artifact(path, model)
    with torch.no_grad():
        _, again = reloaded(dict(INPUTS))
    assert torch.equal(again.logits, out.logits)


def test_saving_prints_nothing(llama, tmp_path, capsys):
    """pyvene's save announces the (temporary) directory on stdout; actedit silences it, and
    stock pyvene saves still create missing directories."""
    pvm = ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(site_width(llama, "block_output"))}))
    capsys.readouterr()
    save_artifact(pvm, tmp_path / "caa")
    pvm.save(str(tmp_path / "plain" / "nested"))
    assert capsys.readouterr().out == ""
    assert (tmp_path / "plain" / "nested").is_dir() and any((tmp_path / "plain" / "nested").iterdir())


def test_unsupported_model_class_message():
    class Unknown(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="register_model_family"):
        compat.check_model_supported(Unknown())


def test_cpu_map_location_sets_default(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"x": torch.ones(2)}, path)
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("map_location"))
        return original(*args, **kwargs)

    torch.load = spy
    try:
        with compat.cpu_map_location():
            torch.load(path)
        assert calls == ["cpu"]
    finally:
        torch.load = original
    assert torch.load is original


def test_apply_is_idempotent():
    before = pv.IntervenableModel.__init__
    compat.apply()
    compat._APPLIED = False
    compat.apply()
    assert pv.IntervenableModel.__init__ is before


# ------------------------------------------------------------------ lm_head on frozen bf16 weights
_FROZEN_HEAD_CHILD = r"""
import json, resource, sys
import torch, transformers as tf
import actedit.interventions as ai

torch.manual_seed(0)
torch.set_num_threads(1)
# Qwen2-0.5B's vocabulary on a narrow model: the bad path copies lm_head per row, 64 x 151936 x 64 x 2 B = 1.2 GB
batch, vocab, hidden = 64, 151936, 64
config = tf.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
model = tf.Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
pvm = ai.intervenable(model, ai.build_caa_config(model, {0: torch.zeros(hidden)}))  # freezes every weight
assert not any(p.requires_grad for p in model.parameters())
ids = torch.randint(3, vocab, (batch, 7))
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
kwargs = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)

def growth_mib(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024

edited = lambda: pvm.generate(dict(inputs), unit_locations=None, intervene_on_prompt=True, **kwargs)
print(json.dumps({
    "pyvene generate": growth_mib(edited),
    "model generate after wrapping": growth_mib(lambda: model.generate(**inputs, **kwargs)),
}))
"""


def test_frozen_bf16_lm_head_needs_no_copy_per_row(tmp_path):
    """pyvene freezes the weights; torch then runs lm_head on generate's last-position slice by
    expanding the weight over the batch (1.2 GB here, Qwen2's vocabulary). With the contiguous
    input the prompt pass of a batch of 64 stays within a few MiB, edited (pyvene's generate) or
    not (the wrapped model's own generate, as SEA's base completions run it); measured in a fresh
    process as ru_maxrss growth."""
    proc = subprocess.run([sys.executable, "-c", _FROZEN_HEAD_CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(mib < 200 for mib in growth.values()), growth


def test_lm_head_input_is_contiguous_after_wrapping(llama):
    seen = []
    ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(32)}))
    llama.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))  # runs after
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    with torch.no_grad():
        llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert seen and all(seen)
    compat.contiguous_head_input(llama)  # once: a second call adds no hook
    assert len(llama.lm_head._forward_pre_hooks) == 2


def test_preserved_model_state_gives_back_flags_and_modes(llama):
    llama.train()
    llama.model.embed_tokens.weight.requires_grad_(False)
    with compat.preserved_model_state(llama):
        pv.IntervenableModel(pv.IntervenableConfig([{"layer": 0, "component": "block_output"}]), llama)
        assert not any(p.requires_grad for p in llama.parameters()) and not llama.training
    assert llama.training and all(m.training for m in llama.modules())
    assert not llama.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in llama.named_parameters() if n != "model.embed_tokens.weight")


# --------------------------------------------------------------------------------- pyvene's logging
def test_pyvene_key_warning_only_for_stock_pyvene(llama, tmp_path, caplog):
    path = save_artifact(ai.intervenable(llama, ai.build_caa_config(llama, {1: torch.ones(32)})), tmp_path / "caa")
    message = "The key is provided in the config"
    with caplog.at_level(logging.WARNING):
        load_artifact(path, llama)
        ai.intervenable(llama, ai.config_of(load_artifact(path, llama)))
    assert message not in caplog.text
    with caplog.at_level(logging.WARNING):
        pv.IntervenableModel.load(str(path), llama)
    assert message in caplog.text  # a user calling pyvene directly still sees it


def test_gguf_load_options_ask_for_dequantised_weights():
    import transformers as tf

    options = compat.gguf_load_options()
    if hasattr(tf, "GgufConfig"):  # transformers 5.24+: packed weights are possible, ask for dense ones
        assert options["quantization_config"].dequantize is True
    else:  # 4.x always de-quantises
        assert options == {}


# ------------------------------------------------------------------- generation hooks (fast path)
def _generate_both_ways(pvm, batch, **kwargs):
    """Greedy generation with scores through actedit's direct hooks and through pyvene's own."""
    options = {"unit_locations": None, "intervene_on_prompt": True, "max_new_tokens": 4, "do_sample": False}
    options.update(output_scores=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    with torch.inference_mode():
        _, direct = pvm.generate(dict(batch), **options)
        with compat.pyvene_generation_hooks():
            _, reference = pvm.generate(dict(batch), **options)
    return direct, reference


@pytest.mark.parametrize("method", EDIT_NAMES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_direct_generation_hooks_equal_pyvene_hooks(llama, padded_batch, method, use_cache):
    """Every method and their composition, a left-padded batch, with and without KV cache: the
    same tokens and the same scores at every step as pyvene's hook callback: bit-identical where
    the frozen edit is the edit's own arithmetic, to float rounding where it is a fast path of its
    own (HPR's and SEA's, :meth:`frozen_edit`)."""
    pvm = ai.intervenable(llama, every_method_edit(llama)[method])
    direct, reference = _generate_both_ways(pvm, padded_batch, use_cache=use_cache)
    assert torch.equal(direct.sequences, reference.sequences)
    if method in ("hpr", "sea", "composed"):
        for a, b in zip(direct.scores, reference.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    else:
        assert all(torch.equal(a, b) for a, b in zip(direct.scores, reference.scores, strict=True))
    unedited = ai.intervenable(llama, ai.build_caa_config(llama, {0: torch.zeros(32)}))
    _, plain = _generate_both_ways(unedited, padded_batch)
    assert not all(torch.equal(a, b) for a, b in zip(direct.scores, plain.scores, strict=True)), "the edit did nothing"


def test_direct_generation_hooks_bypass_pyvene_and_leave_no_hook(llama, padded_batch, monkeypatch):
    pvm = ai.intervenable(llama, every_method_edit(llama)["composed"])
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in llama.modules())

    def refuse(*args, **kwargs):
        raise AssertionError("pyvene's hook callback was installed")

    monkeypatch.setattr(pvm, "_intervention_setter", refuse)
    pvm.generate(dict(padded_batch), unit_locations=None, intervene_on_prompt=True, max_new_tokens=2, pad_token_id=0)
    pvm.generate(dict(padded_batch), max_new_tokens=2, pad_token_id=0)  # policies decide by default
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in llama.modules()) == hooks_before
    with pytest.raises(AssertionError, match="hook callback"):  # explicit unit locations: pyvene's path
        pvm.generate(dict(padded_batch), unit_locations={"base": 0}, max_new_tokens=2, pad_token_id=0)


@pytest.mark.parametrize("method", ["hpr", "sea"])
def test_direct_generation_runs_the_frozen_edits(llama, padded_batch, method, monkeypatch):
    """Generation runs the fast paths (the reference :meth:`edit` is never called) and leaves
    every module thawed."""
    pvm = ai.intervenable(llama, every_method_edit(llama)[method])
    kind = type(next(iter(pvm.interventions.values())))

    def refuse(*args, **kwargs):
        raise AssertionError("the reference edit ran during generation")

    monkeypatch.setattr(kind, "edit", refuse)
    pvm.generate(dict(padded_batch), max_new_tokens=3, pad_token_id=0)
    assert all(module.__dict__.get("_frozen_plan") is None for module in pvm.interventions.values())
    with compat.pyvene_generation_hooks(), pytest.raises(AssertionError, match="reference edit"):
        pvm.generate(dict(padded_batch), max_new_tokens=3, pad_token_id=0)


def test_direct_generation_hooks_return_what_pyvene_returns(llama, padded_batch):
    pvm = ai.intervenable(llama, every_method_edit(llama)["caa"])
    options = {"unit_locations": None, "intervene_on_prompt": True, "max_new_tokens": 3, "pad_token_id": 0}
    with torch.inference_mode():
        direct = pvm.generate(dict(padded_batch), output_original_output=True, **options)
        with compat.pyvene_generation_hooks():
            reference = pvm.generate(dict(padded_batch), output_original_output=True, **options)
        unedited = llama.generate(**padded_batch, max_new_tokens=3, pad_token_id=0)
    assert torch.equal(direct[0], reference[0]) and torch.equal(direct[0], unedited)
    assert torch.equal(direct[1], reference[1])
