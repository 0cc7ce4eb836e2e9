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
    """Peak resident set size of this process image so far: VmHWM on Linux. Not ru_maxrss there, which Linux
    carries across fork + exec from the parent (a bench child would report the parent's peak when that is larger;
    tests/test_plan.py measures the same way). ru_maxrss elsewhere (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024**2 if sys.platform == "darwin" else kb / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so that `peak_rss_mb`
    after a measurement is the peak of the measurement alone, not of loading the model. False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def new_plot(figsize=(7.5, 4.5)):
    """A matplotlib figure and axes on the file-only Agg backend (bench plots are written, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_plot(fig, ax, path, **legend) -> None:
    """Legend (`legend` passed to ax.legend), light grid, tight layout, a 120-dpi PNG at `path`; closes the figure."""
    import matplotlib.pyplot as plt

    ax.legend(**legend)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out, stem: str, md: str, summary: dict) -> None:
    """A benchmark's result files: `<stem>.md` (the tables) and `<stem>.json` (one line) under `out`, and both on
    stdout, the JSON last."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(summary) + "\n")
    print(md)
    print(json.dumps(summary))
