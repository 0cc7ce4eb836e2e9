"""Cost curve of one cached forward (issue 18 part 1): ms per forward against the number of query tokens k, per
batch size, after a prefix already in the KV cache. The shape of this curve decides whether committing several
tokens per forward can beat AR decoding at all.

    python bench/cost.py                                  # assets/tiny-bd, k = 1..64, batch 1, 4, 16, 1 thread
    python bench/cost.py --ks 1,4,16 --batches 1,4 --repeats 3       # smoke run
    python bench/cost.py --model PATH --device cuda --dtype bfloat16

Same code path as decoding: the model is prefilled with --prefix random tokens (causal mask) into a `KVCache` that
is committed; each timed forward then runs k new query tokens per row at positions prefix..prefix+k-1 with
mask=None (they see the prefix and each other, as a denoising step of a block does) and is NOT committed, so
every repeat sees the same cache. The k values are the union of --ks and the spec-decoding forward sizes below.
Timing is interleaved: each of the --repeats rounds times every k once (after --warmup untimed rounds), so load
drift on a shared machine hits all k alike; the number is the median per k (CUDA: synchronised before and after).

Numbers:
  ms        median wall milliseconds of one forward of batch b x k query tokens (logits of all k included).
  ratio     cost(k) / cost(1): how many single-token forwards one k-token forward costs. A decoder committing
            on average TPF tokens per k-token forward beats AR (k = 1, TPF = 1) only if TPF > ratio(k).
  c, beta   least-squares fit per batch of cost(k) = c * (1 + beta * (k - 1)): c is the cost of a one-token
            forward (ms), beta the marginal cost of one more query token in units of c (0 = free, 1 = linear).
  spec      break-even tokens per forward of speculative block decoding at draft length d: a forward carries
            T = 2d + 2 query tokens (1 pending + d drafts + d + 1 mask slots), so spec must accept cost(T)/cost(1)
            tokens per forward to match AR. Measured, not read off the fit.
Writes results/cost-<date>.{json,md,png}; prints the table and ends with one JSON line (the summary).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name, describe, new_plot, save_plot

from blockdiff.load import load_checkpoint
from blockdiff.model.masks import dense_mask

REPO = Path(__file__).resolve().parents[1]


def spec_tokens(d: int) -> int:
    """Query tokens of one spec-decoding forward at draft length d: 1 pending + d drafts + (d + 1) mask slots."""
    return 2 * d + 2


@torch.no_grad()
def measure(model, batch: int, ks: list[int], prefix: int, warmup: int, repeats: int, device) -> dict[int, float]:
    """Median ms of one cached, uncommitted forward of [batch, k] query tokens for each k."""
    from blockdiff.decode.cache import KVCache

    V, dtype = model.cfg.vocab_size, next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(model.cfg, batch, prefix + max(ks), device=device, dtype=dtype)
    ids = torch.randint(0, V, (batch, prefix), generator=gen).to(device)
    pos = torch.arange(prefix, device=device).expand(batch, prefix)
    model(ids, positions=pos, mask=dense_mask("causal", seq_len=prefix, device=device), cache=cache)
    cache.commit(prefix)
    xs = {k: torch.randint(0, V, (batch, k), generator=gen).to(device) for k in ks}
    ps = {k: (prefix + torch.arange(k, device=device)).expand(batch, k) for k in ks}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(warmup + repeats):
        for k in ks:
            sync()
            t0 = time.perf_counter()
            model(xs[k], positions=ps[k], mask=None, cache=cache)
            sync()
            if r >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    assert cache.lengths == [prefix] * batch  # nothing committed by the timed forwards
    return {k: statistics.median(t) for k, t in times.items()}


def fit(ms: dict[int, float]) -> tuple[float, float]:
    """Least squares of cost(k) = a + s (k - 1); c = a, beta = s / a."""
    k = np.array(sorted(ms), dtype=float)
    y = np.array([ms[int(x)] for x in k])
    A = np.stack([np.ones_like(k), k - 1], axis=1)
    (a, s), *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(a), float(s / a)


def plot(curves: dict[int, dict[int, float]], fits: dict[int, tuple[float, float]], title: str, path: Path) -> None:
    fig, ax = new_plot()
    for b, ms in curves.items():
        ks = sorted(ms)
        line, = ax.plot(ks, [ms[k] for k in ks], marker="o", label=f"batch {b} (measured)")
        c, beta = fits[b]
        grid = np.linspace(1, max(ks), 100)
        ax.plot(grid, c * (1 + beta * (grid - 1)), ls="--", lw=1, color=line.get_color(),
                label=f"batch {b} fit: c={c:.2f} ms, beta={beta:.3f}")
    ax.set_xlabel("query tokens per forward (k)")
    ax.set_ylabel("ms per cached forward (median)")
    ax.set_title(title, fontsize=9)
    save_plot(fig, ax, path, fontsize=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "assets/tiny-bd"), help="checkpoint folder")
    ap.add_argument("--ks", default="1,2,3,4,6,8,12,16,24,32,48,64", help="query tokens per forward, comma-separated")
    ap.add_argument("--batches", default="1,4,16", help="batch sizes (rows), comma-separated")
    ap.add_argument("--drafts", default="1,2,3,4,6,8", help="spec draft lengths d for the break-even table")
    ap.add_argument("--prefix", type=int, default=64, help="tokens already committed in the KV cache")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds over all k before timing")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds over all k (median taken)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", default=str(REPO / "bench/results"), help="results folder")
    ap.add_argument("--no-save", action="store_true", help="print only, write no result files")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    batches, drafts = ints(args.batches), ints(args.drafts)
    ks = sorted(set(ints(args.ks)) | {1} | {spec_tokens(d) for d in drafts})  # cost(1) is every ratio's baseline

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_checkpoint(args.model, device=device, dtype=getattr(torch, args.dtype)).model
    curves, fits = {}, {}
    for b in batches:
        t0 = time.perf_counter()
        curves[b] = measure(model, b, ks, args.prefix, args.warmup, args.repeats, device)
        fits[b] = fit(curves[b])
        print(f"[cost] batch {b}: {time.perf_counter() - t0:.1f} s", flush=True)

    date = dt.date.today().isoformat()
    meta = {"date": date, "cpu": cpu_name(), "device": str(device), "gpu": torch.cuda.get_device_name(device)
            if device.type == "cuda" else None, "threads": args.threads, "load1": describe(args.threads)["load1"],
            "model": Path(args.model).name, "dtype": args.dtype, "prefix": args.prefix, "warmup": args.warmup,
            "repeats": args.repeats, "torch": torch.__version__}
    hw = meta["gpu"] or f"{meta['cpu']}, {args.threads} thread(s)"
    lines = [f"# Cached-forward cost curve ({date})", "",
             f"{hw}, load {meta['load1']}, model {meta['model']} ({args.dtype}), prefix {args.prefix} tokens, "
             f"median of {args.repeats} after {args.warmup} warm-up rounds.", "",
             "ms per forward (ratio = cost(k) / cost(1)):", "",
             "| k | " + " | ".join(f"batch {b} ms | ratio" for b in batches) + " |",
             "|---:|" + "---:|---:|" * len(batches)]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(f"{curves[b][k]:.3f} | {curves[b][k] / curves[b][1]:.2f}"
                                             for b in batches) + " |")
    lines += ["", "Fit cost(k) = c (1 + beta (k - 1)):", "", "| batch | c (ms) | beta | max rel. residual |",
              "|---:|---:|---:|---:|"]
    for b in batches:
        c, beta = fits[b]
        resid = max(abs(c * (1 + beta * (k - 1)) / curves[b][k] - 1) for k in ks)
        lines.append(f"| {b} | {c:.3f} | {beta:.4f} | {resid:.1%} |")
    lines += ["", "Spec decoding break-even tokens per forward, cost(2d+2) / cost(1):", "",
              "| d | T | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---:|---:|" + "---:|" * len(batches)]
    for d in drafts:
        T = spec_tokens(d)
        lines.append(f"| {d} | {T} | " + " | ".join(f"{curves[b][T] / curves[b][1]:.2f}" for b in batches) + " |")
    md = "\n".join(lines) + "\n"
    print(md)

    summary: dict = {"meta": meta}
    for b in batches:
        ms, (c, beta) = curves[b], fits[b]
        summary[f"batch{b}"] = {
            "c_ms": round(c, 4), "beta": round(beta, 4),
            "ratio": {str(k): round(ms[k] / ms[1], 3) for k in (8, 16, 32) if k in ms},
            "spec_break_even": {str(d): round(ms[spec_tokens(d)] / ms[1], 3) for d in drafts}}
    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"cost-{date}"
        full = {**summary, "ms": {f"batch{b}": {str(k): round(v, 4) for k, v in curves[b].items()} for b in batches}}
        stem.with_suffix(".json").write_text(json.dumps(full, indent=1) + "\n")
        stem.with_suffix(".md").write_text(md)
        title = f"cached forward cost, {meta['model']}, prefix {args.prefix}, {hw}"
        plot(curves, fits, title, stem.with_suffix(".png"))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
