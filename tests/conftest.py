"""Shared fixtures: tiny random causal LMs built from configs (never downloaded)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import actedit.interventions as ai  # noqa: E402  (importing it applies the pyvene fixes)
from actedit.interventions.artifacts import save_artifact  # noqa: E402
from actedit.interventions.compat import head_dim  # noqa: E402
from actedit.interventions.edits import compose, edit_config, site_width  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa"

VOCAB = 97


def unavailable(reason: str) -> None:
    """Skip a test whose input is missing on this machine, but fail it under CI (``CI`` set), so
    that a green CI always means the scorer, the study and the real model were tested."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}. CI is set, so this is a failure, not a skip: CI must provide it.", pytrace=False)
    pytest.skip(reason)


def require_truthfulqa() -> Path:
    """The shared TruthfulQA directory (``mc_task.json``, HPR's split), or :func:`unavailable`."""
    if not (SHARED_DATA / "mc_task.json").is_file():
        unavailable(f"TruthfulQA data not found at {SHARED_DATA} (mc_task.json); put ../shared beside the checkout")
    return SHARED_DATA


# ------------------------------------------------------------------------ test tokenizer
CORPUS = [
    "Question: What is the capital of France?\nChoices:\nA. Paris\nB. Lyon\nAnswer:\n",
    "Q: Is the sky blue? A: Yes it is. No it is not. The sky is green.",
    "The quick brown fox jumps over the lazy dog. Which answer (A) or (B) is right?",
    "Love Hate I talk about weddings constantly. Statement: hateful Respond with either Yes or No.",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(texts, vocab_size=700, add_bos=False, specials=("<pad>", "<s>", "</s>")):
    """A byte-level BPE tokenizer trained here on ``texts`` (GPT-2 style spaces), no download.

    Ids 0, 1, 2 are <pad>, <s>, </s> (the tiny test models' pad/bos/eos); ``add_bos`` puts BOS
    before plain text.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_tokenizer(vocab_size: int = 300):
    """:func:`build_tokenizer` on a small fixed corpus (trained in milliseconds, offline), with BOS
    on plain text and a ChatML template; ``len(tokenizer)`` is the vocabulary size to build models with."""
    fast = build_tokenizer(
        CORPUS * 3, vocab_size, add_bos=True, specials=("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
    )
    fast.model_input_names = ["input_ids", "attention_mask"]  # a causal LM takes no token types
    fast.chat_template = CHATML
    return fast


def tiny_config(family: str, **overrides):
    """A 3-layer config of ``family`` small enough for CPU tests."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    elif family == "llama":
        cfg = tf.LlamaConfig(**common)
    elif family == "llama_head_dim":  # explicit head_dim != hidden / heads
        cfg = tf.LlamaConfig(**{**common, "head_dim": 16})
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=8)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=8)
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(**{**common, "head_dim": 8, "sliding_window": 16, "layer_types": None})
    elif family == "phi3":
        cfg = tf.Phi3Config(**{**common, "num_key_value_heads": 4})
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    """A tiny random model of ``family`` in eval mode, fp32, deterministic weights."""
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    if family == "gpt2":
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "gemma3":
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.float().eval()


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gpt2"]


# ------------------------------------------------------------ stock pyvene in a fresh process
STOCK_RELOAD_INPUTS = {
    "input_ids": torch.tensor([[0, 0, 5, 6, 7, 8], [3, 9, 4, 11, 12, 13]]),
    "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),
}
STOCK_RELOAD_GENERATE = dict(
    unit_locations=None, intervene_on_prompt=True, max_new_tokens=6, do_sample=False, pad_token_id=0
)
_STOCK_RELOAD_CHILD = """
import json, sys, torch
import pyvene as pv
from transformers import AutoModelForCausalLM
root = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(root + "/model").float().eval()
ref = torch.load(root + "/reference.pt")
assert not any(m.startswith("actedit") for m in sys.modules), "the child must not import actedit itself"
results = {}
for name in ref["names"]:
    pvm = pv.IntervenableModel.load(root + "/artifacts/" + name, model)
    with torch.no_grad():
        _, out = pvm(dict(ref["inputs"]), unit_locations=None)
        _, gen = pvm.generate(dict(ref["inputs"]), unit_locations=None, intervene_on_prompt=True,
                              max_new_tokens=6, do_sample=False, pad_token_id=0)
    results[name] = {"logits": torch.equal(out.logits, ref["logits"][name]),
                     "generate": torch.equal(gen, ref["generate"][name])}
results["imported_by_pyvene"] = any(m.startswith("actedit.interventions") for m in sys.modules)
results["above_core"] = sorted(m for m in sys.modules
                              if m.startswith("actedit.") and not m.startswith("actedit.interventions"))
print(json.dumps(results))
"""


def run_fresh_python(code: str, *args: str, cwd: Path):
    """``python -c code args`` in a fresh process that imports what an installed package sees
    (PYTHONPATH dropped); fails the test with its stderr when it fails; returns the JSON object
    its last line of output prints."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_outputs(pvm):
    """Logits and a greedy generation of an edited model on :data:`STOCK_RELOAD_INPUTS`."""
    with torch.no_grad():
        _, out = pvm(dict(STOCK_RELOAD_INPUTS), unit_locations=None)
        _, gen = pvm.generate(dict(STOCK_RELOAD_INPUTS), **STOCK_RELOAD_GENERATE)
    return out.logits, gen


def assert_stock_reload(model, pvms, root: Path) -> None:
    """Save every edit of ``pvms`` (name → pyvene model on ``model``) as an artifact, then load each
    with stock ``pyvene.IntervenableModel.load`` in a fresh process that never imports actedit
    itself: the same logits and generations, bit for bit, pyvene imported actedit on its own, and
    that import loaded the core layer only (no data, training, evaluation, study or CLI module)."""
    logits, generations = {}, {}
    for name, pvm in pvms.items():
        logits[name], generations[name] = reference_outputs(pvm)
        save_artifact(pvm, root / "artifacts" / name)
    model.save_pretrained(root / "model")
    torch.save(
        {"names": list(pvms), "inputs": STOCK_RELOAD_INPUTS, "logits": logits, "generate": generations},
        root / "reference.pt",
    )
    results = run_fresh_python(_STOCK_RELOAD_CHILD, str(root), cwd=root)
    assert results.pop("imported_by_pyvene")
    assert results.pop("above_core") == [], "a stock load imported modules above the core layer"
    assert results == {name: {"logits": True, "generate": True} for name in pvms}


def every_method_edit(model):
    """One config per method on a 3-layer tiny model (random contents, every layer edited by
    some method) and their composition, keyed by :data:`EDIT_NAMES`."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    d, heads, hd = int(cfg.hidden_size), int(cfg.num_attention_heads), int(head_dim(cfg))
    torch.manual_seed(1)
    hpr = ai.build_hpr_config(model, [0, 1, 2])
    for rep in hpr.representations:  # a random probe that splits activations both ways
        torch.nn.init.normal_(rep.intervention.probe.weight, std=1.0)
    width = site_width(model, "mlp_output")
    sea = {}
    for layer in (0, 2):
        q, _ = torch.linalg.qr(torch.randn(width, 16, generator=g))
        sea[layer] = (q[:, :8], q[:, 8:])
    iti = {
        layer: {
            "directions": torch.nn.functional.normalize(torch.randn(heads, hd, generator=g), dim=-1),
            "sigmas": torch.rand(heads, generator=g) + 0.5,
            "heads": [0, heads - 1],
        }
        for layer in (1, 2)
    }
    diff = {}
    for layer in (1, 2):
        module = ai.DiffIntervention(embed_dim=d, alpha=1.0)
        for p in module.net.parameters():
            torch.nn.init.normal_(p, std=0.5, generator=g)
        diff[layer] = module
    edits = {
        "hpr": hpr,
        "sea": ai.build_sea_config(model, sea),
        "iti": ai.build_iti_config(model, iti, alpha=15.0),
        "caa": ai.build_caa_config(model, {2: torch.randn(d, generator=g)}, multiplier=2.0),
        "actadd": ai.build_actadd_config(model, {1: torch.randn(3, d, generator=g)}),
        "diff": edit_config(model, "diff", diff),
    }
    edits["composed"] = compose(*[copy.deepcopy(c) for c in edits.values()])
    return edits


EDIT_NAMES = ["hpr", "sea", "iti", "caa", "actadd", "diff", "composed"]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Run the suite on one torch thread (restored afterwards).

    On a shared 2-core machine two OpenMP threads wait on each other whenever another process
    holds a core (tests then ran up to 50x slower); one thread is as fast for tiny models.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def padded_batch():
    """Two rows, the first left-padded by 2 (pad id 0)."""
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [3, 9, 4, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": mask}


def save_tiny_chat_model(root):
    """A tiny llama with the tests' ChatML tokenizer (room for TruthfulQA's primer) saved to
    ``root/model`` for ``load_model``; returns that directory."""
    tokenizer = make_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=1024)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def chat_model_root(tmp_path_factory):
    """A directory whose ``model/`` holds :func:`save_tiny_chat_model` (needs TruthfulQA, which
    the tests using it read: see :func:`require_truthfulqa`)."""
    require_truthfulqa()
    root = tmp_path_factory.mktemp("chat_model")
    save_tiny_chat_model(root)
    return root
