"""The one-call API for every registered method: fit from texts, save, stock pyvene load in a fresh
process (identical outputs), composition; and README's quick start run as written.

Every test loops over the method registry: a new method is covered by registering it.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

import actedit
from actedit.data.contrast import PromptPair
from actedit.data.formats import get_format
from actedit.data.store import ActivationStore, LayerActivations, StoredRows
from actedit.interventions.edits import interventions_of, site_width
from actedit.interventions.registry import FitContext, methods
from actedit.interventions.settings import UnknownSettingError
from actedit.train.pipeline import fit_inputs, method_settings
from conftest import STOCK_RELOAD_INPUTS as INPUTS
from conftest import assert_stock_reload, make_tokenizer, reference_outputs, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
TRIPLES = [(f"Is the sky blue number {i}?", f"Yes it is {i}.", f"No it is not {i}.") for i in range(10)]
PAIRS = [("Love", "Hate")]


def arguments(spec) -> dict:
    """What a call needs beyond the data, read from the spec: its kind of data, a layer where it
    has no default, and a short training for trained methods."""
    reads_pairs = get_format(spec.format).accepts is PromptPair
    kwargs = {"data": PAIRS if reads_pairs else TRIPLES, "progress": False}
    if spec.default_layers is None:
        kwargs["layers"] = [1]
    if spec.trained:
        kwargs.update(top_layers=2, train={"epochs": 1})
    return kwargs


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256)


@pytest.fixture(scope="module")
def edits(model, tokenizer):
    out = {}
    for spec in methods():
        kwargs = arguments(spec)
        data = kwargs.pop("data")
        out[spec.name] = actedit.fit(spec.name, model, tokenizer, data, **kwargs)
    return out


def test_every_method_fits_in_one_call(model, edits):
    with torch.no_grad():
        base = model(**INPUTS).logits
    for spec in methods():
        pvm = edits[spec.name]
        info = pvm.config.actedit
        assert info["edits"][0]["method"] == spec.name and info["edits"][0]["component"] == spec.site
        assert all(isinstance(m, spec.intervention) for m in interventions_of(pvm))
        with torch.no_grad():
            _, out = pvm(dict(INPUTS), unit_locations=None)
        assert not torch.allclose(out.logits, base), f"{spec.name}: the fitted edit changes nothing"
        if spec.default_layers is None:
            assert info["edits"][0]["layers"] == [1]
        if spec.trained:
            assert len(info["layer_selection"]["selected"]) == 2 and "training" in info


def test_one_call_settings_are_validated(model, tokenizer):
    for spec in methods():
        kwargs = arguments(spec)
        data = kwargs.pop("data")
        with pytest.raises(UnknownSettingError, match="not_a_setting"):
            actedit.fit(spec.name, model, tokenizer, data, not_a_setting=1, **kwargs)
    with pytest.raises(ValueError, match="unknown method"):
        actedit.fit("rome", model, tokenizer, TRIPLES)
    with pytest.raises(ValueError, match="unknown task 'truthfulqaa'"):
        actedit.fit("caa", model, tokenizer, "truthfulqaa", layers=[1])
    with pytest.raises(ValueError, match="triple"):
        actedit.fit("caa", model, tokenizer, [("only a prompt",)], layers=[1])


def test_the_store_can_be_a_resumable_directory(model, tokenizer, tmp_path, edits):
    pvm = actedit.fit("caa", model, tokenizer, TRIPLES, layers=[1], store=tmp_path / "acts", progress=False)
    assert (tmp_path / "acts" / "manifest.json").is_file()
    a = interventions_of(pvm)[0].vector
    b = interventions_of(edits["caa"])[0].vector
    assert torch.allclose(a, b, atol=1e-6)  # the same vector as from the in-memory store


def test_save_then_stock_pyvene_load_in_a_fresh_process_and_compose(model, edits, tmp_path):
    """Every method's artifact, and all of them composed, load with stock pyvene in a process
    that never imports actedit itself, and give the same logits and generations."""
    named = dict(edits)
    named["composed"] = actedit.compose(*edits.values())
    assert [e["method"] for e in named["composed"].config.actedit["edits"]] == [s.name for s in methods()]
    assert_stock_reload(model, named, tmp_path)
    # composing artifact directories gives the same model as composing the edits in memory
    again = actedit.compose(*[tmp_path / "artifacts" / s.name for s in methods()], model=model)
    assert torch.equal(reference_outputs(again)[0], reference_outputs(named["composed"])[0])


def quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs_as_written(tmp_path, tokenizer, monkeypatch):
    """The README's quick start, executed verbatim; only the model it loads is a tiny one here
    (nothing can be downloaded in tests)."""
    code = quick_start()
    assert "actedit.fit(" in code and "pv.IntervenableModel.load(" in code
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256)
    monkeypatch.setattr(actedit, "load_model", lambda spec, **kwargs: (model, tokenizer))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)  # noqa: S102 - the README's own code
    assert (tmp_path / "caa-edit" / "config.json").is_file()
    assert isinstance(namespace["answer"], str)
    effect = namespace["effect"]  # the quick start measures what its edit does
    assert [e.layer for e in effect.layers] == [
        int(layer) for layer in namespace["pvm"].config.actedit["edits"][0]["layers"]
    ]
    assert effect.max_relative_change > 0


def test_one_call_script_has_a_valid_call_for_every_method():
    """``scripts/one_call.py`` (the one-call API on the real model, run by hand) writes one call per
    registered method; each call's settings must pass the method's validation."""
    path = README.parent / "scripts" / "one_call.py"
    spec = importlib.util.spec_from_file_location("one_call", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = script.calls("data-dir", 4)
    assert set(calls) == {s.name for s in methods()}
    fit_keywords = {"source", "limit", "train"}
    for name, (_, _, kwargs) in calls.items():
        settings = {k: v for k, v in kwargs.items() if k not in fit_keywords}
        method_settings(name, settings, kwargs.get("train"))


@pytest.mark.parametrize("method", [s.name for s in methods() if s.trained])
def test_keep_layers_all_saves_every_trained_layer_switched_off_but_the_selected(method, model, tokenizer, tmp_path):
    kwargs = arguments(actedit.method_spec(method))
    data = kwargs.pop("data")
    top = actedit.fit(method, model, tokenizer, data, **kwargs)
    every = actedit.fit(method, model, tokenizer, data, keep_layers="all", **kwargs)
    record = every.config.actedit["edits"][0]
    selected = top.config.actedit["layer_selection"]["selected"]
    depth = model.config.num_hidden_layers
    assert record["layers"] == selected and sorted(record["layers"] + record["switched_off"]) == list(range(depth))
    # the selected layers edit exactly as the top-k artifact's (the other terms trained on every
    # layer do not change them); the rest are saved and do nothing until switched on
    ids = {"input_ids": torch.tensor([[1, 5, 6, 7, 8]])}
    assert torch.allclose(top(ids)[1].logits, every(ids)[1].logits, atol=1e-6)
    assert_stock_reload(model, {"every": every}, tmp_path)  # switched-off modules load switched off
    path = tmp_path / "artifacts" / "every"
    from actedit.eval.analysis import restrict_layers
    from actedit.eval.chat import ChatSession

    off = record["switched_off"][0]
    session = ChatSession.from_artifact(path, model, tokenizer)
    assert session.active == selected and session.available_layers == list(range(depth))
    session.select([off])
    assert session.active == [off] and all(m.is_enabled for m in interventions_of(session.pvm))
    alone = restrict_layers(actedit.load(path, model), [off])
    assert not torch.allclose(alone(ids)[1].logits, model(**ids).logits)


def test_one_call_fits_on_a_bigbench_task_by_name(model, tokenizer, tmp_path):
    """``actedit.fit(method, model, tokenizer, "seq", source=...)``: the task's train and eval
    questions become the method's contrast data with no other change."""
    import json

    folder = tmp_path / "simple_ethical_questions"
    folder.mkdir()
    examples = [
        {
            "input": f"Is the sky blue number {i}?",
            "target_scores": {"Yes it is": 1, "No it is not": 0, "Maybe": 0, "Never": 0},
        }
        for i in range(30)
    ]
    (folder / "task.json").write_text(json.dumps({"name": "simple_ethical_questions", "examples": examples}))
    pvm = actedit.fit("caa", model, tokenizer, "seq", source=str(folder), limit=4, layers=[1], progress=False)
    assert [type(i).__name__ for i in interventions_of(pvm)] == ["CAAIntervention"]
    with pytest.raises(FileNotFoundError, match="actedit fetch bigbench"):
        actedit.fit("caa", model, tokenizer, "bbq", source=str(tmp_path / "no_such.tar.gz"), layers=[1], progress=False)


@pytest.mark.parametrize("spec", [s for s in methods() if not s.trained], ids=lambda s: s.name)
def test_streamed_fits_equal_fits_in_memory(spec, model, tokenizer, tmp_path):
    """A closed-form fit reads its layers one at a time from the store's shards (the default) and
    gets exactly what it gets from every layer read into memory first."""
    kwargs = arguments(spec)
    data = kwargs.pop("data")
    actedit.fit(spec.name, model, tokenizer, data, store=tmp_path / "acts", **kwargs)
    store = ActivationStore(tmp_path / "acts")
    settings, _ = method_settings(spec.name, {"layers": kwargs.get("layers", store.layers)}, None)
    context = FitContext(width=site_width(model, spec.site), num_heads=int(model.config.num_attention_heads))
    fitted = {}
    for stream in (True, False):
        inputs = fit_inputs(store, spec, spec.site, settings.layers, stream=stream)
        maps = [m for v in inputs.values() for m in (v if isinstance(v, tuple) else (v,)) if isinstance(m, Mapping)]
        assert maps and all(isinstance(m, LayerActivations) == stream for m in maps)
        fitted[stream] = spec.fit(inputs, settings, context)
    streamed, in_memory = fitted[True], fitted[False]
    assert streamed.modules.keys() == in_memory.modules.keys() and streamed.record == in_memory.record
    for layer, module in streamed.modules.items():
        reference = in_memory.modules[layer].state_dict()
        for name, value in module.state_dict().items():
            assert torch.equal(value, reference[name]), f"{spec.name} layer {layer} {name}"


@pytest.mark.parametrize("spec", [s for s in methods() if s.trained], ids=lambda s: s.name)
def test_streamed_training_equals_training_in_memory(spec, model, tokenizer, tmp_path):
    """A trained method reads each batch's rows from the store's shards (``train.stream``, the
    default) and ends with exactly the weights of training on every layer read into memory."""
    kwargs = arguments(spec)
    data = kwargs.pop("data")
    trained = {}
    for stream in (True, False):
        options = dict(kwargs, train={**kwargs["train"], "stream": stream, "epochs": 2})
        trained[stream] = actedit.fit(spec.name, model, tokenizer, data, store=tmp_path / "acts", **options)
    streamed, in_memory = (interventions_of(trained[s]) for s in (True, False))
    assert len(streamed) == len(in_memory) == 2
    for a, b in zip(streamed, in_memory, strict=True):
        reference = b.state_dict()
        for name, value in a.state_dict().items():
            assert torch.equal(value, reference[name]), f"{spec.name} {name}"


def test_a_streamed_bank_reads_only_the_rows_asked_for(model, tokenizer, tmp_path):
    kwargs = arguments(next(s for s in methods() if s.name == "hpr"))
    actedit.fit("caa", model, tokenizer, kwargs["data"], layers=[0, 1], store=tmp_path / "acts", progress=False)
    store = ActivationStore(tmp_path / "acts")
    streamed = store.paired_activations("block_output", layers=[0, 1], stream=True)
    in_memory = store.paired_activations("block_output", layers=[0, 1])
    assert all(isinstance(streamed.positive[layer], StoredRows) for layer in (0, 1))
    idx = torch.tensor([3, 0, 3, len(in_memory.index) - 1])
    for a, b in zip(streamed.gather([0, 1], idx), in_memory.gather([0, 1], idx), strict=True):
        assert torch.equal(a, b)
    reads = []
    bank = streamed.positive[1]
    original = bank.take
    bank.take = lambda rows, dtype=None: reads.append(len(rows)) or original(rows, dtype)
    streamed.gather([1], idx)
    assert reads == [2 * len(idx)]  # one read of the batch's positive and negative rows
