"""What the bench scripts report about the process (current and peak RSS); the machine itself (CPU name, cores,
threads, load) comes from `blockdiff.machine`, re-exported here."""

from __future__ import annotations

import resource
import sys

from blockdiff.machine import cpu_name, describe  # noqa: F401  (re-exported for the bench scripts)


def rss_mb() -> float:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1024**2


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 1024**2 if sys.platform == "darwin" else kb / 1024
