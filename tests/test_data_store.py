"""Activation stores: a store written by hand (shard files and manifest, or the same shards in
memory) reads back exactly what was written, through every view (rows, columns, pairs, labeled
rows, aligned roles); incomplete stores, missing shard files and newer versions are refused; and
the views of stores that collect_activations wrote."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_data_collect import dataset, hooked_forward, model_for

from actedit.data.collect import collect_activations
from actedit.data.contrast import ContrastDataset, ContrastExample, PromptPair, PromptPairDataset
from actedit.data.formats import ActAddFormat, HPRFormat, SEAFormat
from actedit.data.store import COLUMNS, MANIFEST, ActivationStore, shard_name
from conftest import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# ------------------------------------------------------------------ a store written by hand
SITE = "block_output"
LAYERS = [0, 3]
WIDTH = 4
ROLE_IDS = {"pos": 0, "neg": 1, "base": 2}
# (example, role, response, read positions) of every sequence
SEQUENCES = [
    (0, "pos", 0, 3),
    (0, "neg", 0, 2),
    (0, "neg", 1, 3),
    (0, "base", 0, 1),
    (1, "pos", 0, 2),
    (1, "neg", 0, 2),
    (2, "pos", 0, 1),
    (2, "pos", 1, 2),
    (2, "neg", 0, 2),
]
SPLITS = {0: "train", 1: "eval", 2: "train"}
SHARD_EXAMPLES = [(0, 2), (2, 3)]  # [first, end) examples of each shard
SAME_TOKENS = ((2, "pos", 1, 0), (2, "neg", 0, 0))  # two rows that saw the same tokens (equal prefix hash)


class Written:
    """What was written: each row's key ``(example, role, response, offset)``, global index,
    columns and activations (per layer), in global row order."""

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        shuffle = random.Random(seed)
        self.keys, self.shards = [], []
        for first, end in SHARD_EXAMPLES:
            keys = [(ex, role, resp, off) for ex, role, resp, k in SEQUENCES if first <= ex < end for off in range(k)]
            shuffle.shuffle(keys)  # a reader must not rely on the order rows were written in
            self.keys += keys
            self.shards.append((first, end, len(keys)))
        self.row = {key: i for i, key in enumerate(self.keys)}
        n = len(self.keys)
        hashes = list(range(1000, 1000 + n))
        hashes[self.row[SAME_TOKENS[1]]] = hashes[self.row[SAME_TOKENS[0]]]
        self.columns = {
            "example": np.array([k[0] for k in self.keys]),
            "role": np.array([ROLE_IDS[k[1]] for k in self.keys]),
            "response": np.array([k[2] for k in self.keys]),
            "offset": np.array([k[3] for k in self.keys]),
            "position": np.array([7 + k[3] for k in self.keys]),
            "token": np.arange(50, 50 + n),
            "prefix_hash": np.array(hashes),
        }
        self.columns = {c: v.astype(np.int64) for c, v in self.columns.items()}
        self.acts = {layer: torch.randn(n, WIDTH, generator=gen) for layer in LAYERS}
        self.examples = [{"index": ex, "metadata": {"id": f"q{ex}", "split": SPLITS[ex]}} for ex in SPLITS]

    def shard_tensors(self):
        """(tensors, example records) per shard, as collect_activations holds them."""
        out, start = [], 0
        for first, end, rows in self.shards:
            part = slice(start, start + rows)
            tensors = {f"act.{SITE}.{layer}": self.acts[layer][part].contiguous() for layer in LAYERS}
            tensors.update({f"meta.{c}": torch.from_numpy(self.columns[c][part].copy()) for c in COLUMNS})
            out.append((tensors, self.examples[first:end]))
            start += rows
        return out

    def manifest(self, complete=True):
        return {
            "store_version": 1,
            "run": {"sites": [SITE], "format": {"name": "hand"}, "model": {}},
            "sites": {SITE: {"width": WIDTH}},
            "layers": LAYERS,
            "dtype": "float32",
            "complete": complete,
            "shards": [
                {"file": shard_name(i), "rows": rows, "examples": [first, end]}
                for i, (first, end, rows) in enumerate(self.shards)
            ],
        }

    def write(self, directory, complete=True):
        directory.mkdir(parents=True, exist_ok=True)
        for i, (tensors, records) in enumerate(self.shard_tensors()):
            save_file(tensors, str(directory / shard_name(i)), metadata={"actedit": json.dumps({"examples": records})})
        (directory / MANIFEST).write_text(json.dumps(self.manifest(complete)))
        return directory

    def expected_pairs(self, split=None, drop_identical=True):
        """(positive key, negative key) of every pair: per example, positive response i, negative
        response k, offsets up to the shorter of the two."""
        lengths = {(ex, role, resp): k for ex, role, resp, k in SEQUENCES}
        pairs = []
        for ex in sorted(SPLITS):
            if split is not None and SPLITS[ex] != split:
                continue
            positives = sorted(r for e, role, r in lengths if e == ex and role == "pos")
            negatives = sorted(r for e, role, r in lengths if e == ex and role == "neg")
            for i in positives:
                for k in negatives:
                    for off in range(min(lengths[(ex, "pos", i)], lengths[(ex, "neg", k)])):
                        pair = ((ex, "pos", i, off), (ex, "neg", k, off))
                        if not (drop_identical and pair == SAME_TOKENS):
                            pairs.append(pair)
        return pairs

    def stacked(self, keys, layer):
        return self.acts[layer][[self.row[key] for key in keys]]


@pytest.fixture(params=["directory", "memory"])
def written_store(request, tmp_path):
    written = Written()
    if request.param == "directory":
        return written, ActivationStore(written.write(tmp_path / "store"))
    return written, ActivationStore.in_memory(written.manifest(), written.shard_tensors())


def test_rows_columns_and_examples_read_back_as_written(written_store):
    written, store = written_store
    n = len(written.keys)
    assert store.num_rows == n and store.layers == LAYERS and store.sites == [SITE] and store.width(SITE) == WIDTH
    assert store.complete and store.dtype == torch.float32 and len(list(store.shards())) == 2
    for c in COLUMNS:
        assert np.array_equal(store.columns()[c], written.columns[c]), c
    assert store.examples == written.examples and store.splits == ["eval", "train"]
    for layer in LAYERS:
        assert torch.equal(store.load(SITE, layer), written.acts[layer])
    rows = [n - 1, 0, 4, n - 1, 2]  # unsorted, repeated, across both shards
    assert torch.equal(store.load(SITE, 3, rows=rows), written.acts[3][rows])
    assert torch.equal(store.load(layer=0, rows=[5], dtype=torch.float64), written.acts[0][[5]].double())
    assert store.load_layers(SITE, [3]).keys() == {3}
    eval_rows = store.rows_of(split="eval", roles=["neg"])
    assert sorted(eval_rows) == sorted(written.row[(1, "neg", 0, off)] for off in range(2))


@pytest.mark.parametrize("split,drop_identical", [(None, False), (None, True), ("train", True), ("eval", True)])
def test_paired_view_equals_the_pairs_written(written_store, split, drop_identical):
    written, store = written_store
    expected = written.expected_pairs(split, drop_identical)
    paired = store.paired_activations(SITE, split=split, drop_identical=drop_identical)
    assert paired.num_pairs == len(expected) and paired.layers == LAYERS
    hp, hn = paired.gather(LAYERS, torch.arange(paired.num_pairs))
    for i, layer in enumerate(LAYERS):
        assert torch.equal(hp[i], written.stacked([p for p, _ in expected], layer))
        assert torch.equal(hn[i], written.stacked([q for _, q in expected], layer))
    index = store.pair_index(split=split, drop_identical=drop_identical)
    assert [tuple(row) for row in index.index] == [(written.row[p], written.row[q]) for p, q in expected]
    assert list(index.offset) == [p[3] for p, _ in expected]
    assert [tuple(r) for r in index.responses] == [(p[2], q[2]) for p, q in expected]


def test_labeled_view_labels_positives_one_and_negatives_zero(written_store):
    written, store = written_store
    labeled = store.labeled(SITE, split="train", layers=[3])
    expected_rows = sorted(
        i for i, (ex, role, _, _) in enumerate(written.keys) if SPLITS[ex] == "train" and role in ("pos", "neg")
    )
    assert sorted(labeled.rows) == expected_rows
    for j, row in enumerate(labeled.rows):
        ex, role, _, _ = written.keys[row]
        assert labeled.labels[j] == (1 if role == "pos" else 0) and labeled.examples[j] == ex
        assert torch.equal(labeled.acts[3][j], written.acts[3][row])


def test_aligned_view_matches_roles_by_example_response_and_offset(written_store):
    written, store = written_store
    aligned = store.aligned(("pos", "neg"), SITE, split="eval")
    for layer in LAYERS:
        assert torch.equal(aligned["pos"][layer], written.stacked([(1, "pos", 0, off) for off in range(2)], layer))
        assert torch.equal(aligned["neg"][layer], written.stacked([(1, "neg", 0, off) for off in range(2)], layer))
    with pytest.raises(ValueError, match="roles 'pos' and 'neg' do not align one to one"):
        store.aligned(("pos", "neg"), SITE)  # example 0 has one positive and two negatives
    with pytest.raises(ValueError, match="no row of role 'base' in split 'eval'.*SEA needs base completions"):
        store.aligned(("base", "pos"), SITE, split="eval")


def test_incomplete_store_is_refused_unless_allowed(tmp_path):
    directory = Written().write(tmp_path / "store", complete=False)
    with pytest.raises(ValueError, match="is incomplete .2 shards written"):
        ActivationStore(directory)
    partial = ActivationStore(directory, allow_incomplete=True)
    assert not partial.complete and partial.num_rows == len(Written().keys)


def test_missing_shard_file_and_newer_version_are_errors(tmp_path):
    directory = Written().write(tmp_path / "store")
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / MANIFEST).write_text(json.dumps({**manifest, "store_version": 2}))
    with pytest.raises(ValueError, match="store version 2 is not supported"):
        ActivationStore(directory)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    (directory / shard_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match=r"shard file shard-00001\.safetensors is missing"):
        ActivationStore(directory)
    with pytest.raises(FileNotFoundError, match="No activation store"):
        ActivationStore(tmp_path / "nothing")


# ------------------------------------------------------------ stores collect_activations wrote
def test_store_views(tmp_path, tok):
    model = model_for("llama", tok)
    data = dataset(4)
    fmt = HPRFormat()
    store = collect_activations(
        model,
        tok,
        data,
        tmp_path / "hpr",
        format=fmt,
        sites=["block_output", "attention_value_output"],
        layers=[0, 1, 2],
        shard_rows=40,
        progress=False,
    )
    assert len(list(store.shards())) > 1
    everything = store.load("block_output", 2)
    rows = np.array([5, 0, store.num_rows - 1, 5])
    assert torch.equal(store.load("block_output", 2, rows=rows), everything[rows])
    heads = store.load("attention_value_output", 1, heads=True)
    assert heads.shape == (store.num_rows, 4, 8) and store.heads("attention_value_output") == (4, 8)
    assert torch.equal(heads.reshape(store.num_rows, -1), store.load("attention_value_output", 1))
    assert store.splits == ["eval", "train"]
    assert [e["metadata"]["id"] for e in store.examples] == ["q0", "q1", "q2", "q3"]
    # pairs: every (pos, neg) response pair, aligned offsets up to the shorter response
    pairs = store.pair_index(drop_identical=False)
    expected = 0
    for index, example in enumerate(data):
        seqs = fmt.encode(example, tok, index).sequences
        lengths = {(s.role, s.response): len(s.read_positions) for s in seqs}
        expected += sum(
            min(lengths[("pos", i)], lengths[("neg", k)])
            for i in range(len(example.positives))
            for k in range(len(example.negatives))
        )
    assert len(pairs) == expected
    cols = store.columns()
    assert (cols["role"][pairs.index[:, 0]] == 0).all() and (cols["role"][pairs.index[:, 1]] == 1).all()
    assert np.array_equal(cols["offset"][pairs.index[:, 0]], pairs.offset)
    assert np.array_equal(cols["offset"][pairs.index[:, 1]], pairs.offset)
    assert np.array_equal(cols["example"][pairs.index[:, 0]], cols["example"][pairs.index[:, 1]])
    train_pairs = store.pair_index(split="train")
    assert set(np.unique(train_pairs.example)) == {0, 2}
    paired = store.paired_activations("block_output", split="train", layers=[0, 2])
    from actedit.train.trainer import PairedActivations

    assert isinstance(paired, PairedActivations) and paired.layers == [0, 2] and paired.num_pairs == len(train_pairs)
    hp, hn = paired.gather([2], torch.arange(paired.num_pairs))
    torch.testing.assert_close(hp[0], everything[train_pairs.index[:, 0]])
    torch.testing.assert_close(hn[0], everything[train_pairs.index[:, 1]])
    labeled = store.labeled("block_output", split="eval", layers=[1])
    assert set(labeled.labels) == {0, 1} and set(labeled.examples) == {1, 3}
    assert torch.equal(labeled.acts[1], store.load("block_output", 1, rows=labeled.rows))
    with pytest.raises(ValueError, match="several sites"):
        store.load(layer=1)
    with pytest.raises(ValueError, match="not in this store"):
        store.load("mlp_output", 1)
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        store.load_layers("block_output", [7])
    with pytest.raises(ValueError, match="split 'test'"):
        store.pair_index(split="test")
    with pytest.raises(ValueError, match="do not align"):
        store.aligned(("pos", "neg"), "block_output")


def test_aligned_views_for_sea_and_actadd(tmp_path, tok):
    model = model_for("llama", tok)
    data = ContrastDataset(
        [
            ContrastExample(f"Question {i}?", [f"Right {i}."], [f"Wrong {i}."], {"id": i}, bases=[f"Maybe {i}."])
            for i in range(3)
        ]
    )
    sea = collect_activations(
        model, tok, data, tmp_path / "sea", format=SEAFormat(), sites="mlp_output", layers=[1, 2], progress=False
    )
    mats = sea.aligned(("base", "pos", "neg"), layers=[2])
    assert set(mats) == {"base", "pos", "neg"} and all(m[2].shape == (3, 32) for m in mats.values())
    ref = hooked_forward(model, SEAFormat().encode(data[1], tok).sequences[2].ids, ["mlp_output"], [2])
    torch.testing.assert_close(mats["base"][2][1], ref[("mlp_output", 2)][-1], atol=2e-5, rtol=1e-4)
    pairs = PromptPairDataset([PromptPair("Love", "Hate I talk about weddings")])
    act = collect_activations(
        model, tok, pairs, tmp_path / "actadd", format="actadd", sites="block_input", layers=[1], progress=False
    )
    m = act.aligned(("pos", "neg"))
    n = len(ActAddFormat().encode(pairs[0], tok).sequences[0].ids)
    assert m["pos"][1].shape == m["neg"][1].shape == (n, 32)


def test_identical_prefix_pairs_dropped(tmp_path, tok):
    """Responses that start with the same tokens give identical activations there: no contrast."""
    model = model_for("llama", tok)
    data = ContrastDataset([ContrastExample("Is the sky blue?", ["The sky is blue."], ["The sky is green."])])
    store = collect_activations(
        model, tok, data, tmp_path / "s", format=HPRFormat(lettered=False), layers=[0], progress=False
    )
    kept, every = store.pair_index(), store.pair_index(drop_identical=False)
    enc = HPRFormat(lettered=False).encode(data[0], tok).sequences
    start = enc[0].read_positions[0]
    same = 0
    while enc[0].ids[start + same] == enc[1].ids[start + same]:
        same += 1
    assert same >= 1 and len(every) - len(kept) == same
    acts = store.load(layer=0)
    dropped = every.index[:same]
    torch.testing.assert_close(acts[dropped[:, 0]], acts[dropped[:, 1]], atol=1e-5, rtol=0)


def test_in_memory_store_equals_the_directory_store(tmp_path, tok):
    """out_dir=None keeps the shards in memory; every view reads the same rows as from files."""
    model = model_for("llama", tok)
    data = dataset(4)
    kwargs = dict(format="hpr", layers=[0, 2], shard_rows=25, progress=False)
    on_disk = collect_activations(model, tok, data, tmp_path / "s", **kwargs)
    in_memory = collect_activations(model, tok, data, None, **kwargs)
    assert in_memory.path is None and "in memory" in repr(in_memory)
    assert len(in_memory.manifest["shards"]) == len(on_disk.manifest["shards"]) > 1
    assert in_memory.examples == on_disk.examples and in_memory.num_rows == on_disk.num_rows
    for layer in (0, 2):
        assert torch.equal(in_memory.load("block_output", layer), on_disk.load("block_output", layer))
    a, b = in_memory.paired_activations(split=None), on_disk.paired_activations(split=None)
    assert torch.equal(a.index, b.index)
    assert all(torch.equal(a.positive[layer], b.positive[layer]) for layer in (0, 2))
    assert not list(tmp_path.glob("**/*.tmp"))


def test_bfloat16_shards_are_memory_mapped_and_read_exactly(tmp_path, tok):
    """A bfloat16 store's shards are mapped as their raw 16-bit patterns: whole layers, chosen
    rows and streamed rows read back bit for bit what safetensors holds, in bfloat16."""
    model = model_for("llama", tok)
    store = collect_activations(
        model,
        tok,
        dataset(3),
        tmp_path / "bf16",
        format=HPRFormat(),
        layers=[0, 2],
        dtype="bfloat16",
        shard_rows=20,
        progress=False,
    )
    assert store.dtype == torch.bfloat16 and len(list(store.shards())) > 1
    written = {}
    for shard in store.shards():
        assert isinstance(shard.array("act.block_output.2"), np.memmap)
        with safe_open(str(shard.path), framework="pt") as handle:
            written.setdefault(2, []).append(handle.get_tensor("act.block_output.2"))
    whole = torch.cat(written[2])
    assert store.load(layer=2).dtype == torch.bfloat16 and torch.equal(store.load(layer=2), whole)
    rows = np.array([store.num_rows - 1, 0, 5, 5])
    assert torch.equal(store.load(layer=2, rows=rows), whole[rows])
    assert torch.equal(store.load(layer=2, rows=rows, dtype=torch.float32), whole[rows].float())
    streamed = store.paired_activations(layers=[2], stream=True)
    in_memory = store.paired_activations(layers=[2])
    idx = torch.arange(streamed.num_pairs)
    for a, b in zip(streamed.gather([2], idx), in_memory.gather([2], idx), strict=True):
        assert torch.equal(a, b)
