"""The speed/quality frontier of a block-diffusion checkpoint, as the LLaDA2.1 report plots it: held-out accuracy
against tokens per forward (TPF) for a sweep of M2T thresholds in threshold mode (LLaDA2.0) and of (M2T, T2T)
threshold pairs in joint mode (LLaDA2.1), S and Q marked, the AR parent as a horizontal line (its TPF is 1).

Every point is a full evaluation through eval/compare.py `run_decoding` on the same prompts as the side-by-side
table, so a point and a table row with the same setting are the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..decode.engine import MODES
from .compare import Comparison, Decoding, DecodeSettings, run_decoding

DEFAULT_THRESHOLDS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)  # threshold mode, M2T
# joint mode (M2T, T2T); S = (0.5, 0.0) and Q = (0.7, 0.5) are among them
DEFAULT_PAIRS = ((0.3, 0.0), (0.5, 0.0), (0.5, 0.5), (0.7, 0.5), (0.9, 0.5), (0.9, 0.9))
MARKED = {name: (MODES[name][1], MODES[name][2]) for name in ("S", "Q")}  # the LLaDA2.1 modes' (M2T, T2T)


def sweep_decodings(thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                    pairs: Sequence[tuple[float, float]] = DEFAULT_PAIRS) -> list[tuple[str, Decoding]]:
    """[(sweep kind, decoding)]: threshold mode at each threshold, joint mode at each (M2T, T2T) pair."""
    for v in [*thresholds, *(x for p in pairs for x in p)]:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"sweep thresholds must be in [0, 1], got {v}")
    return ([("threshold", Decoding("threshold", t)) for t in thresholds]
            + [("joint", Decoding("joint", m, e)) for m, e in pairs])


def sweep(loaded, name: str, examples, settings: DecodeSettings, decodings: list[tuple[str, Decoding]],
          progress: Callable[[str], None] | None = None) -> list[dict]:
    """One frontier per sweep kind for one block-diffusion checkpoint: [{"model", "kind", "points"}]."""
    by_kind: dict[str, list[dict]] = {}
    for kind, dec in decodings:
        r = run_decoding(loaded, examples, dec, settings)
        pt = {k: r[k] for k in ("tau_mask", "tau_edit", "accuracy", "ci95", "tpf", "tps", "forwards")}
        pt["marked"] = next((n for n, pair in MARKED.items() if kind == "joint" and (r["tau_mask"], r["tau_edit"])
                             == pair), None)
        by_kind.setdefault(kind, []).append(pt)
        if progress:
            progress(f"{name} {kind} {dec.label}: accuracy {r['accuracy']:.3f}, TPF {r['tpf']:.2f}")
    return [{"model": name, "kind": k, "points": pts} for k, pts in by_kind.items()]


def plot_frontier(c: Comparison | dict, path: str | Path, title: str = "accuracy vs tokens per forward") -> Path:
    """PNG: one line per (diffusion model, sweep kind), points annotated with their thresholds, S and Q as stars,
    each AR model as a horizontal line; also every table row of a block-diffusion model as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import write_bytes

    d = c.as_json() if isinstance(c, Comparison) else c
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"threshold": ("o", "-"), "joint": ("s", "--")}
    ci = 0
    for sw in d.get("sweeps", []):
        pts = sorted(sw["points"], key=lambda p: p["tpf"])
        marker, ls = styles.get(sw["kind"], ("^", ":"))
        col = colours[ci % len(colours)]
        ci += 1
        xs, ys = [p["tpf"] for p in pts], [p["accuracy"] for p in pts]
        ax.plot(xs, ys, marker=marker, ls=ls, color=col, label=f"{sw['model']}: {sw['kind']} sweep")
        for k, p in enumerate(pts):
            if p.get("marked"):  # S and Q: a star, the mode's name beside it (S right, Q left: they often coincide)
                ax.plot([p["tpf"]], [p["accuracy"]], marker="*", ms=15, color=col, mec="black", ls="none", zorder=5)
                ax.annotate(p["marked"], (p["tpf"], p["accuracy"]), textcoords="offset points",
                            xytext=(7, 5) if p["marked"] == "S" else (-16, 5), fontsize=10, weight="bold")
                continue
            lab = f"{p['tau_mask']}" if p["tau_edit"] is None else f"{p['tau_mask']}/{p['tau_edit']}"
            up = sw["kind"] == "joint"  # joint labels above the line, threshold labels below, staggered
            ax.annotate(lab, (p["tpf"], p["accuracy"]), textcoords="offset points", fontsize=6, color=col,
                        xytext=(3, (8 + 7 * (k % 2)) if up else -(10 + 7 * (k % 2))))
    for i, m in enumerate(d["models"]):
        if m["kind"] == "AR":
            for r in m["rows"].values():
                ax.axhline(r["accuracy"], color="black", ls=":" if i else "--", lw=1,
                           label=f"{m['name']} (AR, greedy): {r['accuracy']:.3f}")
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("held-out task accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = Path(path)
    write_bytes(path, buf.getvalue())
    return path
