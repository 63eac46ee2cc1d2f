"""Benchmarks import the machine and version facts from the package (one implementation)."""

from actedit.data.environment import environment, machine_info, versions  # noqa: F401
