"""Activation collection against independent torch hooks, resume after interruption, errors. (The store's
views: test_data_store.py; base completions: test_data_generate.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from actedit.data.collect import SITES, ActivationStore, collect_activations
from actedit.data.contrast import ContrastDataset, ContrastExample, PromptPair, PromptPairDataset
from actedit.data.formats import ActAddFormat, CAAFormat, HPRFormat, ITIFormat, SEAFormat
from conftest import make_tokenizer, tiny_model

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def model_for(family, tok, seed=0):
    """A tiny random model with the test tokenizer's vocabulary and room for 512 positions."""
    positions = {"n_positions": 512} if family == "gpt2" else {"max_position_embeddings": 512}
    return tiny_model(family, seed=seed, vocab_size=len(tok), **positions)


def dataset(n=4):
    """Examples whose responses have different lengths and share their first words sometimes."""
    examples = []
    for i in range(n):
        examples.append(
            ContrastExample(
                f"Is the sky blue? Question {i}.",
                ["Yes it is." + " blue" * i, "The sky is blue."],
                ["No it is not.", "The sky is green." + " Never." * (i % 2), "Never."],
                {"id": f"q{i}", "split": "train" if i % 2 == 0 else "eval"},
                bases=[f"Blue {i}."],
            )
        )
    return ContrastDataset(examples, name="toy")


# --------------------------------------------------------------------- independent reference
def site_modules(model, layer):
    """(module, kind) for each site, found by attribute names — independent of pyvene's tables."""
    if hasattr(model, "transformer"):  # GPT-2
        block = model.transformer.h[layer]
        return {
            "block_output": (block, "out"),
            "block_input": (block, "in"),
            "mlp_output": (block.mlp, "out"),
            "attention_value_output": (block.attn.c_proj, "in"),
        }
    block = model.model.layers[layer]
    return {
        "block_output": (block, "out"),
        "block_input": (block, "in"),
        "mlp_output": (block.mlp, "out"),
        "attention_value_output": (block.self_attn.o_proj, "in"),
    }


def hooked_forward(model, ids, sites, layers):
    """{(site, layer): (seq, width)} from one unpadded forward of ``ids`` with plain torch hooks."""
    got, handles = {}, []
    for layer in layers:
        modules = site_modules(model, layer)
        for site in sites:
            module, kind = modules[site]

            def grab(key):
                def pre_hook(mod, args, kwargs):
                    x = args[0] if args else kwargs["hidden_states"]
                    got[key] = x[0].detach().clone()

                def post_hook(mod, args, output):
                    x = output[0] if isinstance(output, tuple) else output
                    got[key] = x[0].detach().clone()

                return pre_hook, post_hook

            pre, post = grab((site, layer))
            if kind == "in":
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def check_against_reference(store, model, tok, data, fmt, sites, layers, atol=2e-5):
    """Every row of ``store`` equals the hooked activation of its sequence at its position."""
    cols = store.columns()
    loaded = {(s, l): store.load(s, l, dtype=torch.float32) for s in sites for l in layers}
    checked = 0
    for index, example in enumerate(data):
        encoded = fmt.encode(example, tok, index)
        for seq in encoded.sequences:
            ref = hooked_forward(model, seq.ids, sites, layers)
            rows = np.flatnonzero(
                (cols["example"] == index)
                & (cols["role"] == ("pos", "neg", "base").index(seq.role))
                & (cols["response"] == seq.response)
            )
            assert list(cols["position"][rows]) == seq.read_positions
            assert list(cols["offset"][rows]) == list(range(len(seq.read_positions)))
            assert list(cols["token"][rows]) == [seq.ids[p] for p in seq.read_positions]
            for key, acts in loaded.items():
                expected = ref[key][seq.read_positions]
                torch.testing.assert_close(
                    acts[rows],
                    expected,
                    atol=atol,
                    rtol=1e-4,
                    msg=lambda m, key=key, seq=seq, index=index: f"{key} {seq.role}{seq.response} ex{index}: {m}",
                )
                checked += len(rows)
    assert checked == store.num_rows * len(loaded)


# ------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma", "mistral"])
@pytest.mark.parametrize(
    "padding_side,share_prefix,pack_tokens",
    [
        ("right", True, None),
        ("left", True, None),  # padded batches: the reference path
        ("right", True, 512),
        ("right", True, 7),
        ("right", False, 64),  # packed rows (7: each tree alone)
    ],
)
def test_hpr_rows_equal_hooked_forward(tmp_path, tok, family, padding_side, share_prefix, pack_tokens):
    model = model_for(family, tok)
    data = dataset(4)
    fmt = HPRFormat(seed=0)
    store = collect_activations(
        model,
        tok,
        data,
        tmp_path / "store",
        format=fmt,
        sites=list(SITES),
        layers=[0, 2],
        batch_size=3,
        padding_side=padding_side,
        share_prefix=share_prefix,
        pack_tokens=pack_tokens,
        progress=False,
    )
    assert store.complete and store.sites == list(SITES) and store.layers == [0, 2]
    computed = sum(entry["tokens"] for entry in store.manifest["shards"])
    every = sum(len(s.ids) for i, ex in enumerate(data) for s in fmt.encode(ex, tok, i).sequences)
    shared = share_prefix and pack_tokens is not None  # packed trees run each prompt once per question
    assert (computed < every / 2) if shared else (computed == every)
    check_against_reference(store, model, tok, data, fmt, list(SITES), [0, 2])


@pytest.mark.parametrize(
    "fmt,items",
    [
        (ITIFormat(), "contrast"),
        (CAAFormat(), "ab"),
        (SEAFormat(), "contrast"),
        (ActAddFormat(), "pairs"),
    ],
)
@pytest.mark.parametrize("padding_side,pack_tokens", [("left", None), ("right", None), ("right", 512)])
def test_formats_rows_equal_hooked_forward(tmp_path, tok, fmt, items, padding_side, pack_tokens):
    model = model_for("llama", tok, seed=1)
    if items == "contrast":
        data = dataset(3)
    elif items == "ab":
        data = ContrastDataset(
            [
                ContrastExample(f"Which is right {i}?\n(A) the sky is blue\n(B) green", ["(A)"], ["(B)"])
                for i in range(3)
            ]
        )
    else:
        data = PromptPairDataset([PromptPair("Love", "Hate"), PromptPair("I talk about weddings constantly", " ")])
    sites = ["block_input", "attention_value_output"]
    store = collect_activations(
        model,
        tok,
        data,
        tmp_path / "store",
        format=fmt,
        sites=sites,
        layers=[1],
        batch_size=2,
        padding_side=padding_side,
        pack_tokens=pack_tokens,
        progress=False,
    )
    check_against_reference(store, model, tok, data, fmt, sites, [1])


def test_small_shards_and_fp16(tmp_path, tok):
    model = model_for("llama", tok)
    data = dataset(5)
    ref = collect_activations(model, tok, data, tmp_path / "one", format="hpr", layers=[1], progress=False)
    small = collect_activations(
        model, tok, data, tmp_path / "many", format="hpr", layers=[1], shard_rows=30, dtype="float16", progress=False
    )
    entries = small.manifest["shards"]
    assert len(ref.manifest["shards"]) == 1 and len(entries) == 5  # one example per shard here
    assert [e["examples"] for e in entries] == [[i, i + 1] for i in range(5)]
    assert small.load(layer=1).dtype == torch.float16
    torch.testing.assert_close(small.load(layer=1, dtype=torch.float32), ref.load(layer=1), atol=2e-3, rtol=2e-3)
    for c in ("example", "role", "response", "offset", "position", "token", "prefix_hash"):
        assert np.array_equal(small.columns()[c], ref.columns()[c])


# --------------------------------------------------------------------------------- resume
def shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).glob("shard-*.safetensors"))}


class Stop(Exception):
    pass


def test_interrupted_run_resumes_byte_identical(tmp_path, tok):
    model = model_for("llama", tok)
    data = dataset(6)
    kwargs = dict(
        format="hpr", sites=["block_output", "mlp_output"], layers=[0, 1], shard_rows=60, batch_size=2, progress=False
    )
    full = collect_activations(model, tok, data, tmp_path / "full", **kwargs)
    expected = shard_bytes(tmp_path / "full")
    assert len(expected) >= 4

    seen = []

    def stop_after_two(entry):
        seen.append(entry["file"])
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        collect_activations(model, tok, data, tmp_path / "cut", on_shard=stop_after_two, **kwargs)
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore(tmp_path / "cut")
    partial = ActivationStore(tmp_path / "cut", allow_incomplete=True)
    assert len(list(partial.shards())) == 2
    # leftovers of a run killed while writing: a temporary file and an unlisted shard
    (tmp_path / "cut" / "shard-00002.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "cut" / "shard-00003.safetensors").write_bytes(b"unlisted")
    (tmp_path / "cut" / "notes.txt").write_text("the user's file")
    resumed_files = []
    store = collect_activations(
        model, tok, data, tmp_path / "cut", on_shard=lambda e: resumed_files.append(e["file"]), **kwargs
    )
    assert resumed_files == sorted(expected)[2:]  # only the missing shards were computed
    assert shard_bytes(tmp_path / "cut") == expected
    assert not list((tmp_path / "cut").glob("*.tmp")) and (tmp_path / "cut" / "notes.txt").exists()
    assert store.num_rows == full.num_rows
    # a complete store is returned as is
    again = []
    collect_activations(model, tok, data, tmp_path / "cut", on_shard=again.append, **kwargs)
    assert again == []


def test_killed_subprocess_resumes_byte_identical(tmp_path, tok):
    """A collection killed with SIGKILL (right after its second shard) resumes to the same bytes."""
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path[:0] = [{str(TESTS)!r}]
        import torch
        torch.set_num_threads(1)
        from conftest import make_tokenizer, tiny_model
        from test_data_collect import dataset
        from actedit.data.collect import collect_activations
        tok = make_tokenizer()
        model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512)
        count = []
        def on_shard(entry):
            count.append(entry)
            if len(count) == 2:
                print("READY", flush=True)
                time.sleep(120)
        collect_activations(model, tok, dataset(6), sys.argv[1], format="iti", layers=[0, 2], shard_rows=10,
                            batch_size=2, progress=False, on_shard=on_shard)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "killed")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    ready = False
    try:
        for line in proc.stdout:  # pyvene prints a notice first; EOF if the child died
            if line.strip() == "READY":
                ready = True
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ready, proc.stderr.read()[-2000:]
    assert len(ActivationStore(tmp_path / "killed", allow_incomplete=True).manifest["shards"]) == 2
    model = model_for("llama", tok)
    kwargs = dict(format="iti", layers=[0, 2], shard_rows=10, batch_size=2, progress=False)
    collect_activations(model, tok, dataset(6), tmp_path / "killed", **kwargs)
    collect_activations(model, tok, dataset(6), tmp_path / "clean", **kwargs)
    assert shard_bytes(tmp_path / "killed") == shard_bytes(tmp_path / "clean")
    assert len(shard_bytes(tmp_path / "clean")) > 2


def test_resume_refuses_other_arguments(tmp_path, tok):
    model = model_for("llama", tok)
    data = dataset(2)
    collect_activations(model, tok, data, tmp_path / "s", format="iti", layers=[0], progress=False)
    with pytest.raises(ValueError, match=r"other arguments \(layers"):
        collect_activations(model, tok, data, tmp_path / "s", format="iti", layers=[1], progress=False)
    with pytest.raises(ValueError, match="dataset"):
        collect_activations(model, tok, dataset(3), tmp_path / "s", format="iti", layers=[0], progress=False)
    other = model_for("llama", tok, seed=5)
    with pytest.raises(ValueError, match="weights_sha256"):
        collect_activations(other, tok, data, tmp_path / "s", format="iti", layers=[0], progress=False)
    with pytest.raises(ValueError, match="resume=True"):
        collect_activations(model, tok, data, tmp_path / "s", format="iti", layers=[0], resume=False, progress=False)
    store = collect_activations(
        model, tok, data, tmp_path / "s", format="iti", layers=[1], overwrite=True, progress=False
    )
    assert store.layers == [1]


# ----------------------------------------------------------------------------------- errors
def test_bad_inputs(tmp_path, tok):
    model = model_for("llama", tok)
    data = dataset(1)
    with pytest.raises(ValueError, match=r"unknown site 'resid'; valid sites: block_output, block_input"):
        collect_activations(model, tok, data, tmp_path / "a", format="hpr", sites="resid")
    with pytest.raises(ValueError, match="attention_value_output' and load it with heads=True"):
        collect_activations(model, tok, data, tmp_path / "a", format="hpr", sites="head_attention_value_output")
    with pytest.raises(ValueError, match=r"layer 3 is out of range: the model has 3 layers"):
        collect_activations(model, tok, data, tmp_path / "a", format="hpr", layers=[0, 3])
    with pytest.raises(ValueError, match="empty"):
        collect_activations(model, tok, [], tmp_path / "a", format="hpr")
    with pytest.raises(ValueError, match="reads PromptPair items but the dataset holds ContrastExample"):
        collect_activations(model, tok, data, tmp_path / "a", format="actadd")
    with pytest.raises(ValueError, match="unsupported store dtype"):
        collect_activations(model, tok, data, tmp_path / "a", format="hpr", dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        collect_activations(model, tok, data, tmp_path / "a", format="hpr", batch_size=0)
    with pytest.raises(ValueError, match="padding_side"):
        collect_activations(model, tok, data, tmp_path / "a", format="hpr", padding_side="middle")
    with pytest.raises(ValueError, match="pack_tokens must be a positive integer or None"):
        collect_activations(model, tok, data, tmp_path / "a", format="hpr", pack_tokens=0)
    with pytest.raises(ValueError, match="unknown format"):
        collect_activations(model, tok, data, tmp_path / "a", format="xyz")
    with pytest.raises(ValueError, match="example 0 of dataset 'toy'.*no base completion"):
        collect_activations(
            model,
            tok,
            ContrastDataset([ContrastExample("q", ["a"], ["b"])], name="toy"),
            tmp_path / "b",
            format="sea",
            progress=False,
        )
    # the failed run left a store without shards: a corrected run starts afresh
    fixed = ContrastDataset([ContrastExample("q", ["a"], ["b"], bases=["c"])], name="toy")
    assert collect_activations(model, tok, fixed, tmp_path / "b", format="sea", progress=False).num_rows == 3
    with pytest.raises(FileNotFoundError, match="No activation store"):
        ActivationStore(tmp_path / "nothing")
    assert not (tmp_path / "a").exists()  # validation happens before anything is written


def test_collection_gives_the_model_back_as_it_was(tok):
    """pyvene's wrapping freezes every weight and sets eval mode; the collector's own wrapper must
    not leave the user's model that way."""
    model = model_for("llama", tok).train()
    model.lm_head.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    collect_activations(model, tok, dataset(2), None, format="hpr", layers=[1], progress=False)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert any(flags.values()) and all(m.training for m in model.modules())
