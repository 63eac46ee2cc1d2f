"""Activation collection through pyvene interventions, into a store on disk or in memory.

:func:`collect_activations` runs a model over a contrast dataset in a prompt format
(:mod:`actedit.data.formats`) and stores the activations at the format's reading positions for
every requested (site, layer); :class:`~actedit.data.store.ActivationStore` reads them back.

How collection works
--------------------
* **Through pyvene.** One :class:`~actedit.interventions.collector.ActivationCollector` (copies
  the rows it is told to and returns its input unchanged) sits at every (site, layer); the model
  runs as ``IntervenableModel(base, unit_locations=None)``. No ``output_hidden_states`` (pyvene
  removes the hooks that implement it under transformers 5).
* **Sites** (:data:`~actedit.data.store.SITES`): ``block_output`` (residual stream after decoder
  layer L), ``block_input`` (before it), ``mlp_output``, ``attention_value_output`` (the o_proj
  input, all heads concatenated; :meth:`ActivationStore.load` splits it into heads on request).
* **Only what is needed.** Each forward pass stops when the decoder layer after the deepest
  collected layer starts (a pre-hook raises a private exception that pyvene lets through after
  cleaning up), and the LM head computes one position (``logits_to_keep=1``).
* **Packed rows** (the fast path, default: ``pack_tokens``, for models that take a 4-D mask, see
  :func:`~actedit.interventions.packing.supports_packing`). The sequences of one example (HPR's
  responses to one question, ITI's answers, ...) share a prefix: each example becomes a tree, its
  shared prefix (at least :data:`MIN_SHARED_PREFIX` tokens) the trunk and each sequence's rest a
  branch, and consecutive trees fill rows of ``pack_tokens`` tokens with a block mask and
  explicit positions. No padding, no KV-cache copies, large matrix products; positions read
  inside a trunk are read once and copied to each sequence's rows.
* **Padded batches** (the reference, ``pack_tokens=None``, and models that cannot pack): whole
  sequences, longest first, in batches of ``batch_size`` padded on ``padding_side`` (default: the
  tokenizer's). Position ids come from the attention mask, so a padded row gives the activations
  of the unpadded sequence (up to float rounding). The tests compare the two paths.
* **Shards.** Examples are cut into shards of about ``shard_rows`` rows (derived from
  ``shard_mb`` by default; a shard ends after the example that reaches it). A shard's
  activations are held in memory, then either kept there (``out_dir=None``: an in-memory store)
  or written as one safetensors file (``shard-00000.safetensors``: ``act.<site>.<layer>``
  matrices (rows, width) in the store dtype, ``meta.<column>`` int64 vectors, example metadata as
  JSON under the header metadata key ``actedit``) through a temporary file and ``os.replace``, and
  only then listed in ``manifest.json`` (also replaced atomically). Memory is bounded by one
  shard plus one batch, whatever the dataset size.
* **Resume** (a directory). A run that stops (crash, kill, Ctrl-C) leaves a manifest listing its
  complete shards. Calling :func:`collect_activations` again with the same arguments verifies them
  and continues with the next shard. Shard boundaries and batches depend only on the data and the
  arguments, so the resumed shards are byte-identical to those of an uninterrupted run on the
  same machine and library versions. Different arguments (model, data, format, sites, layers,
  dtype, batching) are refused unless ``overwrite=True``.
* **Several processes** (``torchrun``/``accelerate launch``, :mod:`actedit.data.distributed`).
  Every process plans the same shards (tokenising is cheap) and collects those dealt to it in
  turn (shard k of this run: rank k mod N), writing its own shard files into the one directory
  (a directory all processes see). After each round of N shards the processes exchange their
  manifest entries and rank 0 lists them in shard order in the manifest, so the store, its
  manifest and its resume points are those of one process (same shards, same tensors, on the
  same hardware); only rank 0 checks, cleans and writes the manifest. An in-memory store is
  collected the same way and gathered whole on every process.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
import pyvene as pv
import torch
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from actedit.interventions import compat
from actedit.interventions.artifacts import file_sha256
from actedit.interventions.collector import ActivationCollector
from actedit.interventions.devices import input_device
from actedit.interventions.edits import actedit_version, check_layers, model_signature, site_width
from actedit.interventions.files import TEMP_SUFFIX, write_atomic, write_json
from actedit.interventions.packing import (
    DEFAULT_PACK_TOKENS,
    Tree,
    common_prefix_length,
    decoder_layer,
    pack_trees,
    supports_packing,
)

from .contrast import ROLES, ContrastDataset, PromptPairDataset, as_dataset
from .distributed import World, all_gather_objects, barrier, owner_of, run_on_main, world
from .environment import environment
from .formats import EncodedExample, PromptFormat, get_format, pad_id, tokenizer_fingerprint
from .models import weights_digest
from .store import (
    COLUMNS,
    HEAD_SITES,
    MANIFEST,
    SHARD_PREFIX,
    SITES,
    STORE_DTYPES,
    STORE_VERSION,
    ActivationStore,
    shard_name,
)

MIN_SHARED_PREFIX = 4
"""Shortest common prefix (tokens) of an example's sequences that packing shares as a trunk."""


# ------------------------------------------------------------------------------ validation
def check_sites(model, sites: Union[str, Sequence[str]]) -> List[str]:
    """Validate site names against :data:`~actedit.data.store.SITES` and the model's pyvene tables."""
    if isinstance(sites, str):
        sites = [sites]
    sites = list(sites)
    if not sites:
        raise ValueError(f"at least one site is needed; valid sites: {', '.join(SITES)}.")
    for site in sites:
        if site not in SITES:
            hint = (
                " (per-head activations: collect 'attention_value_output' and load it with heads=True)"
                if site == "head_attention_value_output"
                else ""
            )
            raise ValueError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}{hint}.")
        compat.check_model_supported(model, site)
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate sites in {sites}.")
    return sites


def check_dtype(dtype: Union[str, torch.dtype]) -> Tuple[str, torch.dtype]:
    """``(name, torch dtype)`` of a store dtype given by name or torch dtype."""
    for name, value in STORE_DTYPES.items():
        if dtype == name or dtype is value:
            return name, value
    raise ValueError(f"unsupported store dtype {dtype!r}; choose one of {', '.join(STORE_DTYPES)}.")


def _hash64(h) -> int:
    return int.from_bytes(h.digest(), "little", signed=True)


# ---------------------------------------------------------------------------------- plans
@dataclass
class _Seq:
    ids: List[int]
    reads: List[int]
    dest: int


@dataclass
class _Group:
    example: int
    seqs: List[_Seq]
    prefix: int


@dataclass
class _ShardPlan:
    index: int
    start: int
    end: int
    groups: List[_Group]
    columns: Dict[str, np.ndarray]
    examples: List[Dict[str, Any]]

    @property
    def num_rows(self) -> int:
        return int(self.columns["example"].shape[0])


def _plan_shard(
    dataset, fmt: PromptFormat, tokenizer, index: int, start: int, shard_rows: int, share_prefix: bool
) -> _ShardPlan:
    """Encode examples from ``start`` until the shard holds at least ``shard_rows`` rows."""
    cols: Dict[str, List[int]] = {c: [] for c in COLUMNS}
    groups: List[_Group] = []
    examples: List[Dict[str, Any]] = []
    i = start
    while i < len(dataset) and (not groups or len(cols["example"]) < shard_rows):
        example = dataset[i]
        try:
            encoded: EncodedExample = fmt.encode(example, tokenizer, i)
        except ValueError as exc:
            raise ValueError(f"example {i} of dataset {dataset.name!r}: {exc}") from None
        seqs = []
        for s in encoded.sequences:
            if s.role not in ROLES:
                raise ValueError(f"format {fmt.name!r} produced an unknown role {s.role!r}; roles: {ROLES}.")
            seqs.append(_Seq(list(s.ids), list(s.read_positions), len(cols["example"])))
            h = hashlib.blake2b(digest_size=8)
            reads = set(s.read_positions)
            hashes = []
            for pos, token in enumerate(s.ids):
                h.update(int(token).to_bytes(8, "little", signed=True))
                if pos in reads:
                    hashes.append(_hash64(h.copy()))
            for offset, pos in enumerate(s.read_positions):
                cols["example"].append(i)
                cols["role"].append(ROLES.index(s.role))
                cols["response"].append(s.response)
                cols["offset"].append(offset)
                cols["position"].append(pos)
                cols["token"].append(int(s.ids[pos]))
                cols["prefix_hash"].append(hashes[offset])
        prefix = common_prefix_length([s.ids for s in seqs]) if share_prefix and len(seqs) > 1 else 0
        groups.append(_Group(i, seqs, prefix if prefix >= MIN_SHARED_PREFIX else 0))
        examples.append({"index": i, "metadata": dict(example.metadata)})
        i += 1
    columns = {c: np.asarray(v, dtype=np.int64) for c, v in cols.items()}
    return _ShardPlan(index, start, i, groups, columns, examples)


# ------------------------------------------------------------------------------- running
class _StopForward(Exception):
    """Raised after the deepest collected layer: the rest of the forward pass is not needed."""


def _raise_stop(module, args, kwargs):
    raise _StopForward


class _CollectionRunner:
    """Forward passes through a pyvene model holding collectors: packed rows, or padded batches."""

    def __init__(
        self,
        model,
        sites: List[str],
        layers: List[int],
        pad: int,
        padding_side: str,
        store_dtype: torch.dtype,
        widths: Dict[str, int],
        pack_tokens: Optional[int] = None,
    ):
        compat.apply()
        self.model = model
        self.keys = [(site, layer) for site in sites for layer in layers]
        self.collectors = {key: ActivationCollector(record_all=False) for key in self.keys}
        config = pv.IntervenableConfig(
            representations=[
                {"layer": layer, "component": site, "intervention": self.collectors[(site, layer)]}
                for site, layer in self.keys
            ]
        )
        self.pvm = pv.IntervenableModel(config, model)
        self.device = input_device(model)  # its embedding's device, under a device_map too
        self.pad_id = pad
        self.left = padding_side == "left"
        self.store_dtype = store_dtype
        self.widths = widths
        params = inspect.signature(model.forward).parameters
        self.extra = {}
        if "logits_to_keep" in params:  # the LM head is not needed: keep one position
            self.extra["logits_to_keep"] = 1
        elif "num_logits_to_keep" in params:
            self.extra["num_logits_to_keep"] = 1
        self.tokens = 0
        self.pack_tokens = pack_tokens
        self.buffers: Dict[Tuple[str, int], torch.Tensor] = {}
        # Stop each forward pass when the layer after the deepest collected one starts.
        deepest = max(layers)
        n_layers = int(getattr(model.config, "num_hidden_layers", deepest + 1))
        self.stop_module = decoder_layer(model, deepest + 1) if deepest + 1 < n_layers else None

    def _forward(self, ids, mask, position_ids, reads: Tuple[List[int], List[int]], n_tokens: int):
        rows = torch.as_tensor(reads[0], dtype=torch.long, device=self.device) if reads[0] else None
        cols = torch.as_tensor(reads[1], dtype=torch.long, device=self.device) if reads[0] else None
        for collector in self.collectors.values():
            collector.select(rows, cols)
        base = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": position_ids.to(self.device),
            "use_cache": False,
            **self.extra,
        }
        handle = (
            self.stop_module.register_forward_pre_hook(_raise_stop, with_kwargs=True)
            if self.stop_module is not None
            else None
        )
        try:
            self.pvm(base, unit_locations=None)
        except _StopForward:
            pass
        finally:
            if handle is not None:
                handle.remove()
            outs = {key: (c.records[-1] if c.records else None) for key, c in self.collectors.items()}
            for collector in self.collectors.values():
                collector.select(None, None)
        self.tokens += n_tokens
        if rows is not None:
            for key, out in outs.items():
                if out is None:
                    raise RuntimeError(
                        f"pyvene did not call the collector at {key[0]} layer {key[1]}; "
                        "the model's forward did not reach that module."
                    )
                if out.shape[-1] != self.widths[key[0]]:
                    raise RuntimeError(
                        f"{key[0]} layer {key[1]} has width {out.shape[-1]}, expected "
                        f"{self.widths[key[0]]} (pyvene's tables disagree with the model)."
                    )
        return outs

    def _store(self, outs, src: List[int], dest: List[int]) -> None:
        if not dest:
            return
        dest_t = torch.as_tensor(dest, dtype=torch.long)
        src_t = torch.as_tensor(src, dtype=torch.long)
        for key, out in outs.items():
            values = out.index_select(0, src_t.to(out.device)).to("cpu", self.store_dtype)
            if self.store_dtype != torch.float32 and not bool(torch.isfinite(values).all()):
                raise ValueError(
                    f"activations at {key[0]} layer {key[1]} overflow the store dtype "
                    f"{self.store_dtype}; collect with dtype='float32'."
                )
            self.buffers[key][dest_t] = values

    # --------------------------------------------------------------------------- batches
    def run_padded(self, seqs: List[_Seq]) -> None:
        """Whole sequences in one padded batch (the reference path)."""
        width = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        rows: List[int] = []
        cols, src, dest = [], [], []
        for r, s in enumerate(seqs):
            start = width - len(s.ids) if self.left else 0
            ids[r, start : start + len(s.ids)] = torch.as_tensor(list(s.ids), dtype=torch.long)
            mask[r, start : start + len(s.ids)] = 1
            for k, p in enumerate(s.reads):
                src.append(len(rows))
                rows.append(r)
                cols.append(start + p)
                dest.append(s.dest + k)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        outs = self._forward(ids, mask, position_ids, (rows, cols), n_tokens=int(mask.sum()))
        self._store(outs, src, dest)

    def run_packed(self, groups: List[_Group], on_groups: Callable[[int], None]) -> List[int]:
        """Every group as one tree (its shared prefix as the trunk, each sequence's rest as a
        branch; a group without a shared prefix as one tree per sequence), packed into rows of
        ``pack_tokens`` tokens with a block mask (:mod:`actedit.interventions.packing`).
        Returns the store rows written."""
        items: List[Tuple[int, Tree, List[_Seq]]] = []  # (group, tree, the sequences it holds)
        for k, g in enumerate(groups):
            if g.prefix > 0:
                items.append((k, Tree(g.seqs[0].ids[: g.prefix], [s.ids[g.prefix :] for s in g.seqs]), g.seqs))
            else:
                items.extend((k, Tree(s.ids), [s]) for s in g.seqs)
        last_item = {group: i for i, (group, _, _) in enumerate(items)}
        dtype = next(self.model.parameters()).dtype
        filled: List[int] = []
        pack_tokens = cast(int, self.pack_tokens)  # run_packed runs only with pack_tokens set
        for batch in pack_trees([tree for _, tree, _ in items], pack_tokens, pad_id=self.pad_id):
            rows: List[int] = []
            cols, src, dest = [], [], []
            read_at: Dict[Tuple[int, int], int] = {}
            for k, i in enumerate(batch.trees):
                _, tree, seqs = items[i]
                trunk_row, trunk_col = batch.trunk_at[k]
                n_trunk = len(tree.trunk)
                for b, s in enumerate(seqs):
                    for j, p in enumerate(s.reads):
                        if p < n_trunk:
                            at = (trunk_row, trunk_col + p)
                        else:
                            at = (trunk_row, batch.branch_columns[k][b][p - n_trunk])
                        if at not in read_at:  # a trunk token read by several sequences runs once
                            read_at[at] = len(rows)
                            rows.append(at[0])
                            cols.append(at[1])
                        src.append(read_at[at])
                        dest.append(s.dest + j)
            mask = batch.attention_mask(0, dtype=dtype)
            outs = self._forward(
                batch.input_ids, mask, batch.position_ids, (rows, cols), n_tokens=int(batch.real.sum())
            )
            self._store(outs, src, dest)
            del outs
            filled.extend(dest)
            on_groups(sum(1 for i in batch.trees if last_item[items[i][0]] == i))
        return filled

    def run_shard(self, plan: _ShardPlan, batch_size: int, on_groups: Callable[[int], None]) -> Dict[str, torch.Tensor]:
        n = plan.num_rows
        self.buffers = {key: torch.empty((n, self.widths[key[0]]), dtype=self.store_dtype) for key in self.keys}
        filled = torch.zeros(n, dtype=torch.bool)
        # packed rows where the model takes a block mask and the shard's longest sequence fits
        # its sliding window (if any); otherwise padded batches of whole sequences
        longest = max(len(seq.ids) for g in plan.groups for seq in g.seqs)
        if self.pack_tokens is not None and supports_packing(self.model, longest) is None:
            filled[torch.as_tensor(self.run_packed(plan.groups, on_groups), dtype=torch.long)] = True
        else:
            seqs = sorted((s for g in plan.groups for s in g.seqs), key=lambda s: -len(s.ids))
            for lo in range(0, len(seqs), batch_size):
                chunk = seqs[lo : lo + batch_size]
                self.run_padded(chunk)
                for s in chunk:
                    filled[s.dest : s.dest + len(s.reads)] = True
            on_groups(len(plan.groups))
        if not bool(filled.all()):  # pragma: no cover - a planning bug
            raise RuntimeError(f"shard {plan.index}: {int((~filled).sum())} rows were not collected.")
        tensors = {f"act.{site}.{layer}": buf for (site, layer), buf in self.buffers.items()}
        self.buffers = {}
        for c in COLUMNS:
            tensors[f"meta.{c}"] = torch.from_numpy(plan.columns[c])
        return tensors


# ------------------------------------------------------------------------------ files
def _write_manifest(directory: Path, manifest: Dict[str, Any]) -> None:
    write_json(directory / MANIFEST, manifest, sort_keys=True)


def _write_shard(directory: Path, plan: _ShardPlan, tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    # One metadata key: safetensors writes the header's metadata map in an unspecified order.
    info = {"store_version": STORE_VERSION, "shard": plan.index, "examples": plan.examples}
    data = safetensors_bytes(tensors, metadata={"actedit": json.dumps(info, sort_keys=True, ensure_ascii=False)})
    path = directory / shard_name(plan.index)
    write_atomic(path, data)
    return {
        "file": path.name,
        "rows": plan.num_rows,
        "examples": [plan.start, plan.end],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _our_files(directory: Path) -> List[Path]:
    return [
        p
        for p in directory.iterdir()
        if p.name == MANIFEST
        or p.name.endswith(TEMP_SUFFIX)  # what write_atomic leaves when killed
        or (p.name.startswith(SHARD_PREFIX) and p.name.endswith(".safetensors"))
    ]


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {str(a)[:60]} -> {str(b)[:60]}")
    return out


def _prepare_directory(
    directory: Path, run: Dict[str, Any], fingerprint: str, resume: bool, overwrite: bool, verify: bool
) -> Tuple[List[Dict[str, Any]], bool]:
    """Existing complete shards to keep and whether the store is already complete."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / MANIFEST
    if manifest_path.is_file() and not overwrite:
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{manifest_path} is not valid JSON; remove it or pass overwrite=True.") from None
        if not resume:
            raise ValueError(
                f"{directory} already holds an activation store; pass resume=True to continue it or "
                "overwrite=True to replace it."
            )
        if not manifest.get("shards"):  # nothing kept from the earlier run: start afresh
            for path in _our_files(directory):
                path.unlink()
            return [], False
        if manifest.get("fingerprint") != fingerprint:
            changes = _diff(manifest.get("run", {}), run)
            raise ValueError(
                f"{directory} holds activations collected with other arguments "
                f"({'; '.join(changes[:6]) or 'unknown differences'}); pass overwrite=True to "
                "replace them or choose another directory."
            )
        kept = []
        for entry in manifest.get("shards", []):
            path = directory / entry["file"]
            ok = path.is_file() and path.stat().st_size == entry["bytes"]
            if ok and verify:
                ok = file_sha256(path) == entry["sha256"]
            if not ok:
                break
            kept.append(entry)
        complete = bool(manifest.get("complete")) and len(kept) == len(manifest.get("shards", []))
        keep_names = {e["file"] for e in kept} | {MANIFEST}
        for path in _our_files(directory):
            if path.name not in keep_names:
                path.unlink()
        return kept, complete
    for path in _our_files(directory):
        path.unlink()
    return [], False


# ------------------------------------------------------------------------------ collect
def collect_activations(
    model,
    tokenizer,
    dataset: Union[ContrastDataset, PromptPairDataset, Sequence[Any]],
    out_dir: Optional[Union[str, Path]] = None,
    *,
    format: Union[str, PromptFormat],
    sites: Union[str, Sequence[str]] = "block_output",
    layers: Optional[Sequence[int]] = None,
    dtype: Union[str, torch.dtype] = "float32",
    batch_size: int = 16,
    padding_side: Optional[str] = None,
    share_prefix: bool = True,
    pack_tokens: Optional[int] = DEFAULT_PACK_TOKENS,
    shard_rows: Optional[int] = None,
    shard_mb: float = 256.0,
    resume: bool = True,
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
    on_shard: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> ActivationStore:
    """Collect activations of ``dataset`` in ``format`` at ``sites`` × ``layers``.

    Args:
        model: a causal LM pyvene can wrap (actedit registers Qwen3, Gemma-3, Phi-3); run in eval
            mode under ``torch.inference_mode`` and left as it was.
        tokenizer: its tokenizer.
        dataset: a :class:`~actedit.data.contrast.ContrastDataset`, a
            :class:`~actedit.data.contrast.PromptPairDataset` (ActAdd) or a list of their items.
        out_dir: the store directory (created; files other than the store's are left alone), or
            None for a store held in memory (no resume).
        format: a :class:`~actedit.data.formats.PromptFormat` or its name (``hpr``, ``iti``,
            ``caa``, ``sea``, ``actadd``).
        sites: one or more of :data:`~actedit.data.store.SITES`.
        layers: decoder layer indices (default: all).
        dtype: store dtype, ``float32`` (default), ``float16`` or ``bfloat16``.
        batch_size: sequences per padded batch (the reference path).
        padding_side: ``left`` or ``right`` (default: the tokenizer's, else ``right``).
        share_prefix: pack each example's common prefix once (exact up to float rounding).
        pack_tokens: tokens per packed row (the fast path, where the model supports it); ``None``:
            padded batches of whole sequences.
        shard_rows: rows per shard (default: as many as fit in ``shard_mb`` MiB).
        shard_mb: target shard size when ``shard_rows`` is not given.
        resume: continue a store left incomplete by an interrupted run with the same arguments.
        overwrite: replace an existing store (only the store's own files are removed).
        verify: on resume, check each kept shard's SHA-256 (default: its size).
        progress: show a tqdm bar (examples, tokens/s).
        on_shard: called with each new shard's manifest entry after it is durably written and
            listed in the manifest (on rank 0 only under a launcher).

    Returns:
        The :class:`~actedit.data.store.ActivationStore` of ``out_dir`` (or in memory).
    """
    data = as_dataset(dataset)
    w = world()
    progress = progress and w.is_main
    fmt, note = get_format(format).for_tokenizer(tokenizer)
    if note and progress:
        print(f"collect: {note}", flush=True)
    first = data[0]
    if not isinstance(first, fmt.accepts):
        raise ValueError(
            f"format {fmt.name!r} reads {fmt.accepts.__name__} items but the dataset holds "
            f"{type(first).__name__} items."
        )
    site_list = check_sites(model, sites)
    n_layers = int(model.config.num_hidden_layers)
    layer_list = check_layers(model, list(range(n_layers)) if layers is None else list(layers))
    dtype_name, store_dtype = check_dtype(dtype)
    for name, value, optional in (
        ("batch_size", batch_size, False),
        ("pack_tokens", pack_tokens, True),
        ("shard_rows", shard_rows, True),
    ):
        if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}.")
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}.")
    widths = {site: site_width(model, site) for site in site_list}
    if shard_rows is None:
        if not shard_mb > 0:
            raise ValueError(f"shard_mb must be positive, got {shard_mb}.")
        row_bytes = sum(widths.values()) * len(layer_list) * torch.empty((), dtype=store_dtype).element_size()
        shard_rows = max(1, int(shard_mb * 2**20 // row_bytes))
    run = {
        "store_version": STORE_VERSION,
        "model": {**model_signature(model), "weights_sha256": weights_digest(model)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": fmt.params(),
        "dataset": {"type": type(data).__name__, "name": data.name, "size": len(data), "sha256": data.digest()},
        "sites": site_list,
        "layers": layer_list,
        "dtype": dtype_name,
        "batch_size": batch_size,
        "padding_side": side,
        "share_prefix": bool(share_prefix),
        "shard_rows": int(shard_rows),
    }
    fingerprint = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()
    directory = Path(out_dir).expanduser() if out_dir is not None else None
    shards: List[Dict[str, Any]] = []
    if directory is not None:  # rank 0 checks and cleans the directory; every rank learns what it kept
        shards, complete = run_on_main(_prepare_directory, directory, run, fingerprint, resume, overwrite, verify)
        if complete:
            return ActivationStore(directory)
    manifest = {
        "store_version": STORE_VERSION,
        "actedit_version": actedit_version(),
        "fingerprint": fingerprint,
        "run": run,
        "sites": _site_info(model, site_list, widths),
        "layers": layer_list,
        "dtype": dtype_name,
        "roles": list(ROLES),
        "columns": list(COLUMNS),
        "num_examples": len(data),
        "complete": False,
        "shards": shards,
        "num_rows": sum(s["rows"] for s in shards),
        "environment": environment(model),
    }
    if directory is not None and w.is_main:
        _write_manifest(directory, manifest)
    held = _run_collection(
        model,
        tokenizer,
        data,
        fmt,
        manifest,
        directory,
        site_list,
        layer_list,
        side,
        store_dtype,
        widths,
        batch_size,
        share_prefix,
        pack_tokens,
        int(shard_rows),
        progress,
        on_shard,
        w,
    )
    manifest["complete"] = True
    if directory is None:
        return ActivationStore.in_memory(manifest, held)
    if w.is_main:
        _write_manifest(directory, manifest)
    barrier()  # every rank opens the finished manifest
    return ActivationStore(directory)


def _site_info(model, sites: List[str], widths: Dict[str, int]) -> Dict[str, Dict[str, int]]:
    info = {}
    for site in sites:
        entry = {"width": widths[site]}
        if site in HEAD_SITES:
            entry["num_heads"] = int(model.config.num_attention_heads)
            entry["head_dim"] = int(compat.head_dim(model.config))
        info[site] = entry
    return info


def _run_collection(
    model,
    tokenizer,
    data,
    fmt: PromptFormat,
    manifest: Dict[str, Any],
    directory: Optional[Path],
    sites: List[str],
    layers: List[int],
    side: str,
    store_dtype: torch.dtype,
    widths: Dict[str, int],
    batch_size: int,
    share_prefix: bool,
    pack_tokens: Optional[int],
    shard_rows: int,
    progress: bool,
    on_shard: Optional[Callable[[Dict[str, Any]], None]],
    w: World,
) -> List[Tuple[Dict[str, torch.Tensor], list]]:
    """Collect shard after shard from the last complete one; write each (``directory``) or hold it
    in memory (returned as ``(tensors, example records)`` per shard).

    Under a launcher (``w``), shard k of this run is collected by rank ``k mod N``; each round of
    N shards ends with the ranks exchanging their manifest entries, which every rank appends in
    shard order and rank 0 writes. Held shards are gathered on every rank at the end."""
    shards = manifest["shards"]
    held: List[Tuple[int, Tuple[Dict[str, torch.Tensor], list]]] = []
    with compat.preserved_model_state(model):  # pyvene's wrapping freezes the weights; give them back
        model.eval()
        runner = _CollectionRunner(model, sites, layers, pad_id(tokenizer), side, store_dtype, widths, pack_tokens)
        start = shards[-1]["examples"][1] if shards else 0
        first = len(shards)
        bar = tqdm(total=len(data), initial=start, unit="ex", desc=f"collect {fmt.name}", disable=not progress)
        t0 = time.perf_counter()

        def advance(n: int) -> None:
            bar.update(n)
            bar.set_postfix_str(f"{runner.tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

        def close_round(mine: List[Tuple[int, Dict[str, Any]]]) -> None:
            """Append the round's entries (every rank's, in shard order) and list them."""
            own = {index for index, _ in mine}
            entries = sorted((x for part in all_gather_objects(mine) for x in part), key=lambda x: x[0])
            for index, entry in entries:
                if index != len(shards):  # pragma: no cover - a planning bug
                    raise RuntimeError(f"shard {index} arrived where shard {len(shards)} belongs.")
                shards.append(entry)
                if index not in own:  # another rank's examples
                    bar.update(entry["examples"][1] - entry["examples"][0])
            manifest["num_rows"] = sum(s["rows"] for s in shards)
            if directory is not None and w.is_main:
                _write_manifest(directory, manifest)
            if on_shard is not None and w.is_main:
                for _, entry in entries:
                    on_shard(dict(entry))

        try:
            with torch.inference_mode():
                mine: List[Tuple[int, Dict[str, Any]]] = []  # this rank's shards of the current round
                index = first
                while start < len(data):
                    plan = _plan_shard(data, fmt, tokenizer, index, start, shard_rows, share_prefix)
                    start, index = plan.end, index + 1
                    if owner_of(plan.index - first, w) == w.rank:
                        t_shard, tok_before = time.perf_counter(), runner.tokens
                        tensors = runner.run_shard(plan, batch_size, advance)
                        if directory is not None:
                            entry = _write_shard(directory, plan, tensors)
                        else:
                            entry = {"file": None, "rows": plan.num_rows, "examples": [plan.start, plan.end]}
                            held.append((plan.index, (tensors, plan.examples)))
                        del tensors
                        entry["seconds"] = round(time.perf_counter() - t_shard, 3)
                        entry["tokens"] = runner.tokens - tok_before
                        mine.append((plan.index, entry))
                    if (plan.index - first) % w.size == w.size - 1 or start >= len(data):
                        close_round(mine)
                        mine = []
        finally:
            bar.close()
    if w.distributed and directory is None:
        held = sorted((x for part in all_gather_objects(held) for x in part), key=lambda x: x[0])
    return [item for _, item in held]


__all__ = ["MIN_SHARED_PREFIX", "check_dtype", "check_sites", "collect_activations"]
