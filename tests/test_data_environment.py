"""Machine facts and the peak-memory measurement the study reports per step."""

import sys
import time

import numpy as np
import pytest

from actedit.data.environment import CPU_FLAGS, PeakRSS, machine_info, peak_rss_mib, release_free_memory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


@linux_only
def test_peak_rss_sees_an_allocation_inside_its_block_only():
    with PeakRSS() as quiet:
        pass
    with PeakRSS() as busy:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, every page touched
        time.sleep(0.2)  # held for ten samples: seen even below an earlier, higher process peak
        del block
    assert busy.mib is not None and quiet.mib is not None
    assert busy.mib - quiet.mib > 250  # the block's own peak, not the process's earlier one
    assert peak_rss_mib() >= busy.mib


def test_machine_info_names_the_bf16_flags():
    flags = machine_info()["cpu_flags"]
    assert isinstance(flags, list) and set(flags) <= set(CPU_FLAGS)
    assert isinstance(release_free_memory(), bool)
