"""dti_fast.memory: peak and usable memory on the CPU (the CUDA branches run in bench/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from dti_fast import memory

cpu = torch.device("cpu")


@pytest.mark.skipif(not memory.cpu_peak_resettable(), reason="needs Linux /proc/self/clear_refs")
def test_peak_follows_a_large_allocation_and_resets():
    memory.reset_peak(cpu)
    before = memory.peak_bytes(cpu)
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    after = memory.peak_bytes(cpu)
    assert after - before >= 48 << 20
    del block
    memory.reset_peak(cpu)
    assert memory.peak_bytes(cpu) < after


def test_usable_counts_what_the_process_holds_less_headroom():
    none = memory.usable_bytes(cpu, headroom=0.0)
    some = memory.usable_bytes(cpu, headroom=0.1)
    if none is None:
        pytest.skip("no /proc/meminfo here")
    assert none > some > 0
    total = int(open("/proc/meminfo").readline().split()[1]) * 1024
    assert none - some == pytest.approx(0.1 * total, rel=0.05)
