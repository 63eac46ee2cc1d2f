"""Generation before/after an edit (JSON report) and the interactive chat session with live layer selection.

Everything runs on a tiny random Llama and a word-level tokenizer built here (no downloads). The
references are independent: one prompt at a time, no padding, ``model.generate`` for the base model
and a freshly built ``IntervenableModel`` for the edit (or a layer subset of it).
"""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch

from actedit.cli import chat as chat_cli
from actedit.data.generate import GenerationSettings, build_prompt, generate_texts
from actedit.eval import chat as chat_mod
from actedit.eval.generations import GenerationReport, compare_generations
from actedit.interventions import build_caa_config, intervenable, save_artifact
from conftest import tiny_model

WORDS = (
    "hello world what is the capital of france tell me a story about cats how far away moon sun "
    "why sky blue water wet cold hot yes no maybe it are you there here"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </|turn|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QUESTIONS = [
    "what is the capital of france",
    "hello",
    "tell me a story about cats",
    "how far away is the moon",
    "why is the sky blue",
]
LAYERS = (0, 1, 2)
MAX_NEW = 6


def word_tokenizer(chat_template=None):
    """Word-level tokenizer: <pad>=0, <s>=1 (prepended), </s>=2, <unk>=3, then WORDS, then filler words."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    extra = ["<|user|>", "<|system|>", "<|assistant|>", "</|turn|>"]
    vocab_list = special + extra + list(dict.fromkeys(WORDS))
    vocab_list += [f"w{i}" for i in range(97 - len(vocab_list))]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def strong_vectors(seed=1, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    return {layer: scale * torch.randn(32, generator=gen) for layer in LAYERS}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def reference(model_or_pvm, tok, prompt, add_special_tokens=True, max_new=MAX_NEW):
    """Unpadded, one-prompt greedy answer (independent of the batching code)."""
    ids = torch.tensor([tok(prompt, add_special_tokens=add_special_tokens)["input_ids"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if hasattr(model_or_pvm, "interventions"):
            _, out = model_or_pvm.generate(inputs, unit_locations=None, intervene_on_prompt=True, **kwargs)
        else:
            out = model_or_pvm.generate(**inputs, **kwargs)
    new = out[0, ids.shape[1] :].tolist()
    if 2 in new:
        new = new[: new.index(2)]
    return tok.decode(new, skip_special_tokens=True).strip()


def caa_pvm(model, layers, vectors=None):
    vectors = vectors or strong_vectors()
    return intervenable(model, build_caa_config(model, {layer: vectors[layer] for layer in layers}, multiplier=1.0))


def pyvene_hooks(model):
    found = []
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            found += [
                h
                for h in hooks.values()
                if getattr(getattr(h, "__wrapped__", h), "__module__", "").startswith("pyvene.")
            ]
    return found


# ------------------------------------------------------------------------------ generation
def test_generation_report_json_schema_and_answers(model, tok, tmp_path):
    pvm = caa_pvm(model, LAYERS)
    settings = GenerationSettings(max_new_tokens=MAX_NEW, batch_size=2)
    report = compare_generations(pvm, tok, QUESTIONS, settings, progress=False)
    path = report.save(tmp_path / "gen" / "answers.json")
    data = json.loads(path.read_text())
    assert set(data) >= {"model", "edits", "settings", "seconds", "n_questions", "n_changed", "records"}
    assert data["n_questions"] == len(QUESTIONS)
    assert [r["question"] for r in data["records"]] == QUESTIONS
    for record in data["records"]:
        assert set(record) == {"question", "prompt", "base_answer", "edited_answer"}
        assert all(isinstance(record[k], str) for k in record)
    assert data["settings"]["max_new_tokens"] == MAX_NEW and data["settings"]["do_sample"] is False
    assert data["settings"]["chat_template"] is False
    assert [e["method"] for e in data["edits"]] == ["caa"] and data["edits"][0]["layers"] == list(LAYERS)
    # batched, left-padded answers equal one-prompt-at-a-time references
    for record in report.records:
        assert record.prompt == record.question
        assert record.base_answer == reference(model, tok, record.prompt)
        assert record.edited_answer == reference(pvm, tok, record.prompt)
    assert report.n_changed > 0, "a strong edit must change some answer"
    assert GenerationReport.load(path).records == report.records


def test_chat_template_is_applied(model):
    tok = word_tokenizer(CHAT_TEMPLATE)
    settings = GenerationSettings(max_new_tokens=3, batch_size=3, system_prompt="you are here")
    prompt = build_prompt(tok, "hello world", settings)
    assert prompt == "<|system|> you are here </|turn|> <|user|> hello world </|turn|> <|assistant|>"
    pvm = caa_pvm(model, [1])
    report = compare_generations(pvm, tok, QUESTIONS[:3], settings, progress=False)
    assert report.settings["chat_template"] is True
    for record in report.records:
        assert record.prompt.endswith("<|assistant|>")
        # template text carries no BOS, and none is added again: exactly as the template renders
        assert record.base_answer == reference(model, tok, record.prompt, add_special_tokens=False, max_new=3)
    with pytest.raises(ValueError, match="no chat template"):
        build_prompt(word_tokenizer(), "hello", GenerationSettings(use_chat_template=True))


def test_settings_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="question"):
        GenerationSettings(prompt_format="Q: A:")
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=0)


def test_length_sorted_batches_with_a_static_cache_keep_order_and_answers(model, tok):
    """Prompts of mixed lengths, batched by length with a preallocated cache: each answer is the
    one-prompt reference, in the order the prompts were given."""
    prompts = [q + " and more words" * (i % 3) for i, q in enumerate(QUESTIONS)]
    settings = GenerationSettings(max_new_tokens=MAX_NEW, batch_size=2, cache_implementation="static")
    answers = generate_texts(model, tok, prompts, settings, sort_by_length=True)
    assert answers == [reference(model, tok, p) for p in prompts]
    with pytest.raises(ValueError, match="cache_implementation"):
        GenerationSettings(cache_implementation=1)


def test_sampling_is_seeded(model, tok):
    settings = GenerationSettings(max_new_tokens=4, do_sample=True, seed=3, batch_size=2)
    first = generate_texts(model, tok, QUESTIONS[:3], settings)
    assert generate_texts(model, tok, QUESTIONS[:3], settings) == first


# ------------------------------------------------------------------------------------ chat
@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat") / "caa-edit"
    save_artifact(caa_pvm(model, LAYERS), directory)
    return directory


def test_parse_layer_selection():
    parse = chat_mod.parse_layer_selection
    assert parse("all", [13, 14, 15]) == [13, 14, 15]
    assert parse("none", [13, 14, 15]) == []
    assert parse(" 15, 13 ", [13, 14, 15]) == [13, 15]
    assert parse("13-14", [13, 14, 15]) == [13, 14]
    with pytest.raises(ValueError, match="not edited by this artifact"):
        parse("12", [13, 14, 15])
    with pytest.raises(ValueError, match="cannot read layer"):
        parse("x", [13, 14, 15])


def test_chat_switches_layers_live(model, tok, artifact):
    prompt = "what is the capital of france"
    expected = {
        "none": reference(model, tok, prompt),
        "all": reference(caa_pvm(model, LAYERS), tok, prompt),
        "1": reference(caa_pvm(model, [1]), tok, prompt),
        "0,2": reference(caa_pvm(model, [0, 2]), tok, prompt),
    }
    assert expected["none"] != expected["all"], "the test edit must change the answer"
    assert expected["1"] not in (expected["none"], expected["all"]), "a layer subset must differ from none and all"
    settings = GenerationSettings(max_new_tokens=MAX_NEW, batch_size=1)
    session = chat_mod.ChatSession.from_artifact(artifact, model, tok, settings=settings)
    assert session.available_layers == list(LAYERS) and session.active == list(LAYERS)
    lines = [
        prompt,
        "### target layers: none",
        prompt,
        "### target layers: 1",
        prompt,
        "### target layers: 0,2",
        prompt,
        "### target layers: all",
        prompt,
        "### target layers: 7",
        prompt,
        "### status",
        "### help",
        "### bogus",
        "",
        "never read",
    ]
    out = io.StringIO()
    assert session.run(io.StringIO("\n".join(lines) + "\n"), out) == 0
    text = out.getvalue()
    # each chunk: the echoed input line, then the reply (several lines for help)
    replies = [chunk.split("\n", 1) for chunk in text.split(chat_mod.PROMPT_LINE + "\n>>> ")[1:]]
    replies = [(chunk[0], chunk[1].rstrip("\n")) for chunk in replies if len(chunk) > 1]
    got = dict(replies)
    answers = [chunk[1] for chunk in replies if chunk[0] == prompt]
    assert answers == [
        expected["all"],
        expected["none"],
        expected["1"],
        expected["0,2"],
        expected["all"],
        expected["all"],
    ]
    assert got["### target layers: none"] == "Targeting layers: none (base model)"
    assert got["### target layers: 1"] == "Targeting layers: 1"
    assert got["### target layers: all"] == "Targeting layers: all (0,1,2)"
    assert "not edited by this artifact" in got["### target layers: 7"]
    assert "available: 0,1,2" in got["### status"]
    assert "### target layers: all" in got["### help"]
    assert got["### bogus"].startswith("Unknown command")
    assert text.rstrip().endswith("<CLOSED>") and "never read" not in text
    # hooks are clean: nothing of pyvene stays on the model and the plain model is the base model
    assert not pyvene_hooks(model)
    assert reference(model, tok, prompt) == expected["none"]


def test_chat_cli_run(model, tok, artifact, tmp_path):
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    parser = argparse.ArgumentParser()
    chat_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--intervention",
            str(artifact),
            "--model",
            str(model_dir),
            "--max-new-tokens",
            str(MAX_NEW),
            "--layers",
            "none",
        ]
    )
    prompt = "tell me a story about cats"
    out = io.StringIO()
    code = chat_cli.run(args, stdin=io.StringIO(f"{prompt}\n### target layers: all\n{prompt}\n\n"), stdout=out)
    assert code == 0
    text = out.getvalue()
    assert "targeting layers: none (base model)" in text
    base, edited = reference(model, tok, prompt), reference(caa_pvm(model, LAYERS), tok, prompt)
    chunks = text.split(f">>> {prompt}\n")
    assert chunks[1].split("\n")[0] == base
    assert chunks[2].split("\n")[0] == edited
    assert text.rstrip().endswith("<CLOSED>")
    # --position-policy overrides the stored policy of every loaded intervention (HPR demo: last)
    vectors = strong_vectors(scale=0.05)  # weak enough that editing every position or the last one differ
    weak = tmp_path / "weak-edit"
    save_artifact(intervenable(model, build_caa_config(model, vectors)), weak)
    last = reference(intervenable(model, build_caa_config(model, vectors, position_policy="last")), tok, prompt)
    assert last != reference(intervenable(model, build_caa_config(model, vectors)), tok, prompt)
    args = parser.parse_args(
        ["-i", str(weak), "-m", str(model_dir), "--max-new-tokens", str(MAX_NEW), "--position-policy", "last"]
    )
    out = io.StringIO()
    assert chat_cli.run(args, stdin=io.StringIO(f"{prompt}\n"), stdout=out) == 0
    assert out.getvalue().split(f">>> {prompt}\n")[1].split("\n")[0] == last
