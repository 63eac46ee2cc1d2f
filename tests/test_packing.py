"""Packed rows: layout, the block mask against its definition, and packed forwards equal to
plain forwards of every sequence (with and without a cached prefix, several model families)."""

import pytest
import torch

from actedit.interventions import build_caa_config, compat, intervenable
from actedit.interventions.packing import Tree, pack_trees, supports_packing
from actedit.interventions.positions import mark_packed
from conftest import tiny_model

TREES = [
    Tree([5, 6, 7], [[8, 9], [10], []]),
    Tree([11], [[12, 13, 14]]),
    Tree([], [[15, 16, 17, 18]]),
    Tree([19, 20], [[21], [22, 23]]),
    Tree([24], [[25, 26, 27], [25, 26, 28], [25, 29], [25, 26], [30]]),  # shared leading tokens
]


def columns_of(batch, k, tree, b):
    """Row and columns of the sequence ``tree.trunk + tree.branches[b]`` (tree k of ``batch``)."""
    r, c = batch.trunk_at[k]
    return r, list(range(c, c + len(tree.trunk))) + batch.branch_columns[k][b]


@pytest.mark.parametrize("share_prefixes", [False, True])
def test_layout_and_mask_follow_the_definition(share_prefixes):
    (batch,) = pack_trees(TREES, max_tokens=100, share_prefixes=share_prefixes)
    # TREES[4]'s branches share 25 (four times) and 25 26 (twice more): 5 tokens fewer as a trie
    assert batch.shape == (1, sum(t.num_tokens for t in TREES) - (5 if share_prefixes else 0))
    assert batch.trees == [0, 1, 2, 3, 4]
    # every sequence can be read back from the layout, at its own positions
    sequences_at = []
    for k, tree in enumerate(TREES):
        for b, branch in enumerate(tree.branches):
            r, cols = columns_of(batch, k, tree, b)
            assert batch.input_ids[r, cols].tolist() == list(tree.trunk) + list(branch)
            assert batch.position_ids[r, cols].tolist() == list(range(len(cols)))
            assert cols == sorted(cols)
            sequences_at.append(set(cols))
    # a token sees exactly the earlier tokens of the sequences it belongs to
    mask = batch.attention_mask(past_length=2)[0, 0] == 0
    for i in range(batch.shape[1]):
        assert mask[i, :2].all()  # the cached prefix is visible to every token
        for j in range(batch.shape[1]):
            expected = j <= i and any(i in seq and j in seq for seq in sequences_at)
            assert bool(mask[i, 2 + j]) == expected, (i, j)


def test_shared_tokens_run_once():
    tree = Tree([24], [[25, 26, 27], [25, 26, 28], [25, 29], [25, 26], [30]])
    (batch,) = pack_trees([tree], max_tokens=100, share_prefixes=True)
    assert batch.input_ids[0].tolist() == [24, 25, 26, 27, 28, 29, 30]  # depth first
    assert batch.branch_columns[0] == [[1, 2, 3], [1, 2, 4], [1, 5], [1, 2], [6]]
    assert batch.subtree_end[0].tolist() == [7, 6, 5, 4, 5, 6, 7]


def test_rows_batches_and_padding():
    batches = pack_trees(TREES, max_tokens=6, max_rows=2, pad_id=99)
    assert [b.trees for b in batches] == [[0, 1], [2, 3], [4]]
    first = batches[0]
    assert first.shape == (2, 6)  # tree 0 (6 tokens) alone; tree 1 (4) padded to 6
    assert first.input_ids[1, 4:].tolist() == [99, 99] and not first.real[1, 4:].any()
    mask = first.attention_mask()[:, 0] == 0
    assert mask[1, 4, 4] and mask[1, 4].sum() == 1  # padding sees only itself: no NaN rows
    assert pack_trees([Tree([1] * 10, [[2]])], max_tokens=4)[0].shape == (1, 11)  # too long: own row
    with pytest.raises(ValueError, match="exactly one branch"):
        Tree([], [[1], [2]])
    with pytest.raises(ValueError, match="at least 1"):
        pack_trees(TREES, max_tokens=0)


@pytest.mark.parametrize(
    "family,share_prefixes", [(f, False) for f in ["llama", "qwen2", "gpt2", "gemma", "mistral"]] + [("llama", True)]
)
def test_packed_forward_equals_plain_forwards(family, share_prefixes):
    model = tiny_model(family).double()
    assert supports_packing(model) is None
    prefix = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        cache = compat.returned_cache(model(prefix, use_cache=True))
        trees = [Tree(t.trunk, t.branches, offset=4) if t.trunk else Tree([25], t.branches, offset=4) for t in TREES]
        (batch,) = pack_trees(trees, max_tokens=9, max_rows=5, share_prefixes=share_prefixes)
        packed = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask(4, torch.float64),
            use_cache=True,
            **{
                compat.cache_keyword(model): compat.select_cache_rows(
                    cache, torch.zeros(batch.shape[0], dtype=torch.long)
                )
            },
        ).logits
        for k, tree in enumerate(trees):
            r, c = batch.trunk_at[k]
            for columns, branch in zip(batch.branch_columns[k], tree.branches, strict=True):
                if not branch:
                    continue
                plain = model(torch.tensor([[1, 2, 3, 4] + list(tree.trunk) + list(branch)])).logits[0]
                torch.testing.assert_close(packed[r, columns], plain[-len(branch) :], rtol=0, atol=1e-10)
            plain = model(torch.tensor([[1, 2, 3, 4] + list(tree.trunk)])).logits[0]
            torch.testing.assert_close(packed[r, c : c + len(tree.trunk)], plain[4:], rtol=0, atol=1e-10)


def test_marked_positions_drive_the_policies():
    """A CAA edit with the answer policy, on packed rows: equal to each sequence on its own."""
    model = tiny_model("llama").double()
    torch.manual_seed(0)
    config = build_caa_config(
        model, {1: torch.randn(model.config.hidden_size)}, multiplier=2.0, position_policy="answer"
    )
    pvm = intervenable(model, config)
    for module in pvm.interventions.values():
        (module[0] if isinstance(module, tuple) else module).double()
    tree = Tree([5, 6, 7], [[8, 9], [10, 11, 12]])
    (batch,) = pack_trees([tree], max_tokens=50)
    answer = torch.where(batch.real, torch.tensor(3), -1)
    prompt = torch.tensor([[4, 4, 4, 5, 5, 6, 6, 6]])
    with torch.no_grad(), mark_packed(batch.position_ids, prompt, answer):
        _, out = pvm(
            {
                "input_ids": batch.input_ids,
                "position_ids": batch.position_ids,
                "attention_mask": batch.attention_mask(0, torch.float64),
            },
            unit_locations=None,
        )
    from actedit.interventions import mark_answer_starts

    for columns, branch in zip(batch.branch_columns[0], tree.branches, strict=True):
        ids = torch.tensor([[5, 6, 7] + branch])
        with torch.no_grad(), mark_answer_starts([3]):
            _, plain = pvm({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, unit_locations=None)
        torch.testing.assert_close(out.logits[0, columns], plain.logits[0, 3:], rtol=0, atol=1e-10)
        with torch.no_grad():
            unedited = model(ids).logits[0, 3:]
        assert (unedited - plain.logits[0, 3:]).abs().max() > 1e-3  # the edit acts on the answer


def test_supports_packing_names_the_reason():
    model = tiny_model("llama")

    class OwnMaskModel(torch.nn.Module):  # a model whose module does not use masking_utils
        config = model.config

    assert "masking_utils" in supports_packing(OwnMaskModel())
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in supports_packing(model)


def test_sliding_window_models_pack_only_sequences_inside_the_window():
    model = tiny_model("mistral", sliding_window=16)
    assert supports_packing(model, longest=16) is None
    assert "sliding-window attention (16 tokens)" in supports_packing(model, longest=17)
    assert "unknown length" in supports_packing(model)
