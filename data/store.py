"""Activation stores: what :func:`actedit.data.collect.collect_activations` writes, read back.

A store is a directory (``manifest.json`` plus ``shard-NNNNN.safetensors`` files, see
:mod:`actedit.data.collect` for how they are written) or the same shards held in memory (the
one-call API collects in memory unless asked for a directory). :class:`ActivationStore` reads
either kind: per (site, layer) ``(N, width)`` tensors, whole or by rows, and the views the
methods read (:data:`actedit.interventions.registry.VIEWS`): :meth:`~ActivationStore.paired_activations`
(every positive/negative response pair, HPR and CAA), :meth:`~ActivationStore.labeled` (ITI's
probes) and :meth:`~ActivationStore.aligned` (SEA's three matrices, ActAdd's two prompts).

Rows and their metadata: each row is one token position of one sequence. Every response is
stored once, even when it takes part in several pairs; pairs are formed when reading. Per-row
columns (:data:`COLUMNS`): ``example`` (index in the dataset), ``role`` (index in
:data:`~actedit.data.contrast.ROLES`: pos, neg, base), ``response`` (index among the example's
responses of that role), ``offset`` (index among the sequence's read positions: aligned offset
for pairs), ``position`` (token position in the sequence), ``token`` (token id there),
``prefix_hash`` (64-bit hash of the tokens up to and including the position: two rows with equal
hashes see the same tokens, so a pair of them carries no contrast). Per-example metadata
(``id``, ``split``, ...) is in each shard's header and in :attr:`ActivationStore.examples`.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
from safetensors import safe_open

from .contrast import ROLES

SITES = ("block_output", "block_input", "mlp_output", "attention_value_output")
"""Sites activations can be collected at (pyvene component names)."""

HEAD_SITES = ("attention_value_output",)
"""Sites whose width is heads × head size (split with ``load(..., heads=True)``)."""

COLUMNS = ("example", "role", "response", "offset", "position", "token", "prefix_hash")
"""Per-row metadata columns of a store."""

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Store dtypes by name."""

MANIFEST = "manifest.json"
STORE_VERSION = 1
SHARD_PREFIX = "shard-"

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.safetensors"


# ------------------------------------------------------------------------------ pairs
def _is_int(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


@dataclass
class PairedActivations:
    """Aligned (positive, negative) activation pairs of several layers.

    Attributes:
        positive: layer → (N⁺, d) activations (torch tensor or numpy array / memmap, any float
            dtype; converted batch by batch).
        negative: layer → (N⁻, d) activations; may be the same mapping as ``positive`` (one
            bank of activations that ``index`` points into).
        index: optional (P, 2) integer array: pair p is (positive[l][index[p, 0]],
            negative[l][index[p, 1]]) in every layer l. None: row i of ``positive`` pairs with
            row i of ``negative`` (then N⁺ = N⁻).
        check_finite: scan every matrix for NaN/inf when constructed (reads all of it).
    """

    positive: Mapping[int, Any]
    negative: Mapping[int, Any]
    index: Optional[Any] = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        for name in ("positive", "negative"):
            acts = getattr(self, name)
            if not isinstance(acts, Mapping) or not acts:
                raise ValueError(f"{name} must be a non-empty mapping layer -> (N, d) activations.")
            for layer in acts:
                if not _is_int(layer) or int(layer) < 0:
                    raise ValueError(f"{name}: layer keys must be non-negative integers, got {layer!r}.")
        if sorted(self.positive) != sorted(self.negative):
            raise ValueError(
                f"positive holds layers {sorted(self.positive)} but negative holds "
                f"{sorted(self.negative)}; every layer needs both."
            )
        width: Optional[int] = None
        rows: Dict[str, int] = {}
        for name in ("positive", "negative"):
            acts = getattr(self, name)
            for layer in sorted(acts):
                x = acts[layer]
                shape = tuple(getattr(x, "shape", ()))
                if len(shape) != 2:
                    raise ValueError(f"{name}[{layer}] must be a 2-D (N, d) array, got shape {shape}.")
                if shape[0] == 0 or shape[1] == 0:
                    raise ValueError(f"{name}[{layer}] is empty (shape {shape}).")
                if width is None:
                    width = shape[1]
                if shape[1] != width:
                    raise ValueError(f"{name}[{layer}] has width {shape[1]} but other layers have {width}.")
                if name in rows and rows[name] != shape[0]:
                    raise ValueError(f"{name}[{layer}] has {shape[0]} rows but other layers have {rows[name]}.")
                rows[name] = shape[0]
                if self.check_finite and not (name == "negative" and acts is self.positive) and not _all_finite(x):
                    raise ValueError(f"{name}[{layer}] contains NaN or inf values; check the collected activations.")
        if self.index is None:
            if rows["positive"] != rows["negative"]:
                raise ValueError(
                    f"positive has {rows['positive']} rows but negative has {rows['negative']}: "
                    "rows must be paired (or give an index of pairs)."
                )
            self._n = rows["positive"]
        else:
            index = torch.as_tensor(np.asarray(self.index))
            if index.dim() != 2 or index.shape[1] != 2 or index.shape[0] == 0:
                raise ValueError(f"index must be a non-empty (P, 2) integer array, got shape {tuple(index.shape)}.")
            if index.is_floating_point() or index.dtype == torch.bool:
                raise ValueError(f"index must hold integers, got dtype {index.dtype}.")
            index = index.long()
            for col, name in ((0, "positive"), (1, "negative")):
                lo, hi = int(index[:, col].min()), int(index[:, col].max())
                if lo < 0 or hi >= rows[name]:
                    raise ValueError(
                        f"index column {col} points outside {name} (rows 0..{rows[name] - 1}, got {lo}..{hi})."
                    )
            self.index = index
            self._n = index.shape[0]
        self._width = int(cast(int, width))  # set by the first layer: every mapping is non-empty

    @property
    def layers(self) -> List[int]:
        return sorted(int(layer) for layer in self.positive)

    @property
    def num_pairs(self) -> int:
        return int(self._n)

    @property
    def width(self) -> int:
        return self._width

    def rows(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row indices into ``positive`` and ``negative`` of the pairs ``idx``."""
        if self.index is None:
            return idx, idx
        return self.index[idx, 0], self.index[idx, 1]

    def gather(
        self, layers: Sequence[int], idx: torch.Tensor, device=None, dtype: torch.dtype = torch.float32
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h⁺, h⁻) of the pairs ``idx`` in ``layers``, each (len(layers), len(idx), d)."""
        pos_rows, neg_rows = self.rows(idx)
        banks = [self.positive[layer] for layer in layers]
        if self.positive is self.negative and all(isinstance(b, torch.Tensor) for b in banks):
            # One bank for both sides (ActivationStore.paired_activations): one indexed copy per
            # layer straight into the result (a step's gather was ~20 % of an HPR probe step).
            rows = torch.cat([pos_rows, neg_rows])
            out = torch.empty((len(banks), len(rows), self.width), dtype=banks[0].dtype, device=banks[0].device)
            for i, bank in enumerate(banks):
                torch.index_select(bank, 0, rows.to(bank.device), out=out[i])
            out = out.to(device=device, dtype=dtype)
            return out[:, : len(pos_rows)], out[:, len(pos_rows) :]
        if self.positive is self.negative:  # one streamed bank: one read of both sides' rows per layer
            both = torch.stack([_take(bank, torch.cat([pos_rows, neg_rows])) for bank in banks])
            both = both.to(device=device, dtype=dtype)
            return both[:, : len(pos_rows)], both[:, len(pos_rows) :]
        hp = torch.stack([_take(self.positive[layer], pos_rows) for layer in layers])
        hn = torch.stack([_take(self.negative[layer], neg_rows) for layer in layers])
        return hp.to(device=device, dtype=dtype), hn.to(device=device, dtype=dtype)


def _all_finite(x: Any) -> bool:
    """Whether every entry is finite. A finite sum settles it (NaN and ±inf make the sum
    non-finite) in one pass without a boolean copy of the tensor; only a non-finite sum, which an
    overflow could also cause, is checked entry by entry."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            return True
        return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
    if isinstance(x, StoredRows):
        return x.all_finite()
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        return True
    return bool(np.isfinite(arr.sum())) or bool(np.isfinite(arr).all())


def _take(x: Any, rows: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x[rows.to(x.device)]
    if isinstance(x, StoredRows):
        return x.take(rows.cpu().numpy())
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x)[rows.numpy()]))


# --------------------------------------------------------------------------------- reader
def _safetensors_header(path: Path) -> Tuple[int, Dict[str, Any]]:
    with open(path, "rb") as handle:
        (n,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(n))
    return 8 + n, header


@dataclass
class ShardView:
    """One shard of a store: a safetensors file read lazily (memory-mapped where the dtype
    allows), or the same tensors held in memory.

    Attributes:
        index: shard number.
        path: its safetensors file (None for a shard in memory).
        row_start: global index of its first row.
        num_rows: its rows.
        examples: ``[first, end)`` dataset indices of its examples.
        tensors: the shard's tensors when it is held in memory.
        example_records: its examples' metadata when it is held in memory.
    """

    index: int
    path: Optional[Path]
    row_start: int
    num_rows: int
    examples: Tuple[int, int]
    tensors: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)
    example_records: Optional[List[Dict[str, Any]]] = field(default=None, repr=False)
    _header: Optional[Tuple[int, Dict[str, Any]]] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else f"in-memory shard {self.index}"

    def header(self) -> Tuple[int, Dict[str, Any]]:
        if self._header is None:
            self._header = _safetensors_header(cast(Path, self.path))  # a shard not in memory is a file
        return self._header

    def array(self, name: str) -> np.ndarray:
        """A tensor of the shard as a numpy array: for a file, a copy-on-write ``numpy.memmap``
        (pages read on access; a bfloat16 tensor as its raw bits, ``uint16``)."""
        if self.tensors is not None:
            if name not in self.tensors:
                raise KeyError(f"{self.name} has no tensor {name!r}.")
            tensor = self.tensors[name]
            return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        path = cast(Path, self.path)  # a shard not in memory is a file
        base, header = self.header()
        if name not in header:
            raise KeyError(f"{path.name} has no tensor {name!r}.")
        info = header[name]
        np_dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if info["dtype"] == "BF16":  # no numpy bfloat16: its raw 16-bit patterns (see ActivationStore._as_store_dtype)
            np_dtype = np.uint16
        if np_dtype is None:
            raise ValueError(f"{path.name}: tensor {name!r} has dtype {info['dtype']}, which stores do not use.")
        start, _ = info["data_offsets"]
        return np.memmap(path, dtype=np_dtype, mode="c", offset=base + start, shape=tuple(info["shape"]))

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor of the shard (memory-mapped where possible, else read)."""
        if self.tensors is not None:
            if name not in self.tensors:
                raise KeyError(f"{self.name} has no tensor {name!r}.")
            return self.tensors[name]
        path = cast(Path, self.path)  # a shard not in memory is a file
        _, header = self.header()
        if name not in header:
            raise KeyError(f"{path.name} has no tensor {name!r}.")
        if header[name]["dtype"] in _SAFETENSORS_DTYPES:
            return torch.from_numpy(self.array(name))
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)

    def activations(self, site: str, layer: int) -> torch.Tensor:
        """``(num_rows, width)`` activations of one (site, layer), in the store dtype."""
        return self.tensor(f"act.{site}.{layer}")

    def examples_metadata(self) -> List[Dict[str, Any]]:
        if self.example_records is not None:
            return list(self.example_records)
        _, header = self.header()
        return json.loads(header.get("__metadata__", {}).get("actedit", "{}")).get("examples", [])


@dataclass
class PairIndex:
    """Contrast pairs of a store: row ``index[p, 0]`` (positive) against ``index[p, 1]``.

    Attributes:
        index: ``(P, 2)`` global row indices.
        example: ``(P,)`` dataset index of each pair's example.
        offset: ``(P,)`` aligned offset (HPR: response token index).
        responses: ``(P, 2)`` response indices (positive, negative) within the example.
    """

    index: np.ndarray
    example: np.ndarray
    offset: np.ndarray
    responses: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass
class LabeledActivations:
    """Rows with binary labels (ITI probes).

    Attributes:
        acts: layer → ``(N, width)`` activations.
        labels: ``(N,)`` 1 for positive rows, 0 for negative rows.
        examples: ``(N,)`` dataset index of each row's example (group rows by question).
        rows: ``(N,)`` global row indices.
    """

    acts: Mapping[int, torch.Tensor]
    labels: np.ndarray
    examples: np.ndarray
    rows: np.ndarray


class StoredRows:
    """``(N, width)`` rows of one (site, layer) of a store, read from its shards when asked for.

    What a streamed :class:`PairedActivations` holds per layer instead of a tensor: each training
    step reads only its batch's rows (:meth:`take`), so memory does not grow with the number of
    layers or rows. ``rows``: the global store rows that make up rows ``0..N-1`` here.

    A shard file is read row by row with ``pread`` (one system call per row, about 1 µs), not
    through a memory map: the pages a map touches count in the process's resident memory (Linux
    maps 64 KiB around each faulting row, ``MADV_RANDOM`` or not), so a streamed epoch would look
    as large as the store in RSS even though the kernel may drop them."""

    def __init__(self, store: "ActivationStore", site: str, layer: int, rows: np.ndarray) -> None:
        self._store, self._site, self._layer = store, site, int(layer)
        self._rows = np.asarray(rows, dtype=np.int64)
        self.shape = (int(self._rows.size), store.width(site))
        self._starts = np.asarray([shard.row_start for shard in store.shards()], dtype=np.int64)
        self._sources: Optional[List[Any]] = None
        self._files: Dict[int, Any] = {}

    def _source(self, k: int) -> Any:
        """Shard ``k``'s rows: an array (a shard in memory) or ``(path, data offset, raw dtype)``."""
        if self._sources is None:
            name = f"act.{self._site}.{self._layer}"
            sources: List[Any] = []
            for shard in self._store.shards():
                if shard.path is None:
                    sources.append(shard.array(name))
                    continue
                base, header = shard.header()
                info = header[name]
                raw = np.uint16 if info["dtype"] == "BF16" else _SAFETENSORS_DTYPES[info["dtype"]]
                sources.append((shard.path, base + int(info["data_offsets"][0]), np.dtype(raw)))
            self._sources = sources
        return self._sources[k]

    def _file(self, k: int, path: Path) -> Any:
        if k not in self._files:
            self._files[k] = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open for every batch; close()
        return self._files[k]

    def take(self, idx: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Rows ``idx`` (indices into ``0..N-1``, any order, repeats allowed) as a tensor."""
        picked = self._rows[np.asarray(idx, dtype=np.int64).reshape(-1)]
        which = np.searchsorted(self._starts, picked, side="right") - 1
        width = self.shape[1]
        out: Optional[np.ndarray] = None
        for k in np.unique(which).tolist():
            sel = np.flatnonzero(which == k)
            local = picked[sel] - self._starts[k]
            source = self._source(k)
            if isinstance(source, np.ndarray):
                if out is None:
                    out = np.empty((picked.size, width), dtype=source.dtype)
                out[sel] = source[local]
                continue
            path, offset, raw = source
            if out is None:
                out = np.empty((picked.size, width), dtype=raw)
            row_bytes = width * out.itemsize
            view = out.data.cast("B")  # the array's own bytes
            handle = self._file(k, path)
            for i, row in zip(sel.tolist(), local.tolist(), strict=True):
                os.preadv(handle.fileno(), [view[i * row_bytes : (i + 1) * row_bytes]], offset + row * row_bytes)
        if out is None:
            out = np.empty((0, width), dtype=np.float32)
        return self._store._as_store_dtype(torch.from_numpy(out), dtype)

    def close(self) -> None:
        """Close the shard files (reopened by the next :meth:`take`)."""
        for handle in self._files.values():
            handle.close()
        self._files = {}

    def __del__(self) -> None:
        self.close()

    def all_finite(self, chunk: int = 4096) -> bool:
        """Whether every entry is finite, read ``chunk`` rows at a time."""
        return all(
            bool(torch.isfinite(self.take(np.arange(i, min(i + chunk, self.shape[0])))).all())
            for i in range(0, self.shape[0], chunk)
        )

    def __repr__(self) -> str:
        return f"StoredRows({self._site!r}, layer={self._layer}, shape={self.shape}, read on access)"


class LayerActivations(Mapping[int, torch.Tensor]):
    """layer → ``(N, width)`` activations of one site, read from the store on each access.

    The streaming view the fits iterate (:func:`actedit.train.pipeline.fit_inputs`): nothing is
    kept, so a fit that visits its layers one at a time holds one layer's rows in memory at a time
    whatever the number of layers (a layer visited twice, as ITI's chosen layers are, is read
    twice). ``rows``: the global row indices to read, in order (None: all rows)."""

    def __init__(
        self,
        store: "ActivationStore",
        site: str,
        layers: Sequence[int],
        rows: Optional[np.ndarray] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        self._store, self._site, self._rows, self._dtype = store, site, rows, dtype
        self._layers = [int(layer) for layer in layers]

    def __getitem__(self, layer: int) -> torch.Tensor:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in self._layers:
            raise KeyError(layer)
        return self._store.load(self._site, int(layer), rows=self._rows, dtype=self._dtype)

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        n = self._store.num_rows if self._rows is None else len(self._rows)
        return f"LayerActivations({self._site!r}, layers={self._layers}, rows={n}, read on access)"


class ActivationStore:
    """Read activations written by :func:`actedit.data.collect.collect_activations`.

    ``ActivationStore(dir)`` reads ``dir/manifest.json``; an incomplete store (an interrupted run)
    is refused unless ``allow_incomplete=True`` (then only its complete shards are visible).
    Activations are read per (site, layer) as ``(N, width)`` tensors, whole or by rows, from
    memory-mapped shard files. :meth:`in_memory` builds the same reader over shards held in
    memory (``path`` is then None).
    """

    def __init__(self, path: Union[str, os.PathLike], *, allow_incomplete: bool = False) -> None:
        self.path: Optional[Path] = Path(path).expanduser()
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"No activation store at {self.path} (no {MANIFEST}); collect one with "
                "actedit.data.collect.collect_activations."
            )
        self.manifest: Dict[str, Any] = json.loads(manifest_path.read_text())
        version = self.manifest.get("store_version")
        if version is None or int(version) > STORE_VERSION:
            raise ValueError(
                f"{self.path}: store version {version} is not supported by this actedit (reads up to {STORE_VERSION})."
            )
        if not self.manifest.get("complete") and not allow_incomplete:
            raise ValueError(
                f"{self.path} is incomplete ({len(self.manifest.get('shards', []))} shards written; the "
                "collection was interrupted). Run collect_activations again with the same arguments to "
                "resume, or open it with allow_incomplete=True."
            )

        def on_disk(i: int, entry: Dict[str, Any], row: int) -> ShardView:
            path = self.path / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{self.path}: shard file {entry['file']} is missing.")
            return ShardView(i, path, row, int(entry["rows"]), tuple(entry["examples"]))

        self._open(on_disk)

    def _open(self, view: Callable[[int, Dict[str, Any], int], "ShardView"]) -> None:
        """Index the manifest's shards: ``view(i, entry, first_row)`` makes shard i's reader."""
        self._shards: List[ShardView] = []
        row = 0
        for i, entry in enumerate(self.manifest.get("shards", [])):
            self._shards.append(view(i, entry, row))
            row += int(entry["rows"])
        self._num_rows = row
        self._columns: Optional[Dict[str, np.ndarray]] = None
        self._examples: Optional[List[Dict[str, Any]]] = None
        self._kept_examples: Optional[np.ndarray] = None  # first_examples(): the examples a view keeps

    @classmethod
    def in_memory(
        cls, manifest: Dict[str, Any], shards: Sequence[Tuple[Dict[str, torch.Tensor], List[Dict[str, Any]]]]
    ) -> "ActivationStore":
        """A store over shards held in memory: ``(tensors, example records)`` per shard, as a
        directory's shard files would hold them, and the manifest that lists them."""
        store = cls.__new__(cls)
        store.path = None
        store.manifest = manifest
        store._open(
            lambda i, entry, row: ShardView(
                i,
                None,
                row,
                int(entry["rows"]),
                tuple(entry["examples"]),
                tensors=shards[i][0],
                example_records=shards[i][1],
            )
        )
        return store

    # ------------------------------------------------------------------------ description
    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "in memory"
        return (
            f"ActivationStore({where!r}, rows={self.num_rows}, sites={self.sites}, "
            f"layers={self.layers[0]}..{self.layers[-1]}, dtype={self.manifest['dtype']})"
        )

    @property
    def sites(self) -> List[str]:
        return list(self.manifest["run"]["sites"])

    @property
    def layers(self) -> List[int]:
        return [int(x) for x in self.manifest["layers"]]

    @property
    def dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.manifest["dtype"]]

    @property
    def num_rows(self) -> int:
        return self._num_rows

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def format(self) -> Dict[str, Any]:
        """The prompt format's name and parameters."""
        return dict(self.manifest["run"]["format"])

    @property
    def model(self) -> Dict[str, Any]:
        """The model signature recorded at collection."""
        return dict(self.manifest["run"]["model"])

    def width(self, site: str) -> int:
        return int(self.manifest["sites"][self._site(site)]["width"])

    def heads(self, site: str) -> Tuple[int, int]:
        """``(num_heads, head_dim)`` of a head site."""
        info = self.manifest["sites"][self._site(site)]
        if "num_heads" not in info:
            raise ValueError(f"site {site!r} is not split into heads; head sites: {', '.join(HEAD_SITES)}.")
        return int(info["num_heads"]), int(info["head_dim"])

    def shards(self) -> Iterator[ShardView]:
        """The shards in order (stream a large store one shard at a time)."""
        return iter(self._shards)

    def _site(self, site: Optional[str]) -> str:
        if site is None:
            if len(self.sites) != 1:
                raise ValueError(f"this store holds several sites ({', '.join(self.sites)}); name one.")
            return self.sites[0]
        if site not in self.manifest["sites"]:
            raise ValueError(f"site {site!r} is not in this store; it holds {', '.join(self.sites)}.")
        return site

    def _layers(self, layers: Optional[Sequence[int]]) -> List[int]:
        if layers is None:
            return self.layers
        if isinstance(layers, int):
            layers = [layers]
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} are not in this store; it holds {self.layers}.")
        return list(layers)

    # ------------------------------------------------------------------------- metadata
    def columns(self) -> Dict[str, np.ndarray]:
        """Per-row metadata, each column ``(num_rows,)`` int64 (see :data:`COLUMNS`)."""
        if self._columns is None:
            parts: Dict[str, List[np.ndarray]] = {c: [] for c in COLUMNS}
            for shard in self._shards:
                for c in COLUMNS:
                    parts[c].append(np.asarray(shard.array(f"meta.{c}")))
            self._columns = {c: (np.concatenate(v) if v else np.zeros(0, np.int64)) for c, v in parts.items()}
        return self._columns

    @property
    def examples(self) -> List[Dict[str, Any]]:
        """Per example in the store: ``{"index": dataset index, "metadata": {...}}``."""
        if self._examples is None:
            self._examples = [e for shard in self._shards for e in shard.examples_metadata()]
        return self._examples

    def first_examples(self, n: int) -> "ActivationStore":
        """This store restricted to the first ``n`` examples of each split (of all its examples
        when they have no split), in the order they were collected: what collecting the same data
        with ``data.limit: n`` stores, so a data-size sweep reads prefixes of one collection.
        :meth:`rows_of` and every view built on it (paired, labeled, aligned) see only their rows."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"first_examples() needs a positive number of examples, got {n!r}.")
        taken: Dict[Any, int] = {}
        kept = []
        for example in self.examples:
            split = example["metadata"].get("split")
            if taken.get(split, 0) < n:
                taken[split] = taken.get(split, 0) + 1
                kept.append(example)
        view = copy.copy(self)
        view._examples = kept
        view._kept_examples = np.asarray([e["index"] for e in kept], dtype=np.int64)
        return view

    @property
    def splits(self) -> List[str]:
        """Distinct ``metadata['split']`` values of the examples."""
        return sorted({str(e["metadata"]["split"]) for e in self.examples if "split" in e["metadata"]})

    def rows_of(self, *, split: Optional[str] = None, roles: Optional[Sequence[str]] = None) -> np.ndarray:
        """Global row indices of the examples in ``split`` (all if None) with a role in ``roles``."""
        cols = self.columns()
        keep = np.ones(self.num_rows, dtype=bool)
        if self._kept_examples is not None:
            keep &= np.isin(cols["example"], self._kept_examples)
        if split is not None:
            chosen = [e["index"] for e in self.examples if e["metadata"].get("split") == split]
            if not chosen:
                raise ValueError(
                    f"no example of this store is in split {split!r}; splits present: "
                    f"{', '.join(self.splits) or 'none (no split metadata)'}."
                )
            keep &= np.isin(cols["example"], np.asarray(chosen, dtype=np.int64))
        if roles is not None:
            unknown = [r for r in roles if r not in ROLES]
            if unknown:
                raise ValueError(f"unknown roles {unknown}; roles: {', '.join(ROLES)}.")
            keep &= np.isin(cols["role"], [ROLES.index(r) for r in roles])
        return np.flatnonzero(keep)

    # --------------------------------------------------------------------------- tensors
    def load(
        self,
        site: Optional[str] = None,
        layer: Optional[int] = None,
        *,
        rows: Optional[Any] = None,
        dtype: Optional[torch.dtype] = None,
        heads: bool = False,
    ) -> torch.Tensor:
        """``(N, width)`` activations of one (site, layer) (``(N, heads, head_dim)`` with ``heads``).

        ``rows``: global row indices (any order, repeats allowed) to read only those rows from the
        memory-mapped shards; default all rows. ``dtype``: convert (default: the store dtype).
        """
        site = self._site(site)
        if layer is None:
            if len(self.layers) != 1:
                raise ValueError(f"this store holds several layers ({self.layers}); name one.")
            layer = self.layers[0]
        self._layers([layer])
        name = f"act.{site}.{layer}"
        width = self.width(site)
        arrays = [shard.array(name) for shard in self._shards]
        if rows is None:
            parts = [np.asarray(a) for a in arrays]
            out = torch.from_numpy(np.concatenate(parts) if len(parts) != 1 else np.array(parts[0]))
        else:
            out = torch.from_numpy(self._gather_rows(arrays, rows, width))
        out = self._as_store_dtype(out, dtype)
        if heads:
            n_heads, head_dim = self.heads(site)
            out = out.reshape(out.shape[0], n_heads, head_dim)
        return out

    def _gather_rows(self, arrays: Sequence[np.ndarray], rows: Any, width: int) -> np.ndarray:
        """Global ``rows`` (any order, repeats allowed) of one tensor given per shard (``arrays``)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise ValueError(f"row indices must be in 0..{self.num_rows - 1}.")
        starts = np.asarray([s.row_start for s in self._shards], dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        result = None
        for k in np.unique(which):
            start = self._shards[int(k)].row_start
            sel = np.flatnonzero(which == k)
            array = arrays[int(k)]
            if result is None:
                result = np.empty((rows.size, width), dtype=array.dtype)
            if sel[-1] - sel[0] + 1 == sel.size:  # sorted rows (the usual case): copy straight in
                np.take(array, rows[sel] - start, axis=0, out=result[sel[0] : sel[-1] + 1])
            else:
                result[sel] = array[rows[sel] - start]
        return result if result is not None else np.empty((0, width), dtype=np.float32)

    def _as_store_dtype(self, out: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """Rows read from the shards in the store dtype (bfloat16 from its raw bits or from the
        float32 an in-memory shard hands out), or in ``dtype``."""
        if out.dtype == torch.uint16:  # a bfloat16 shard's raw bits
            out = out.view(torch.bfloat16)
        if out.dtype == torch.float32 and self.dtype == torch.bfloat16 and dtype is None:
            out = out.to(torch.bfloat16)
        return out if dtype is None else out.to(dtype)

    def load_layers(
        self,
        site: Optional[str] = None,
        layers: Optional[Sequence[int]] = None,
        *,
        rows: Optional[Any] = None,
        dtype: Optional[torch.dtype] = None,
        stream: bool = False,
    ) -> Mapping[int, torch.Tensor]:
        """layer → ``(N, width)`` for several layers (default all): read now into a dict, or with
        ``stream`` a :class:`LayerActivations` that reads each layer when it is accessed."""
        site = self._site(site)
        chosen = self._layers(layers)
        if stream:
            return LayerActivations(self, site, chosen, None if rows is None else np.asarray(rows, np.int64), dtype)
        return {layer: self.load(site, layer, rows=rows, dtype=dtype) for layer in chosen}

    # ----------------------------------------------------------------------------- views
    def pair_index(self, *, split: Optional[str] = None, drop_identical: bool = True) -> PairIndex:
        """Every (positive, negative) response pair of every example, aligned per offset.

        For each example and each (positive response i, negative response k), offsets
        ``0..min(n_i, n_k) − 1`` pair row (i, offset) with row (k, offset): HPR's positions up to
        the shorter response, CAA's/ITI's single reading position. ``drop_identical`` leaves out
        pairs whose two rows saw the same tokens (equal ``prefix_hash``; HPR's official code
        skips such pairs too, by comparing activations).
        """
        cols = self.columns()
        rows = self.rows_of(split=split, roles=("pos", "neg"))
        if rows.size == 0:
            raise ValueError("this store holds no positive/negative rows" + (f" in split {split!r}." if split else "."))
        ex, role, resp, off = (cols[c][rows] for c in ("example", "role", "response", "offset"))
        order = np.lexsort((off, resp, role, ex))
        rows, ex, role, resp, off = rows[order], ex[order], role[order], resp[order], off[order]
        hashes = cols["prefix_hash"]
        # sequence boundaries: (example, role, response) changes
        change = np.ones(rows.size, dtype=bool)
        change[1:] = (ex[1:] != ex[:-1]) | (role[1:] != role[:-1]) | (resp[1:] != resp[:-1])
        starts = np.flatnonzero(change)
        ends = np.append(starts[1:], rows.size)
        out_idx, out_ex, out_off, out_resp = [], [], [], []
        by_example: Dict[int, Tuple[list, list]] = {}
        for s, e in zip(starts, ends, strict=True):
            entry = by_example.setdefault(int(ex[s]), ([], []))
            entry[0 if role[s] == 0 else 1].append((int(resp[s]), rows[s:e]))
        for example in sorted(by_example):
            positives, negatives = by_example[example]
            for i, rp in positives:
                for k, rn in negatives:
                    m = min(rp.size, rn.size)
                    a, b = rp[:m], rn[:m]
                    keep = hashes[a] != hashes[b] if drop_identical else np.ones(m, dtype=bool)
                    if not keep.any():
                        continue
                    a, b = a[keep], b[keep]
                    out_idx.append(np.stack([a, b], axis=1))
                    out_ex.append(np.full(a.size, example, dtype=np.int64))
                    out_off.append(np.flatnonzero(keep).astype(np.int64))
                    out_resp.append(np.tile(np.asarray([[i, k]], dtype=np.int64), (a.size, 1)))
        if not out_idx:
            raise ValueError(
                "no contrast pair left"
                + (f" in split {split!r}" if split else "")
                + " (every pair saw identical tokens, or an example lacks positives or negatives)."
            )
        return PairIndex(
            np.concatenate(out_idx), np.concatenate(out_ex), np.concatenate(out_off), np.concatenate(out_resp)
        )

    def paired_activations(
        self,
        site: Optional[str] = None,
        *,
        split: Optional[str] = None,
        layers: Optional[Sequence[int]] = None,
        dtype: Optional[torch.dtype] = None,
        drop_identical: bool = True,
        check_finite: bool = True,
        stream: bool = False,
    ) -> PairedActivations:
        """HPR/CAA training pairs as :class:`PairedActivations`.

        One bank of the rows the pairs use (per layer, ``dtype`` default the store dtype) shared
        by ``positive`` and ``negative``, and the ``(P, 2)`` index of :meth:`pair_index` into it.
        The bank is read into memory, or with ``stream`` left in the store's shards
        (:class:`StoredRows`: each batch reads its rows, in the store dtype, when it is gathered).
        """
        site = self._site(site)
        pairs = self.pair_index(split=split, drop_identical=drop_identical)
        used = np.unique(pairs.index)
        index = np.searchsorted(used, pairs.index)
        bank: Mapping[int, Any]
        if stream:
            bank = {layer: StoredRows(self, site, layer, used) for layer in self._layers(layers)}
        else:
            bank = self.load_layers(site, layers, rows=used, dtype=dtype)
        return PairedActivations(bank, bank, index=torch.from_numpy(index), check_finite=check_finite)

    def labeled(
        self,
        site: Optional[str] = None,
        *,
        split: Optional[str] = None,
        layers: Optional[Sequence[int]] = None,
        dtype: Optional[torch.dtype] = None,
        stream: bool = False,
    ) -> LabeledActivations:
        """Positive (label 1) and negative (label 0) rows, e.g. ITI's probe data per question split
        (``stream``: each layer read when accessed, :class:`LayerActivations`)."""
        site = self._site(site)
        rows = self.rows_of(split=split, roles=("pos", "neg"))
        if rows.size == 0:
            raise ValueError("no positive/negative rows" + (f" in split {split!r}." if split else "."))
        cols = self.columns()
        labels = (cols["role"][rows] == ROLES.index("pos")).astype(np.int64)
        return LabeledActivations(
            self.load_layers(site, layers, rows=rows, dtype=dtype, stream=stream),
            labels,
            cols["example"][rows].copy(),
            rows,
        )

    def aligned(
        self,
        roles: Sequence[str] = ("base", "pos", "neg"),
        site: Optional[str] = None,
        *,
        split: Optional[str] = None,
        layers: Optional[Sequence[int]] = None,
        dtype: Optional[torch.dtype] = None,
        stream: bool = False,
    ) -> Dict[str, Mapping[int, torch.Tensor]]:
        """role → layer → ``(N, width)`` with row n of every role from the same (example,
        response, offset): SEA's H, H⁺, H⁻ (one completion of each role per prompt) and ActAdd's
        two per-position matrices (roles ``pos``, ``neg``); ``stream``: each layer read when
        accessed (:class:`LayerActivations`)."""
        site = self._site(site)
        cols = self.columns()
        keyed = {}
        for r in roles:
            rows = self.rows_of(split=split, roles=[r])
            if rows.size == 0:
                raise ValueError(
                    f"no row of role {r!r}"
                    + (f" in split {split!r}" if split else "")
                    + (" (SEA needs base completions: ContrastExample.bases)" if r == "base" else "")
                    + "."
                )
            keys = np.stack([cols["example"][rows], cols["response"][rows], cols["offset"][rows]], axis=1)
            order = np.lexsort(keys.T[::-1])
            keyed[r] = (rows[order], keys[order])
        reference = keyed[roles[0]][1]
        for r in roles[1:]:
            if keyed[r][1].shape != reference.shape or not np.array_equal(keyed[r][1], reference):
                raise ValueError(
                    f"roles {roles[0]!r} and {r!r} do not align one to one ({reference.shape[0]} vs "
                    f"{keyed[r][1].shape[0]} rows, matched by example, response and offset); use "
                    "paired_activations() for many-to-many pairs."
                )
        return {r: self.load_layers(site, layers, rows=keyed[r][0], dtype=dtype, stream=stream) for r in roles}
