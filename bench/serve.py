"""Serving throughput and latency: `blockdiff serve` on the converted model (S, Q and spec modes) against the same
server in AR mode on the parent, in one run, through the HTTP API users call.

    python bench/serve.py [--model assets/tiny-bd] [--parent assets/tiny-ar] [--levels 1,4,16,64]
                          [--tokens 64] [--requests-per-level 2] [--threads 1] [--max-running 64] [--draft-len D]

For each server / mode and each concurrency c: c clients send streaming /v1/completions requests (64-token prompts of
held-out Python source, never trained on, as token ids; temperature 0; `ignore_eos` so every request generates
exactly --tokens tokens, as bench/decode.py's speed part does) until max(8, k c) requests are done. Reported per
level: generated tokens/s (usage completion tokens / wall seconds of the level), time to first token (first
non-empty streamed text; a block decoder streams a block once it is final), per-request latency p50 / p99, failed
requests, and the server's TPF over the speed requests (/metrics). Beside the speed, the quality of the same
server: exact-answer accuracy on --quality held-out task prompts (EOS on, max 32 new tokens, concurrency 16) with its 95% interval.
The servers are real `blockdiff serve` processes on 127.0.0.1 with --threads torch threads each (one runs at a time).
spec requests (`"mode": "spec"`, lossless self-speculation: the converted checkpoint's own greedy AR output) carry
`draft_len` only when --draft-len is given (else the server's DecodeConfig default).

Goal (issue 12): at concurrency 16, S-mode throughput >= 2x the AR server's, zero failed requests. Prints a table,
writes results/serve-<date>.{md,json}, ends with one JSON line (s_tps_c16, q_tps_c16, spec_tps_c16, ar_tps_c16, failed,
failed_by_server, accuracy, levels).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from machine import cpu_name, describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from serve_helpers import running_server  # noqa: E402  (the tests' launcher: `blockdiff serve` as a process)

from blockdiff.data.tasks import generate_examples, is_correct  # noqa: E402
from blockdiff.eval.task_accuracy import wilson_interval  # noqa: E402


async def one(http: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    first, text, usage = None, "", None
    try:
        async with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "why": f"{r.status_code} {r.text[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    return {"ok": False, "why": msg["error"]["message"]}
                for c in msg.get("choices", []):
                    if c["text"] and first is None:
                        first = time.perf_counter() - t0
                    text += c["text"]
                usage = msg.get("usage") or usage
    except httpx.HTTPError as e:
        return {"ok": False, "why": repr(e)}
    end = time.perf_counter() - t0
    return {"ok": usage is not None, "ttft": first if first is not None else end, "latency": end, "text": text,
            "tokens": usage["completion_tokens"] if usage else 0, "why": None if usage else "no usage chunk"}


async def level(url: str, bodies: list[dict], c: int) -> tuple[list[dict], float]:
    """Run `bodies` with at most c in flight; (results in order, wall seconds)."""
    sem = asyncio.Semaphore(c)
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def run(b):
            async with sem:
                return await one(http, b)

        t0 = time.perf_counter()
        out = await asyncio.gather(*(run(b) for b in bodies))
        return out, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def measure(url: str, extra: dict, prompts: list[str], quality, args) -> dict:
    out = {"levels": {}}
    asyncio.run(level(url, [{"prompt": prompts[0], "max_tokens": 8, **extra}], 1))  # warm-up
    for c in args.levels:
        n = max(8, args.requests_per_level * c)
        bodies = [{"prompt": prompts[i % len(prompts)], "max_tokens": args.tokens, "temperature": 0,
                   "ignore_eos": True, **extra} for i in range(n)]
        res, wall = asyncio.run(level(url, bodies, c))
        ok = [r for r in res if r["ok"]]
        out["levels"][c] = {"requests": n, "failed": n - len(ok), "tps": round(sum(r["tokens"] for r in ok) / wall, 1),
                            "ttft_p50_s": round(pct([r["ttft"] for r in ok], 0.5), 4),
                            "latency_p50_s": round(pct([r["latency"] for r in ok], 0.5), 4),
                            "latency_p99_s": round(pct([r["latency"] for r in ok], 0.99), 4), "wall_s": round(wall, 2),
                            "errors": sorted({r["why"] for r in res if not r["ok"]})[:3]}
        print(f"  c={c:3d}: {out['levels'][c]}", file=sys.stderr, flush=True)
    m = re.search(r"^blockdiff_tokens_per_forward (\S+)$", httpx.get(url + "/metrics").text, re.M)
    out["tpf"] = round(float(m.group(1)), 3)  # generated tokens / row forwards of the speed requests (and warm-up)
    bodies = [{"prompt": ex.prompt, "max_tokens": 32, "temperature": 0, **extra} for ex in quality]
    res, _ = asyncio.run(level(url, bodies, 16))
    hits = sum(r["ok"] and is_correct(ex, r["text"]) for ex, r in zip(quality, res))
    out["accuracy"] = round(hits / len(quality), 4)
    out["accuracy_ci95"] = wilson_interval(hits, len(quality))
    out["quality_failed"] = sum(not r["ok"] for r in res)
    return out


def table(results: dict, levels: list[int]) -> str:
    rows = ["| server | c | tokens/s | TTFT p50 s | latency p50 s | latency p99 s | failed | TPF | accuracy (95% CI) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        for c in levels:
            x = r["levels"][c]
            lo, hi = r["accuracy_ci95"]
            acc = f"{r['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]" if c == levels[0] else ""
            tpf = f"{r['tpf']:.2f}" if c == levels[0] else ""
            rows.append(f"| {name} | {c} | {x['tps']:.0f} | {x['ttft_p50_s']:.3f} | {x['latency_p50_s']:.3f} | "
                        f"{x['latency_p99_s']:.3f} | {x['failed']} | {tpf} | {acc} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/tiny-bd", help="converted (block-diffusion) checkpoint")
    ap.add_argument("--parent", default="assets/tiny-ar", help="its AR parent (served in AR mode)")
    ap.add_argument("--levels", default="1,4,16,64", help="concurrency levels, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per speed request")
    ap.add_argument("--requests-per-level", type=int, default=2, help="requests per level = max(8, this x c)")
    ap.add_argument("--quality", type=int, default=100, help="held-out task prompts for the accuracy column")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server process")
    ap.add_argument("--max-running", type=int, default=64, help="--max-running of the servers")
    ap.add_argument("--draft-len", type=int, default=None,
                    help="draft_len of the spec requests (default: the server's)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for serve-<date>.{md,json}")
    args = ap.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    from blockdiff.data.corpus import stdlib_documents
    from blockdiff.data.tokenizer import load_tokenizer

    tok = load_tokenizer(REPO / args.model)
    code = [ids for ids in (tok.encode(d) for d in stdlib_documents("heldout", 400_000)) if len(ids) >= 64]
    prompts = [ids[:64] for ids in code[:64]]
    quality = generate_examples("heldout", args.quality, seed=123)
    results, logs = {}, Path(args.out)
    logs.mkdir(parents=True, exist_ok=True)
    flags = ("--max-running", args.max_running, "--max-queue", 4096)
    spec = {"mode": "spec"} | ({} if args.draft_len is None else {"draft_len": args.draft_len})
    for name, folder, extra in (("S", args.model, {"mode": "S"}), ("Q", args.model, {"mode": "Q"}),
                                ("spec", args.model, spec), ("AR (parent)", args.parent, {})):
        print(f"[bench/serve] {name}: {folder}", file=sys.stderr, flush=True)
        with running_server(REPO / folder, *flags, log=logs / ".serve-bench.log", threads=args.threads) as url:
            results[name] = measure(url, extra, prompts, quality, args)
    (logs / ".serve-bench.log").unlink(missing_ok=True)
    failed_by = {name: sum(x["failed"] for x in r["levels"].values()) + r["quality_failed"]
                 for name, r in results.items()}
    failed = sum(failed_by.values())
    c16 = {name: r["levels"].get(16, {}).get("tps") for name, r in results.items()}
    summary = {"bench": "serve", "date": dt.date.today().isoformat(), "cpu": cpu_name(),
               "machine": describe(args.threads),
               "model": args.model, "parent": args.parent, "tokens": args.tokens, "threads": args.threads,
               "draft_len": args.draft_len,
               "s_tps_c16": c16.get("S"), "q_tps_c16": c16.get("Q"), "spec_tps_c16": c16.get("spec"),
               "ar_tps_c16": c16.get("AR (parent)"), "failed": failed, "failed_by_server": failed_by,
               "goal_s_2x_ar_c16": bool(c16.get("S") and c16.get("AR (parent)")
                                        and c16["S"] >= 2 * c16["AR (parent)"]),
               "levels": {f"{name}": r["levels"] for name, r in results.items()},
               "accuracy": {name: {"acc": r["accuracy"], "ci95": r["accuracy_ci95"]} for name, r in results.items()},
               "tpf": {name: r["tpf"] for name, r in results.items()},
               "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip()}
    md = table(results, args.levels)
    print(md)
    stem = Path(args.out) / f"serve-{summary['date']}"
    stem.with_suffix(".md").write_text(f"# bench/serve.py, {summary['date']}, {cpu_name()}, {args.threads} thread(s) "
                                       f"per server\n\n{md}\n\n```json\n{json.dumps(summary, indent=1)}\n```\n")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
