"""ELBO sanity: does the Monte Carlo ELBO of the converted model rank multiple-choice options the way the AR
parent's exact log-likelihood does, and does its standard error fall as samples grow?

    python bench/elbo.py [--items 200] [--samples 4,16,64] [--se-items 50] [--se-samples 4,8,16,32,64,128] [--threads 1]

Items: the harness's multiple-choice variant (`blockdiff_tasks_mc`: the held-out prompts of the conversion report,
seed 123, each with its answer and three near misses), scored through eval/likelihood.py, the code the harness
model calls. Baseline in the same run: the AR parent (`assets/tiny-ar`), exact log-likelihood. For the converted
model (`assets/tiny-bd`) at each sample count: multiple-choice accuracy, top-1 agreement with the parent (same
chosen option), full-ranking agreement (same order of all four options) and the mean Kendall tau between the two
orders; also the ELBO read at block size 1 (= the converted model's own AR log-likelihood, exact) as a second
reference. Standard error: on --se-items items (the correct option), the mean reported standard error per sample
count, and the spread of the estimate over 5 noise seeds (its real standard deviation) at each count.
Writes bench/results/elbo-<date>.{md,json}; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def ranks(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def kendall_tau(a: list[float], b: list[float]) -> float:
    n = len(a)
    s = 0
    for i in range(n):
        for j in range(i + 1, n):
            s += (1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1 if (a[i] - a[j]) * (b[i] - b[j]) < 0 else 0)
    return s / (n * (n - 1) / 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200, help="multiple-choice items (of 200 shipped)")
    ap.add_argument("--samples", default="4,16,64", help="ELBO sample counts for the ranking comparison")
    ap.add_argument("--se-items", type=int, default=50, help="items for the standard-error curve")
    ap.add_argument("--se-samples", default="4,8,16,32,64,128", help="sample counts of the standard-error curve")
    ap.add_argument("--seed", type=int, default=0, help="ELBO noise seed")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="bench/results", help="folder for the md / json results")
    args = ap.parse_args()
    samples = [int(x) for x in args.samples.split(",")]
    se_samples = [int(x) for x in args.se_samples.split(",")]
    if not 1 <= args.items <= 200 or not 1 <= args.se_items <= args.items or min(samples + se_samples) < 2:
        ap.error("need 1 <= --se-items <= --items <= 200 and sample counts >= 2")

    import torch

    torch.set_num_threads(args.threads)
    from blockdiff.eval.harness_data import MC_FILE
    from blockdiff.eval.likelihood import ar_loglikelihood, elbo_loglikelihood
    from blockdiff.load import load_checkpoint

    docs = [json.loads(line) for line in MC_FILE.read_text().splitlines()][:args.items]
    parent, conv = load_checkpoint(REPO / "assets/tiny-ar"), load_checkpoint(REPO / "assets/tiny-bd")
    tok = conv.tokenizer

    def split(prompt: str, option: str):
        whole, ctx = tok.encode(prompt + option), tok.encode(prompt)
        return whole[:len(ctx)], whole[len(ctx):]

    reqs = [split(d["prompt"], o) for d in docs for o in d["options"]]
    k = len(docs[0]["options"])
    group = lambda xs: [[x.logprob for x in xs[i * k:(i + 1) * k]] for i in range(len(docs))]  # noqa: E731

    t0 = time.perf_counter()
    ar_scores = group(ar_loglikelihood(parent.model, reqs))
    ar_s = time.perf_counter() - t0
    b1_scores = group(elbo_loglikelihood(conv.model, reqs, samples=2, block_size=1, seed=args.seed))

    def compare(scores: list[list[float]]) -> dict:
        top1 = [ranks(a)[0] == ranks(b)[0] for a, b in zip(ar_scores, scores)]
        full = [ranks(a) == ranks(b) for a, b in zip(ar_scores, scores)]
        acc = [ranks(b)[0] == d["gold"] for b, d in zip(scores, docs)]
        return {"accuracy": sum(acc) / len(acc), "top1_agreement": sum(top1) / len(top1),
                "ranking_agreement": sum(full) / len(full),
                "kendall_tau": statistics.mean(kendall_tau(a, b) for a, b in zip(ar_scores, scores))}

    rows = {"AR parent (exact)": {"accuracy": sum(ranks(a)[0] == d["gold"] for a, d in zip(ar_scores, docs)) / len(docs),
                                  "top1_agreement": 1.0, "ranking_agreement": 1.0, "kendall_tau": 1.0,
                                  "seconds": round(ar_s, 2), "forward_rows": len(reqs)},
            "converted, B=1 (its AR reading, exact)": compare(b1_scores)}
    for s in samples:
        t0 = time.perf_counter()
        sc = group(elbo_loglikelihood(conv.model, reqs, samples=s, seed=args.seed, batch_size=256))
        rows[f"converted, ELBO {s} samples"] = compare(sc) | {"seconds": round(time.perf_counter() - t0, 2),
                                                              "forward_rows": len(reqs) * s}

    se_reqs = [split(d["prompt"], d["answer"]) for d in docs[:args.se_items]]
    se_rows = []
    for s in se_samples:
        runs = [elbo_loglikelihood(conv.model, se_reqs, samples=s, seed=seed, batch_size=256)
                for seed in range(args.seed, args.seed + 5)]
        reported = statistics.mean(r.stderr for r in runs[0])
        spread = statistics.mean(statistics.stdev([run[i].logprob for run in runs]) for i in range(len(se_reqs)))
        se_rows.append({"samples": s, "mean_reported_se": round(reported, 4), "mean_seed_spread": round(spread, 4),
                        "mean_elbo": round(statistics.mean(r.logprob for r in runs[0]), 4)})
        print(f"  se: {s} samples -> reported {reported:.4f}, spread over seeds {spread:.4f}", flush=True)
    exact = ar_loglikelihood(parent.model, se_reqs)
    mean_ar = statistics.mean(x.logprob for x in exact)

    date = dt.date.today().isoformat()
    m = describe(args.threads)
    lines = [f"# ELBO sanity ({date})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {args.threads} torch threads, load {m['load1']}. "
             f"{len(docs)} multiple-choice items x {k} options (blockdiff_tasks_mc), ELBO seed {args.seed}.", "",
             "| scorer | MC accuracy | top-1 agreement with parent | full-ranking agreement | mean Kendall tau | "
             "seconds | forward rows |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['top1_agreement']:.3f} | {r['ranking_agreement']:.3f} | "
                     f"{r['kendall_tau']:.3f} | {r.get('seconds', '')} | {r.get('forward_rows', '')} |")
    lines += ["", f"Standard error of the ELBO of the correct option ({len(se_reqs)} items; parent's exact "
                  f"log-likelihood of the same answers: mean {mean_ar:.3f} nats):", "",
              "| samples | mean reported SE (nats) | mean spread over 5 seeds (nats) | mean ELBO (nats) |",
              "|---:|---:|---:|---:|"]
    lines += [f"| {r['samples']} | {r['mean_reported_se']} | {r['mean_seed_spread']} | {r['mean_elbo']} |"
              for r in se_rows]
    md = "\n".join(lines) + "\n"
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    summary = {"date": date, "machine": m, "items": len(docs), "seed": args.seed, "ranking": rows,
               "standard_error": se_rows, "parent_mean_logprob_correct": round(mean_ar, 4)}
    (out / f"elbo-{date}.md").write_text(md)
    (out / f"elbo-{date}.json").write_text(json.dumps(summary) + "\n")
    print(md)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
