"""Run metrics: one JSON object per line in metrics.jsonl, and a loss-curve PNG drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import open_for_replace, write_text


class MetricsLog:
    """Append-only JSONL. On resume, records at or after the resume step are dropped first, so the file
    reads as one uninterrupted run."""

    def __init__(self, path: Path, truncate_from_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_from_step]
            write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        # Open per record: nothing is left open when training stops on an exception (e.g. divergence).
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png_path: Path, schedule=None) -> None:
    """Training loss per step and validation perplexity per eval, with phase boundaries marked."""
    if not Path(metrics_path).exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if not r.get("eval") and "loss" in r]
    evals = [r for r in rows if r.get("eval")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, color="tab:blue", label="train loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("train loss (nats)")
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["val_ppl"] for r in evals], "o-", color="tab:red", ms=3,
                 label="val ELBO ppl")
        ax2.set_ylabel("validation perplexity", color="tab:red")
    if schedule is not None:
        for ph in schedule.phases:
            ax.axvline(ph.start, color="gray", lw=0.5, ls="--")
            ax.text(ph.start, ax.get_ylim()[1], f" B={ph.block_size}", fontsize=7, va="top", color="gray")
    ax.set_title("blockdiff training")
    fig.tight_layout()
    try:
        with open_for_replace(png_path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
