"""Device memory: peak measurement and what a job may use (for ``max_batch="auto"``).

CUDA figures come from the caching allocator (``max_memory_allocated``,
``mem_get_info``). On the CPU the peak is the process's resident-set
high-water mark (``VmHWM``), which Linux lets a process reset by writing ``5``
to ``/proc/self/clear_refs``; where that is not possible the peak cannot be
reset and CPU planning falls back to "every concept in each step".
"""

from __future__ import annotations

import os

import torch

__all__ = ["reset_peak", "peak_bytes", "usable_bytes", "cpu_peak_resettable"]


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_peak_resettable() -> bool:
    """True when this process can reset its peak-RSS mark (Linux /proc/self/clear_refs)."""
    return os.access("/proc/self/clear_refs", os.W_OK) and _read_status_kib("VmHWM") is not None


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif cpu_peak_resettable():
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
        except OSError:
            pass


def peak_bytes(device: torch.device) -> int | None:
    """Peak memory since :func:`reset_peak`: CUDA bytes allocated by tensors, or the CPU process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    kib = _read_status_kib("VmHWM")
    return kib * 1024 if kib is not None else None


def usable_bytes(device: torch.device, headroom: float = 0.1) -> int | None:
    """Memory a job may fill on ``device``, counting what it already holds, less ``headroom`` of the total.

    CUDA: free memory plus this process's allocator reservations. CPU: the
    system's available memory plus this process's resident set.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - headroom * total)
    available = total = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                elif line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        return None
    rss = _read_status_kib("VmRSS")
    if available is None or total is None or rss is None:
        return None
    return int(available + rss * 1024 - headroom * total)
