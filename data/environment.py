"""Machine and version facts written next to every measured number (benchmarks, study reports,
activation stores)."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, Optional

import torch


def machine_info() -> Dict[str, object]:
    """CPU model, cores, memory (GiB), torch threads, load average, GPU name if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
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
