"""Packed forward calls: many sequences that share prefixes, in one row, with a block mask.

Scoring and activation collection run many short sequences that share a prefix (a question's
context and its choices; a prompt and its responses). Running them as right-padded batches on a
copied KV cache wastes time on padding, on cache copies and on small matrix products. Packing
instead lays out *trees* one after another in a row::

    row:  [trunk₀ | branch₀,₀ | branch₀,₁ | … | trunk₁ | branch₁,₀ | …]

and gives the model a 4-D attention mask in which a token sees

* every cached position (a prefix shared by every tree, e.g. TruthfulQA's primer), and
* the earlier tokens of its own tree's trunk, and
* the earlier tokens of its own branch,

with explicit ``position_ids`` that continue each trunk into each of its branches. With
``share_prefixes`` the branches of a tree are laid out as a token trie: leading tokens several
branches share (TruthfulQA's " No, ", " The ") run once, and a token sees its ancestors in the
trie. Each tree is laid out depth-first, so a token's descendants are exactly the columns from it
to its ``subtree_end``, and the mask is ``key ≤ query < subtree_end[key]``. Every token's
hidden states are therefore those of the plain sequence ``cache + trunk + branch`` (to float
rounding: the sums run over a different set of masked entries). No padding and no copies of a
KV cache: README's benchmarks (``benchmarks/bench_scoring.py --compare-modes``,
``benchmarks/bench_collect.py``) measure what this gains over padded batches.

:func:`capture_layer_outputs` and :func:`skip_layers` let several edits of one model share the
unedited layers below their lowest edited layer (see :func:`actedit.eval.mc.score_mc_many`).

Requirements: the model builds its mask with transformers' ``masking_utils`` (which passes a 4-D
mask through unchanged) and uses ``sdpa`` or ``eager`` attention; :func:`supports_packing`
checks this. Interventions that act position by position see, through
:func:`~actedit.interventions.positions.mark_packed`, each token's position in *its own*
sequence, so position policies give the same edits as in a plain forward.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
from pyvene.models import intervenable_modelcard as card
from torch.types import Device

DEFAULT_PACK_TOKENS = 512
"""Tokens per packed row. On a 2-core CPU (SmolLM2-135M, fp32) TruthfulQA scoring took 13.0 s
with 512, 14.4 s with 384, 13.7 s with 1024 and 17.6 s with 768 (one run each, 60 questions):
big enough for efficient matrix products, small enough that the dense mask wastes little."""

PACKING_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take an arbitrary additive 4-D mask."""


@dataclass
class Tree:
    """Sequences sharing a trunk: ``trunk + branches[i]`` for every branch.

    Attributes:
        trunk: tokens every branch continues (may be empty only when there is exactly one
            branch, i.e. a plain sequence).
        branches: continuations of the trunk (each may be empty).
        offset: position of the trunk's first token, i.e. the number of cached tokens before it.
    """

    trunk: Sequence[int]
    branches: Sequence[Sequence[int]] = ()
    offset: int = 0

    def __post_init__(self) -> None:
        if not self.trunk and len(self.branches) != 1:
            raise ValueError("a tree with an empty trunk must have exactly one branch.")
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}.")

    @property
    def num_tokens(self) -> int:
        return len(self.trunk) + sum(len(b) for b in self.branches)


@dataclass
class PackedBatch:
    """A batch of packed rows and where every tree landed.

    Attributes:
        input_ids, position_ids: ``(rows, width)``; padding has id ``pad_id`` and position 0.
        tree: ``(rows, width)`` index (into :attr:`trees`) of each token's tree; -1 for padding.
        subtree_end: ``(rows, width)`` the column after the last token that sees this one (its
            descendants in the layout); ``column + 1`` for padding.
        trees: the indices of the packed trees in the list given to :func:`pack_trees`.
        trunk_at: ``(row, column)`` of each tree's first trunk token (column of where it would
            start when the trunk is empty); the whole tree lies in that row.
        branch_columns: per tree, per branch, the column of each of the branch's tokens (shared
            leading tokens have the same columns in several branches with ``share_prefixes``).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    tree: torch.Tensor
    subtree_end: torch.Tensor
    trees: List[int] = field(default_factory=list)
    trunk_at: List[Tuple[int, int]] = field(default_factory=list)
    branch_columns: List[List[List[int]]] = field(default_factory=list)

    @property
    def shape(self) -> Tuple[int, int]:
        return cast(Tuple[int, int], tuple(self.input_ids.shape))

    @property
    def real(self) -> torch.Tensor:
        """``(rows, width)`` True for real tokens."""
        return self.tree >= 0

    def attention_mask(
        self, past_length: int = 0, dtype: torch.dtype = torch.float32, device: Device = None
    ) -> torch.Tensor:
        """The additive ``(rows, 1, width, past_length + width)`` mask (0 = attend, dtype min = not).

        Query ``q`` sees key ``k`` of its row when ``k ≤ q < subtree_end[k]`` (``k`` is ``q`` or
        one of its ancestors: its tree's trunk before it, its branch before it). Cached positions
        are visible to every real token; a padding token sees only itself (a row with nothing
        visible would give NaN in attention). ``dtype`` is the model's; a non-floating one
        (quantised weights) gives a float32 mask.
        """
        if not dtype.is_floating_point:
            dtype = torch.float32
        width = self.tree.shape[1]
        col = torch.arange(width)
        allowed = (col[None, None, :] <= col[None, :, None]) & (col[None, :, None] < self.subtree_end[:, None, :])
        if past_length:
            past = self.real[:, :, None].expand(-1, -1, past_length)
            allowed = torch.cat([past, allowed], dim=2)
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None].to(device) if device is not None else mask[:, None]


@dataclass
class _TreeLayout:
    """One tree laid out depth-first, columns counted from the tree's first column."""

    tokens: List[int]
    depth: List[int]  # position of each token after the tree's offset
    subtree_end: List[int]
    branch_columns: List[List[int]]


def _layout(tree: Tree, share_prefixes: bool) -> _TreeLayout:
    """The trunk, then the branches' tokens as a trie (one chain per branch when not sharing),
    in depth-first order: every token's descendants directly follow it."""
    n_trunk = len(tree.trunk)
    node_token: List[int] = []
    node_depth: List[int] = []
    children: List[List[int]] = [[]]  # node 0: the trunk's end; node i + 1: branch token node i
    child_of: Dict[Tuple[int, int], int] = {}
    paths: List[List[int]] = []
    for branch in tree.branches:
        parent, path = 0, []
        for j, token in enumerate(branch):
            node = child_of.get((parent, token)) if share_prefixes else None
            if node is None:
                node_token.append(int(token))
                node_depth.append(n_trunk + j)
                children.append([])
                node = len(node_token)
                children[parent].append(node)
                if share_prefixes:
                    child_of[(parent, token)] = node
            path.append(node)
            parent = node
        paths.append(path)
    size = [1] * (len(node_token) + 1)
    for node in range(len(node_token), 0, -1):  # children are created after their parents
        for child in children[node]:
            size[node] += size[child]
    column = [0] * (len(node_token) + 1)
    tokens, depth, subtree_end = list(tree.trunk), list(range(n_trunk)), []
    stack = list(reversed(children[0]))
    while stack:
        node = stack.pop()
        column[node] = len(tokens)
        tokens.append(node_token[node - 1])
        depth.append(node_depth[node - 1])
        subtree_end.append(column[node] + size[node])
        stack.extend(reversed(children[node]))
    subtree_end = [len(tokens)] * n_trunk + subtree_end
    return _TreeLayout(tokens, depth, subtree_end, [[column[n] for n in path] for path in paths])


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens every sequence of ``sequences`` shares (the trunk a packed
    tree can hold once)."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        k = 0
        while k < n and seq[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return n


def pack_trees(
    trees: Sequence[Tree], max_tokens: int, max_rows: int = 1, pad_id: int = 0, share_prefixes: bool = False
) -> List[PackedBatch]:
    """Lay ``trees`` out, in order, in rows of at most ``max_tokens`` tokens, ``max_rows`` rows per batch.

    A tree longer than ``max_tokens`` gets a row of its own. Rows of one batch are right-padded
    to the longest. ``share_prefixes``: leading tokens that several branches of a tree share are
    laid out once (a token trie); a token's hidden states are still those of its own sequence,
    but a token shared by several branches has one position per call, so per-token marks
    (:func:`~actedit.interventions.positions.mark_packed`) must not differ between them.
    """
    if max_tokens < 1 or max_rows < 1:
        raise ValueError("max_tokens and max_rows must be at least 1.")
    layouts = [_layout(t, share_prefixes) for t in trees]
    rows: List[List[int]] = []  # tree indices per row
    used = 0
    for i, layout in enumerate(layouts):
        n = len(layout.tokens)
        if rows and used + n <= max_tokens:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = n
    return [_build(trees, layouts, rows[lo : lo + max_rows], pad_id) for lo in range(0, len(rows), max_rows)]


def _build(trees: Sequence[Tree], layouts: Sequence[_TreeLayout], rows: List[List[int]], pad_id: int) -> PackedBatch:
    width = max(sum(len(layouts[i].tokens) for i in row) for row in rows)
    shape = (len(rows), max(width, 1))
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    tree_of = torch.full(shape, -1, dtype=torch.long)
    subtree_end = torch.arange(1, shape[1] + 1).repeat(shape[0], 1)  # padding: itself only
    batch = PackedBatch(ids, pos, tree_of, subtree_end)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            layout, k = layouts[i], len(batch.trees)
            n = len(layout.tokens)
            batch.trees.append(i)
            batch.trunk_at.append((r, col))
            if n:
                ids[r, col : col + n] = torch.tensor(layout.tokens, dtype=torch.long)
                pos[r, col : col + n] = torch.tensor(layout.depth, dtype=torch.long) + trees[i].offset
                tree_of[r, col : col + n] = k
                subtree_end[r, col : col + n] = torch.tensor(layout.subtree_end, dtype=torch.long) + col
            batch.branch_columns.append([[col + c for c in columns] for columns in layout.branch_columns])
            col += n
    return batch


def supports_packing(model: Any, longest: Optional[int] = None) -> Optional[str]:
    """None when ``model`` can run packed rows; otherwise the reason it cannot.

    Packing needs the model to build its attention mask with transformers' ``masking_utils``
    (which passes a ready 4-D mask through) and an attention implementation that applies an
    arbitrary additive mask (``sdpa``, ``eager``). A ready mask also replaces sliding-window
    masks, so a model with a sliding window packs only sequences no longer than the window
    (``longest``: the longest sequence, when known).
    """
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn not in PACKING_ATTENTION:
        return f"attention implementation {attn!r} (packing needs one of {PACKING_ATTENTION})"
    module = sys.modules.get(type(model).__module__)
    if module is None or not hasattr(module, "create_causal_mask"):
        return f"{type(model).__name__} does not build its mask with transformers' masking_utils"
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 0 and (longest is None or longest > window):
        return (
            f"sliding-window attention ({window} tokens) and sequences of "
            f"{'unknown length' if longest is None else f'{longest} tokens'}"
        )
    return None


def decoder_layer(model: Any, layer: int) -> torch.nn.Module:
    """Decoder layer ``layer`` of ``model``, found through pyvene's module table."""
    path = card.type_to_module_mapping[type(model)]["block_output"][0] % layer
    module: Any = model
    for part in path.split("."):
        name, _, index = part.partition("[")
        module = getattr(module, name)
        if index:
            module = module[int(index.rstrip("]"))]
    return cast(torch.nn.Module, module)


@contextlib.contextmanager
def capture_layer_outputs(model: Any, layers: Sequence[int], kept: Dict[int, Any]) -> Iterator[None]:
    """Keep, in ``kept[layer]``, what each decoder layer in ``layers`` returns during the block."""

    def keeper(layer: int) -> Callable[[torch.nn.Module, Tuple[Any, ...], Any], None]:
        def hook(module: torch.nn.Module, args: Tuple[Any, ...], output: Any) -> None:
            kept[layer] = output

        return hook

    handles = [decoder_layer(model, layer).register_forward_hook(keeper(layer)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def skip_layers(model: Any, first: int, output: Any) -> Iterator[None]:
    """Decoder layers ``0 .. first-1`` do not run during the block; each returns ``output``.

    ``output`` must be what layer ``first - 1`` returned for the very same forward call of the
    unedited model (:func:`capture_layer_outputs`): layer ``first`` then receives exactly the
    hidden states it would have computed. The skipped layers add nothing to a KV cache, so this
    is only for calls whose later calls do not attend to these positions (packed scoring).
    """
    modules = [decoder_layer(model, layer) for layer in range(first)]

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        # a copy: pyvene may write an edit into its input in place (block_input of layer `first`)
        if isinstance(output, tuple):
            return (output[0].clone(),) + output[1:]
        return output.clone()

    for module in modules:
        module.forward = passthrough  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward


__all__ = [
    "DEFAULT_PACK_TOKENS",
    "PACKING_ATTENTION",
    "capture_layer_outputs",
    "common_prefix_length",
    "decoder_layer",
    "skip_layers",
    "PackedBatch",
    "Tree",
    "pack_trees",
    "supports_packing",
]
