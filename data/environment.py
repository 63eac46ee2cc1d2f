"""Machine and version facts written next to every measured number (benchmarks, study reports,
activation stores)."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List, Optional

import torch

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""The CPU flags that decide bf16 speed on a CPU (without AVX512-BF16 or AMX, bf16 is emulated)."""


def machine_info() -> Dict[str, object]:
    """CPU model, the :data:`CPU_FLAGS` it has, cores, memory (GiB), torch threads, load average,
    GPU name if any."""
    cpu = platform.processor() or platform.machine()
    flags: List[str] = []
    try:
        fields = dict(
            line.split(":", 1)
            for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
            if ":" in line
        )
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        cpu = fields.get("model name", cpu)
        flags = [flag for flag in CPU_FLAGS if flag in fields.get("flags", "").split()]
    except OSError:
        pass
    memory = None
    try:
        memory = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def versions(*distributions: str) -> Dict[str, Optional[str]]:
    """Python's version and each named distribution's installed version ("not installed" if absent)."""
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in distributions:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment(model=None) -> Dict[str, object]:
    """Machine facts plus the versions of torch, transformers, pyvene and actedit (and the
    model's device and dtype when given)."""
    out: Dict[str, object] = {"machine": machine_info()}
    out.update(versions("torch", "transformers", "pyvene", "actedit"))
    if model is not None:
        param = next(model.parameters())
        out.update(device=str(param.device), model_dtype=str(param.dtype).replace("torch.", ""))
    return out


# ------------------------------------------------------------------------------- peak memory
def _resident_kib(field: str) -> Optional[int]:
    """A ``Vm*`` field of ``/proc/self/status`` in KiB (``VmRSS`` now, ``VmHWM`` the peak so far),
    or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakRSS:
    """Peak resident memory (MiB) of this process while a ``with`` block runs.

    Exact when the block raises the process's peak (the kernel's ``VmHWM`` after the block);
    otherwise the largest ``VmRSS`` a background thread read every ``interval`` seconds, which can
    miss a spike shorter than that (the block then stayed below an earlier step's peak anyway).
    The kernel's peak is never reset, so ``/usr/bin/time`` and ``ru_maxrss`` stay true for the
    whole process. ``mib`` is None where ``/proc`` is missing (not Linux).
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.mib: Optional[float] = None
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._peak_before: Optional[int] = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = _resident_kib("VmRSS")
            if now is not None:
                self._sampled = max(self._sampled, now)

    def __enter__(self) -> "PeakRSS":
        self._peak_before = _resident_kib("VmHWM")
        if self._peak_before is not None:
            self._sampled = _resident_kib("VmRSS") or 0
            self._thread = threading.Thread(target=self._sample, name="actedit-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        now = _resident_kib("VmRSS") or 0
        peak_after = _resident_kib("VmHWM") or 0
        raised = self._peak_before is not None and peak_after > self._peak_before
        kib = peak_after if raised else max(self._sampled, now)
        self.mib = round(kib / 1024, 1)


def peak_rss_mib() -> Optional[float]:
    """The peak resident memory of this process so far (MiB; the kernel's ``VmHWM``), None off Linux."""
    kib = _resident_kib("VmHWM")
    return None if kib is None else round(kib / 1024, 1)


def release_free_memory() -> bool:
    """Hand the C heap's free memory back to the operating system (glibc's ``malloc_trim(0)``);
    False where there is no glibc.

    glibc keeps memory freed by many small and medium allocations (tokenizer batches, collection
    buffers, Python objects) in its heap instead of returning it, so resident memory after a step
    stays above what the process still uses (0.2 GiB after collecting 60 questions' activations
    on SmolLM2-135M). The study calls this between steps, so each step starts from what it needs.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
