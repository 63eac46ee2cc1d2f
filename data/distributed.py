"""Data parallelism over processes: ``torchrun`` / ``accelerate launch`` run one actedit command N times.

A launcher (``torchrun --nproc_per_node N``, ``accelerate launch --num_processes N``) starts N
copies of a command and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in each. :func:`world` reads them and, when ``WORLD_SIZE`` > 1, joins the process
group once (lazily, at the first call); with ``WORLD_SIZE`` unset or 1 it returns a one-process
world and never touches ``torch.distributed``, so every helper below is a no-op there.

What the processes exchange is small Python objects (manifest entries, per-question scores, a
fitted artifact's path, an exception) and barriers, never model tensors: the group uses the
``gloo`` backend on CPU and on GPUs alike (an existing group that is not gloo, e.g. one an
``accelerate.Accelerator`` opened with NCCL, gets a gloo sub-group for these exchanges). Each
process computes on its own GPU: with CUDA, :func:`world` makes ``cuda:LOCAL_RANK`` (modulo the
GPUs the process sees) the current device, so ``"cuda"`` means the process's own GPU, and
:func:`process_device` names it.

How work is split (the callers):

* :func:`shard_of` — contiguous blocks, in order: rank r gets items ``[r·n/N, (r+1)·n/N)``, so
  concatenating what :func:`all_gather_objects` returns restores the original order (scoring
  questions, :mod:`actedit.eval.distributed`).
* :func:`owner_of` — strided: item k belongs to rank ``k mod N`` (activation store shards,
  :func:`actedit.data.collect.collect_activations`, whose shards are cut one after another and
  are gathered back by index).
* :func:`run_on_main` — one process does a step (fit, write, generate) and hands its result, or its
  exception, to all.

Timeouts: a process waiting for rank 0 (a fit, a report) waits at most ``ACTEDIT_DIST_TIMEOUT``
seconds (default 86400: a day, enough for any fit; a failing process stops the others through
the launcher long before that).
"""

from __future__ import annotations

import atexit
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT_ENV = "ACTEDIT_DIST_TIMEOUT"
"""Environment variable: seconds a process waits in a collective (default :data:`DEFAULT_TIMEOUT_S`)."""

DEFAULT_TIMEOUT_S = 86400

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the launched processes.

    Attributes:
        rank: global index of this process (0 … size − 1).
        size: number of processes (1: no launcher, or one process).
        local_rank: index among the processes of this machine (its GPU index with CUDA).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes manifests, results and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.size > 1


_group: Any = None  # the gloo group for object collectives (None: the default group)
_joined = False


def _env_int(name: str, default: Optional[int] = None) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        if default is None:
            raise ValueError(f"{name} is not set; start the processes with torchrun or accelerate launch.")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}.") from None


def _timeout() -> timedelta:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}.") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {text!r}.")
    return timedelta(seconds=seconds)


def world() -> World:
    """This process's :class:`World` from the launcher's environment; joins the process group
    the first time it is called with ``WORLD_SIZE`` > 1 (the ``gloo`` backend, ``env://``)."""
    size = _env_int("WORLD_SIZE", 1)
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be at least 1, got {size}.")
    if size == 1:
        return World()
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < size:
        raise ValueError(f"RANK {rank} is outside 0..{size - 1} (WORLD_SIZE {size}).")
    _join(rank, size, local_rank)
    return World(rank=rank, size=size, local_rank=local_rank)


def _join(rank: int, size: int, local_rank: int) -> None:
    global _group, _joined
    if _joined:
        return
    missing = [name for name in _LAUNCH_VARS if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is {size} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; "
            "start the processes with torchrun or accelerate launch (or unset WORLD_SIZE for one process)."
        )
    if torch.cuda.is_available():
        # LOCAL_RANK's GPU; modulo the visible GPUs, for launchers that show each process only its
        # own GPU (CUDA_VISIBLE_DEVICES per process) and for more processes than GPUs (they share)
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if dist.is_initialized():  # someone (accelerate, the user) opened the group already
        if dist.get_world_size() != size or dist.get_rank() != rank:
            raise ValueError(
                f"the open process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment says rank {rank} of {size}."
            )
        if dist.get_backend() != "gloo":
            _group = dist.new_group(backend="gloo", timeout=_timeout())
    else:
        dist.init_process_group(backend="gloo", init_method="env://", rank=rank, world_size=size, timeout=_timeout())
        atexit.register(_leave)
    _joined = True


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def process_device() -> Optional[str]:
    """The device of this process's model under a launcher with CUDA (its GPU, ``cuda:LOCAL_RANK``); None
    otherwise (one process, or CPU processes: the command's own default applies)."""
    if world().distributed and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return None


# ------------------------------------------------------------------------------ splitting
def shard_of(n: int, w: Optional[World] = None) -> range:
    """This rank's contiguous block of ``n`` items (``range(n)`` in one process); block sizes
    differ by at most one and the blocks of ranks 0, 1, … concatenate to ``range(n)``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}.")
    w = world() if w is None else w
    return range(w.rank * n // w.size, (w.rank + 1) * n // w.size)


def owner_of(index: int, w: Optional[World] = None) -> int:
    """The rank that handles item ``index`` when items are dealt out in turn (``index mod size``)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}.")
    w = world() if w is None else w
    return index % w.size


# ---------------------------------------------------------------------------- collectives
def barrier() -> None:
    """Wait until every process gets here (nothing in one process)."""
    if world().distributed:
        dist.barrier(group=_group)


def gather_objects(obj: T) -> Optional[List[T]]:
    """Every rank's ``obj`` on rank 0, in rank order (``[obj]`` in one process); None on other ranks."""
    w = world()
    if not w.distributed:
        return [obj]
    out: Optional[List[Any]] = [None] * w.size if w.is_main else None
    dist.gather_object(obj, out, dst=0, group=_group)
    return out


def all_gather_objects(obj: T) -> List[T]:
    """Every rank's ``obj`` on every rank, in rank order (``[obj]`` in one process)."""
    w = world()
    if not w.distributed:
        return [obj]
    out: List[Any] = [None] * w.size
    dist.all_gather_object(out, obj, group=_group)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process; other ranks pass anything)."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_group)
    return box[0]


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0 only; every rank returns its result, or raises the
    exception it raised (the others wait). In one process, simply the call."""
    if not world().distributed:
        return fn(*args, **kwargs)
    if not world().is_main:
        received: Tuple[str, Any] = broadcast_object(("wait", None))
        status, value = received
        if status == "error":
            raise value
        return value
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # handed to every rank (as a copy the others can unpickle), raised here as is
        broadcast_object(("error", _portable(exc)))
        raise
    broadcast_object(("ok", result))
    return result


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a :class:`RuntimeError` with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "World",
    "all_gather_objects",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "owner_of",
    "process_device",
    "run_on_main",
    "shard_of",
]
