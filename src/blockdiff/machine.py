"""The machine a run happens on: CPU name, cores, load, and the CPU thread count blockdiff picks.

Why a thread rule: torch's default is one OpenMP thread per core. When another process already keeps a core busy,
those threads spin waiting for each other and small-matrix work (decoding a small model) collapses: on the 2-core
development machine decoding fell from 122 tokens/s (1 thread) to 2-4 tokens/s (2 threads, one core busy
elsewhere). `auto_threads` counts the cores left free by the 1-minute load average; every report and benchmark
records the threads used and the load it saw, because both change the speed numbers.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load1() -> float:
    """1-minute load average (runnable processes), 0.0 where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def auto_threads(busy: float | None = None) -> int:
    """Cores not already busy: cores - round(load), at least 1. `busy` overrides the measured load (tests)."""
    load = load1() if busy is None else busy
    return max(1, min(cores(), cores() - round(load)))


def set_threads(threads: int) -> int:
    """Apply a thread setting (0 = auto_threads()) to torch and return the count used."""
    import torch

    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = auto), got {threads}")
    n = threads or auto_threads()
    torch.set_num_threads(n)
    return n


def describe(threads: int | None = None) -> dict:
    """What reports and benchmarks record about the machine: CPU, cores, torch threads, 1-minute load."""
    import torch

    return {"cpu": cpu_name(), "cores": cores(), "threads": threads if threads is not None else torch.get_num_threads(),
            "load1": round(load1(), 2)}
