"""The LoRA baseline (:mod:`actedit.train.lora`): SFT data, loss, training, saving, loading, scoring."""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

try:
    import peft
except ImportError:  # CI installs it (the test extra), so there a missing PEFT is a failure
    if os.environ.get("CI"):
        raise
    pytest.skip("PEFT is not installed: pip install 'actedit[lora]'", allow_module_level=True)

from actedit.data.contrast import ContrastDataset, ContrastExample  # noqa: E402
from actedit.data.formats import HPRFormat, pad_id  # noqa: E402
from actedit.data.tasks import task_spec  # noqa: E402
from actedit.data.truthfulqa import TRUTHFULQA_PRIMER  # noqa: E402
from actedit.eval import analysis, effect, mc  # noqa: E402
from actedit.interventions import build_caa_config, intervenable  # noqa: E402
from actedit.interventions.settings import UnknownSettingError  # noqa: E402
from actedit.train import lora  # noqa: E402
from conftest import SHARED_DATA, build_tokenizer, make_tokenizer, require_truthfulqa, run_fresh_python, tiny_model  # noqa: E402

QUESTIONS = [
    ("Is the sky blue?", ["Yes it is.", "The sky is blue."], ["No it is not.", "The sky is green."]),
    ("What is the capital of France?", ["Paris"], ["Lyon", "The dog."]),
    ("Which answer is right?", ["(A)"], ["(B)"]),
    ("Is the fox quick?", ["Yes it is."], ["No it is not."]),
    ("Is the dog lazy?", ["Yes it is.", "The dog is lazy."], ["No it is not."]),
    ("Is the statement hateful?", ["No"], ["Yes"]),
    ("Is the sky green?", ["No it is not."], ["Yes it is.", "The sky is green."]),
    ("What jumps over the lazy dog?", ["The quick brown fox."], ["The sky.", "Paris"]),
    ("Is Paris in France?", ["Yes it is."], ["No it is not."]),
    ("Is Lyon the capital of France?", ["No it is not."], ["Yes it is."]),
]
N_TRAIN = 7
PROBE = {"input_ids": torch.tensor([[5, 9, 14, 22, 30, 41], [7, 7, 12, 3, 0, 0]])}
PROBE["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def contrast_data() -> ContrastDataset:
    examples = [
        ContrastExample(q, pos, neg, {"id": f"toy/{i}", "split": "train" if i < N_TRAIN else "eval"})
        for i, (q, pos, neg) in enumerate(QUESTIONS)
    ]
    return ContrastDataset(examples, name="toy")


def fast(**overrides) -> lora.LoRASettings:
    return lora.LoRASettings(**{"learning_rate": 2e-2, "epochs": 3, "batch_size": 4, "r": 4, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def new_model(tokenizer, seed=0, **overrides):
    return tiny_model("llama", seed=seed, vocab_size=len(tokenizer), max_position_embeddings=1024, **overrides)


def logits(model, inputs=PROBE):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def sft_reference(model, data: lora.SFTSequences) -> float:
    """The SFT loss computed independently: one unpadded forward per sequence, the cross-entropy of
    each response token given everything before it, averaged over all response tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in zip(data.prompts, data.responses, strict=True):
            ids = torch.tensor([prompt + response])
            out = model(input_ids=ids, use_cache=False).logits[0].double()
            predicted = out[len(prompt) - 1 : len(prompt) + len(response) - 1]  # position t-1 predicts token t
            total += float(F.cross_entropy(predicted, torch.tensor(response), reduction="sum"))
            count += len(response)
    return total / count


# ---------------------------------------------------------------------------------- settings
def test_settings_defaults_and_validation():
    s = lora.LoRASettings()
    assert (s.r, s.lora_alpha, s.dropout, s.target_modules) == (8, 16, 0.05, ("q_proj", "v_proj"))
    assert (s.learning_rate, s.max_grad_norm, s.train_split, s.eval_split) == (2e-4, 1.0, "train", "eval")
    assert lora.LoRASettings.from_mapping({"target_modules": ["q_proj"]}).target_modules == ("q_proj",)
    assert lora.LoRASettings.from_mapping(s.to_dict()) == s
    with pytest.raises(UnknownSettingError, match=r"rank.*valid keys"):
        lora.LoRASettings.from_mapping({"rank": 4})
    for bad in ({"r": 0}, {"dropout": 1.0}, {"target_modules": []}, {"learning_rate": 0}, {"epochs": 1.5}):
        with pytest.raises(ValueError):
            lora.LoRASettings.from_mapping(bad)
    with pytest.raises(ValueError, match="held-out data must differ"):
        lora.LoRASettings(eval_split="train")
    config = s.lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout, sorted(config.target_modules)) == (
        8,
        16,
        0.05,
        ["q_proj", "v_proj"],
    )


# -------------------------------------------------------------------------------------- data
def test_sft_sequences_are_hpr_texts_positive_responses_only(tokenizer):
    data = contrast_data()
    seqs = lora.sft_sequences(data, tokenizer)
    fmt, _ = HPRFormat().for_tokenizer(tokenizer)
    expected = []
    for i, example in enumerate(data):
        for seq in fmt.encode(example, tokenizer, i).sequences:
            if seq.role == "pos":
                start = seq.read_positions[0]
                expected.append((seq.ids[:start], seq.ids[start:]))
    assert list(zip(seqs.prompts, seqs.responses, strict=True)) == expected
    assert len(seqs) == sum(len(x.positives) for x in data) and seqs.skipped == 0
    # the response is "X. {choice}" + the end of the assistant turn, the prompt everything before it
    text = tokenizer.decode(seqs.prompts[0] + seqs.responses[0])
    response = tokenizer.decode(seqs.responses[0])
    assert "Question: Is the sky blue?" in tokenizer.decode(seqs.prompts[0])
    assert response.endswith("<|im_end|>\n") and response[0] in "ABCD" and response[1:3] == ". "
    assert text.endswith(response)
    batch = seqs.batch([0, 1], pad_id(tokenizer))
    labelled = batch["labels"] != -100
    assert labelled.sum() == len(seqs.responses[0]) + len(seqs.responses[1])
    start = len(seqs.prompts[0])
    assert batch["labels"][0, start : start + len(seqs.responses[0])].tolist() == seqs.responses[0]


def test_too_long_sequences_are_left_out_with_a_warning(tokenizer):
    data = contrast_data()
    full = lora.sft_sequences(data, tokenizer)
    lengths = [len(p) + len(r) for p, r in zip(full.prompts, full.responses, strict=True)]
    cut = sorted(lengths)[len(lengths) // 2]
    with pytest.warns(UserWarning, match="longer than max_length"):
        seqs = lora.sft_sequences(data, tokenizer, max_length=cut)
    assert seqs.skipped == sum(n > cut for n in lengths) and len(seqs) == sum(n <= cut for n in lengths)
    with pytest.raises(ValueError, match="no training sequence left"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora.sft_sequences(data, tokenizer, max_length=5)


def test_loss_covers_response_tokens_only(tokenizer):
    model = new_model(tokenizer)
    seqs = lora.sft_sequences(contrast_data(), tokenizer)
    reference = sft_reference(model, seqs)
    pad = pad_id(tokenizer)
    for batch_size in (1, 3, len(seqs)):  # padding and batching change nothing
        assert lora.sft_loss(model, seqs, batch_size, pad) == pytest.approx(reference, rel=1e-5)
    # the prompt tokens do not count: changing a prompt token's label cannot matter, changing the
    # response changes the loss
    batch = seqs.batch([0], pad)
    with torch.no_grad():
        loss = model(**batch).loss
    assert float(loss) == pytest.approx(sft_reference(model, lora.SFTSequences(seqs.prompts[:1], seqs.responses[:1])))
    full = dict(batch, labels=batch["input_ids"].clone())
    with torch.no_grad():
        assert float(model(**full).loss) != pytest.approx(float(loss))


# ---------------------------------------------------------------------------------- training
def test_training_reduces_the_sft_loss_and_keeps_the_best_epoch(tokenizer, tmp_path):
    model = new_model(tokenizer)
    data = contrast_data()
    train = lora.sft_sequences(data.split("train"), tokenizer)
    held_out = lora.sft_sequences(data.split("eval"), tokenizer)
    before_train, before_eval = sft_reference(model, train), sft_reference(model, held_out)
    result = lora.train_lora(model, tokenizer, data, fast(epochs=4), progress=False)
    peft_model = result.model
    assert lora.is_peft_model(peft_model) and not peft_model.training
    assert result.initial_eval_loss == pytest.approx(before_eval, rel=1e-5)  # B = 0: it starts at the base model
    assert sft_reference(peft_model, train) < before_train - 0.1
    losses = [e.train_loss for e in result.epochs]
    assert losses[-1] < losses[0] and len(result.epochs) == 4
    assert all(e.steps == -(-len(train) // 4) and e.seconds > 0 for e in result.epochs)  # ceil(N / batch_size)
    evals = [e.eval_loss for e in result.epochs]
    assert result.best_epoch == 1 + evals.index(min(evals))
    assert sft_reference(peft_model, held_out) == pytest.approx(min(evals), rel=1e-5)  # the best epoch's weights
    assert result.data["train_sequences"] == len(train) and result.data["eval_sequences"] == len(held_out)
    assert result.data["train_examples"] == N_TRAIN and result.data["eval_split"] == "eval"
    # same seed, same adapter; the caller's random state is left alone
    fresh = new_model(tokenizer)  # (seeds torch itself)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    again = lora.train_lora(fresh, tokenizer, data, fast(epochs=4), progress=False)
    assert torch.equal(torch.rand(3), expected_draw)
    a, b = (peft.get_peft_model_state_dict(r.model) for r in (result, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_epoch_is_restored_when_a_later_epoch_is_worse(tokenizer):
    data = contrast_data()
    settings = fast(epochs=10, learning_rate=0.3, batch_size=2)
    result = lora.train_lora(new_model(tokenizer), tokenizer, data, settings, progress=False)
    evals = [e.eval_loss for e in result.epochs]
    best = 1 + evals.index(min(evals))
    assert result.best_epoch == best < 10  # a later epoch was worse
    held_out = lora.sft_sequences(data.split("eval"), tokenizer)
    assert sft_reference(result.model, held_out) == pytest.approx(min(evals), rel=1e-5)


def test_without_eval_data_the_last_epoch_is_kept(tokenizer):
    train_only = contrast_data().split("train")
    with pytest.warns(UserWarning, match="no 'eval' split"):
        result = lora.train_lora(new_model(tokenizer), tokenizer, train_only, fast(epochs=2), progress=False)
    assert result.best_epoch == 2 and result.initial_eval_loss is None
    assert all(e.eval_loss is None for e in result.epochs)


def test_the_base_model_is_unchanged_after_training(tokenizer):
    model = new_model(tokenizer)
    reference = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = lora.train_lora(model, tokenizer, contrast_data(), fast(), progress=False)
    assert result.in_place is False and result.model.get_base_model() is not model
    assert torch.equal(logits(model), reference)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert lora.active_adapter_layers(model) == 0 and not any("lora" in n for n, _ in model.named_parameters())
    assert not torch.equal(logits(result.model), reference)  # the adapter does change the model


def test_in_place_training_wraps_the_model_and_unload_restores_it(tokenizer):
    model = new_model(tokenizer)
    reference = logits(model)
    modules = dict(model.named_modules())
    result = lora.train_lora(model, tokenizer, contrast_data(), fast(), progress=False, in_place=True)
    peft_model = result.model
    assert result.in_place and peft_model.get_base_model() is model
    assert not torch.equal(logits(model), reference)  # the adapter runs inside the model now
    with peft_model.disable_adapter():
        assert torch.equal(logits(model), reference)
    adapted = logits(peft_model)
    peft_model.unload()
    assert torch.equal(logits(model), reference)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in modules.items()}
    assert lora.active_adapter_layers(model) == 0
    assert not torch.equal(adapted, reference)


def test_an_interrupted_in_place_run_gives_the_model_back(tokenizer, monkeypatch):
    model = new_model(tokenizer)
    reference = logits(model)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora, "sft_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lora.train_lora(model, tokenizer, contrast_data(), fast(), progress=False, in_place=True)
    assert lora.active_adapter_layers(model) == 0 and not any("lora" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model), reference)


# ---------------------------------------------------------------------------------- save/load
_CHILD = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
root = sys.argv[1]
ref = torch.load(root + "/reference.pt")
base = AutoModelForCausalLM.from_pretrained(root + "/model").float().eval()
model = PeftModel.from_pretrained(base, root + "/adapter").eval()
with torch.no_grad():
    out = model(**ref["inputs"], use_cache=False).logits
print(json.dumps({"equal": torch.equal(out, ref["logits"]),
                  "actedit": sorted(m for m in sys.modules if m.startswith("actedit"))}))
"""


def test_saved_adapter_loads_with_stock_peft_in_a_fresh_process(tokenizer, tmp_path):
    model = new_model(tokenizer)
    model.save_pretrained(tmp_path / "model")
    result = lora.train_lora(model, tokenizer, contrast_data(), fast(), tmp_path / "adapter", progress=False)
    assert result.path == (tmp_path / "adapter").resolve()
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", lora.METADATA_FILE} <= set(files)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary directory left
    meta = json.loads((tmp_path / "adapter" / lora.METADATA_FILE).read_text())
    assert meta["settings"] == result.settings.to_dict() and meta["best_epoch"] == result.best_epoch
    assert [e["eval_loss"] for e in meta["epochs"]] == [e.eval_loss for e in result.epochs]
    assert meta["data"]["train_sequences"] == result.data["train_sequences"] and meta["seconds"] > 0
    assert meta["base_model"]["hidden_size"] == model.config.hidden_size and meta["peft_version"] == peft.__version__
    torch.save({"inputs": PROBE, "logits": logits(result.model)}, tmp_path / "reference.pt")
    assert run_fresh_python(_CHILD, str(tmp_path), cwd=tmp_path) == {"equal": True, "actedit": []}
    # actedit's loader gives the same model
    loaded = lora.load_lora(new_model(tokenizer), tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(result.model)) and not loaded.training


def test_an_interrupted_save_leaves_no_adapter_and_keeps_the_old_one(tokenizer, tmp_path, monkeypatch):
    result = lora.train_lora(new_model(tokenizer), tokenizer, contrast_data(), fast(epochs=1), progress=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora, "write_json", crash)  # after PEFT wrote the weights, before the rename
    with pytest.raises(KeyboardInterrupt):
        lora.save_lora(result, tmp_path / "adapter")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    lora.save_lora(result, tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(lora, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        lora.save_lora(result, tmp_path / "adapter")
    assert os.listdir(tmp_path) == ["adapter"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_load_lora_refuses_missing_paths_and_other_models(tokenizer, tmp_path):
    result = lora.train_lora(new_model(tokenizer), tokenizer, contrast_data(), fast(epochs=1), progress=False)
    lora.save_lora(result, tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="No LoRA adapter directory"):
        lora.load_lora(new_model(tokenizer), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no adapter_config.json"):
        lora.load_lora(new_model(tokenizer), tmp_path)
    wider = tiny_model("llama", vocab_size=len(tokenizer), hidden_size=48, max_position_embeddings=1024)
    with pytest.raises(ValueError, match="does not fit.*hidden_size"):
        lora.load_lora(wider, tmp_path / "adapter")
    # without actedit's record, PEFT's own load is checked: a deeper model's extra layers have no weights
    (tmp_path / "adapter" / lora.METADATA_FILE).unlink()
    deeper = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4, max_position_embeddings=1024)
    with pytest.raises(ValueError, match="have no saved tensor"):
        lora.load_lora(deeper, tmp_path / "adapter")
    assert lora.active_adapter_layers(deeper) == 0  # given back without the adapter
    with pytest.raises(ValueError, match="does not fit"):
        lora.load_lora(wider, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already a PeftModel"):
        lora.load_lora(result.model, tmp_path / "adapter")


# -------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors(tokenizer, monkeypatch):
    model = new_model(tokenizer)
    with pytest.raises(ValueError, match="no training data"):
        lora.train_lora(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="reads a ContrastDataset"):
        lora.train_lora(model, tokenizer, "truthfulqa", progress=False)
    with pytest.raises(UnknownSettingError, match="learning_rate"):
        lora.train_lora(model, tokenizer, contrast_data(), {"learning_rat": 1e-3}, progress=False)
    with pytest.raises(ValueError, match="no example in split 'training'"):
        lora.train_lora(model, tokenizer, contrast_data(), {"train_split": "training"}, progress=False)
    with pytest.raises(ValueError, match="cannot adapt.*c_attn"):
        lora.train_lora(model, tokenizer, contrast_data(), {"target_modules": ["c_attn"]}, progress=False)
    assert lora.active_adapter_layers(model) == 0
    result = lora.train_lora(model, tokenizer, contrast_data(), fast(epochs=1), progress=False)
    with pytest.raises(ValueError, match="already a PeftModel"):
        lora.train_lora(result.model, tokenizer, contrast_data(), progress=False)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if PEFT were not installed
    with pytest.raises(ImportError, match=r"pip install 'actedit\[lora\]'"):
        lora.train_lora(model, tokenizer, contrast_data(), progress=False)
    with pytest.raises(ImportError, match=r"pip install 'actedit\[lora\]'"):
        lora.load_lora(model, "adapter")


# ---------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def questions():
    require_truthfulqa()
    return task_spec("truthfulqa").load(SHARED_DATA, "test", None, 4)


@pytest.fixture(scope="module")
def qa_tokenizer(questions):
    corpus = [TRUTHFULQA_PRIMER] + [q.question for q in questions] + [c for q in questions for c in q.mc2_choices]
    return build_tokenizer(corpus)


def caa_edit(model):
    """A pyvene CAA edit of layer 1 on ``model`` (every position)."""
    torch.manual_seed(3)
    vector = torch.randn(model.config.hidden_size)
    return intervenable(model, build_caa_config(model, {1: vector}, multiplier=2.0, position_policy="all"))


def random_adapter(model, seed=1):
    """A PeftModel wrapping ``model`` in place, with random A and B (it changes every score)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, config).eval()


def test_a_peft_model_scores_next_to_its_base_and_pyvene_edits(qa_tokenizer, questions):
    model = new_model(qa_tokenizer)
    pvm = caa_edit(model)
    kw = dict(progress=False, pack_tokens=300)
    base_alone = mc.score_mc(model, qa_tokenizer, questions, **kw)
    caa_alone = mc.score_mc(pvm, qa_tokenizer, questions, **kw)
    adapted = random_adapter(model)  # injected into ``model`` in place
    lora_alone = mc.score_mc(adapted, qa_tokenizer, questions, **kw)
    with adapted.disable_adapter():
        assert [r.scores for r in mc.score_mc(model, qa_tokenizer, questions, **kw).records] == [
            r.scores for r in base_alone.records
        ]
    assert lora_alone.protocol["mode"] == "packed" and lora_alone.protocol["peft"]["r"] == 4
    full = mc.score_mc(adapted, qa_tokenizer, questions, mode="full", progress=False)
    for a, b in zip(lora_alone.records, full.records, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-4)  # packing is exact for LoRA (float32 rounding)
    flags = {n: p.requires_grad for n, p in adapted.named_parameters()}
    together = mc.score_mc_many({"base": model, "lora": adapted, "caa": pvm}, qa_tokenizer, questions, **kw)
    for name, alone in (("base", base_alone), ("lora", lora_alone), ("caa", caa_alone)):
        assert [r.scores for r in together[name].records] == [r.scores for r in alone.records], name  # bit for bit
    assert together["caa"].protocol["shared_lower_layers"] == 1  # still shares the base model's layer 0
    assert [r.scores for r in together["lora"].records] != [r.scores for r in together["base"].records]
    assert lora.active_adapter_layers(model) > 0  # the adapter is back on after scoring
    assert {n: p.requires_grad for n, p in adapted.named_parameters()} == flags  # PEFT's flags put back
    # the PeftModel first: nothing shares its layers
    first = mc.score_mc_many({"lora": adapted, "base": model}, qa_tokenizer, questions, **kw)
    assert [r.scores for r in first["base"].records] == [r.scores for r in base_alone.records]
    # the base model alone, its adapter on, would silently score the adapter: refused
    with pytest.raises(ValueError, match="carries an enabled PEFT adapter"):
        mc.score_mc(model, qa_tokenizer, questions, **kw)
    with pytest.raises(ValueError, match="carries an enabled PEFT adapter"):
        mc.score_mc(pvm, qa_tokenizer, questions, **kw)
    adapted.unload()
    assert [r.scores for r in mc.score_mc(model, qa_tokenizer, questions, **kw).records] == [
        r.scores for r in base_alone.records
    ]


def test_a_trained_copy_scores_and_analyses_next_to_the_base(qa_tokenizer, questions, tmp_path):
    model = new_model(qa_tokenizer)
    data = ContrastDataset(
        [
            ContrastExample(q.question, q.true_answers[:1], q.false_answers[:1], {"id": i, "split": "train"})
            for i, q in enumerate(questions)
        ],
        name="tqa",
    )
    with pytest.warns(UserWarning, match="no 'eval' split"):
        result = lora.train_lora(model, qa_tokenizer, data, fast(epochs=3, batch_size=2), progress=False)
    kw = dict(progress=False, pack_tokens=300)
    together = mc.score_mc_many({"base": model, "lora": result.model}, qa_tokenizer, questions, **kw)
    base_alone = mc.score_mc(model, qa_tokenizer, questions, **kw)
    assert [r.scores for r in together["base"].records] == [r.scores for r in base_alone.records]
    texts = [q.question for q in questions]
    out = analysis.analyze_edits(
        model,
        {"lora": result.model},
        qa_tokenizer,
        together["base"],
        together,
        texts,
        metric="mc1",
        plot_dir=tmp_path,
    )
    assert out["lora"].side_effects.kl > 0 and out["lora"].side_effects.base_loss == pytest.approx(
        analysis.lm_loss(model, qa_tokenizer), rel=1e-6
    )
    assert set(out["lora"].norms) == set(range(model.config.num_hidden_layers))
    assert (tmp_path / "norms.png").is_file() and (tmp_path / "flips.png").is_file()


def test_analyses_of_an_in_place_adapter_keep_the_base_model_apart(qa_tokenizer, questions):
    model = new_model(qa_tokenizer)
    texts = [q.question for q in questions]
    inputs = analysis.encode_texts(qa_tokenizer, texts)
    base_loss = analysis.lm_loss(model, qa_tokenizer)
    base_norms = analysis.collect_norms(model, inputs, skip_first=1)
    pvm = caa_edit(model)
    caa_side = analysis.side_effects(pvm, qa_tokenizer)
    adapted = random_adapter(model)
    lora_loss = analysis.lm_loss(adapted, qa_tokenizer)
    side = analysis.side_effects(adapted, qa_tokenizer, base=model)
    assert side.base_loss == pytest.approx(base_loss, rel=1e-6) and side.edited_loss == pytest.approx(lora_loss)
    flags = {n: p.requires_grad for n, p in adapted.named_parameters()}
    comparison = analysis.activation_norms(model, inputs, {"lora": adapted, "caa": pvm}, skip_first=1)
    assert {n: p.requires_grad for n, p in adapted.named_parameters()} == flags  # pyvene froze none of it
    assert comparison.base.norms == base_norms.norms  # the base's norms, not the adapter's
    assert comparison.edits["lora"].norms != base_norms.norms
    results = mc.score_mc_many({"base": model, "lora": adapted, "caa": pvm}, qa_tokenizer, questions, progress=False)
    out = analysis.analyze_edits(
        model, {"lora": adapted, "caa": pvm}, qa_tokenizer, results["base"], results, texts, metric="mc1"
    )
    assert out["caa"].side_effects.base_loss == pytest.approx(base_loss, rel=1e-6)
    assert out["caa"].side_effects.kl == pytest.approx(caa_side.kl, rel=1e-5)  # the adapter played no part
    assert out["lora"].side_effects.edited_loss == pytest.approx(lora_loss, rel=1e-6)
    measured = effect.measure_effect(adapted, qa_tokenizer, texts, warn=False)
    assert measured.layers == [] and measured.generation is None
    assert measured.side_effects.base_loss == pytest.approx(base_loss, rel=1e-6)
