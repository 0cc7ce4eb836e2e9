"""Spec decoding before / after "drafts trained to be accepted" (issue 18 part 4): for each checkpoint, how many
drafts mode "spec" accepts and what that buys, beside the quality of the checkpoint's own AR greedy output.

    python bench/spec_distill.py [--models assets/tiny-bd,runs/spec-distill/final] [--tasks 200] [--seed 1]
                                 [--code 8] [--code-tokens 128] [--draft-len 3] [--threads 1]
                                 [--block-modes threshold,S,Q] [--name spec-distill] [--tag seed1]

Per checkpoint, in one process (1 torch thread):
  tasks  --tasks held-out prompts (generate_examples("heldout", n, seed)); EOS on, max 32 new tokens.
         spec at --batch rows per call (1): "always" drafts every forward (draft_cost 0: the drafts' own quality),
         "adaptive" is the default DecodeConfig (a row drafts while its acceptance pays for it). TPF = generated tokens (EOS included) / forwards after prefill,
         acceptance = accepted drafts / drafted; own-AR greedy accuracy (is_correct) with a Wilson 95% interval;
         `lossless` = spec outputs equal to the AR outputs (must be 1.000); `agree` = AR outputs equal to the
         first checkpoint's AR outputs (the baseline's own greedy text).
  code   --code held-out stdlib prompts of 64 tokens (files never trained on), --code-tokens generated, EOS ignored:
         spec TPF / acceptance (as for tasks), AR agreement with the first checkpoint as the mean fraction of the
         generated tokens before the first difference.
  block  the same task prompts with each of --block-modes at the checkpoint's own block size (the B it records,
         what threshold / S / Q use by default), --block-batch rows per call: accuracy (is_correct) and TPF, so a
         post-training that serves spec does not quietly cost the block modes.
  train  the run's training wall time, read from report.json beside the checkpoint folder when there is one.
  speed  batch 1, the same code prompts, default DecodeConfig: spec tokens/s and AR tokens/s (engine.ar_generate, KV cache) of the same
         model, wall time of each call (prefill included); `x AR` = spec / AR.
Saves bench/results/<--name>-<date>[-<--tag>].{json,md}; prints the tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from machine import describe

REPO = Path(__file__).resolve().parents[1]


def _prefix_frac(a: list[int], b: list[int], n: int) -> float:
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return k / n


def measure(path: str, args, examples, task_prompts, code_prompts) -> dict:
    from blockdiff.data.tasks import is_correct
    from blockdiff.decode.engine import ar_generate
    from blockdiff.eval.task_accuracy import wilson_interval
    from blockdiff.load import load_checkpoint

    L = load_checkpoint(path)
    tok, model = L.tokenizer, L.model
    info = L.info
    res: dict = {"model": path, "labels": info.labels, "clean_stream": info.clean_stream,
                 "block_size": info.block_size}

    def spec_run(prompts, max_new, ignore_eos, batch, **kw):
        cfg = L.decode_config(mode="spec", max_new_tokens=max_new, draft_len=args.draft_len, ignore_eos=ignore_eos,
                              **kw)
        gens = []
        for i in range(0, len(prompts), batch):
            gens += L.generate(prompts[i:i + batch], cfg)
        n, f = sum(g.n_generated for g in gens), sum(g.forwards for g in gens)
        d, a = sum(g.drafted for g in gens), sum(g.accepted for g in gens)
        return gens, {"tpf": n / max(f, 1), "acceptance": a / max(d, 1), "tokens": n, "forwards": f}

    # tasks
    gens, st = spec_run(task_prompts, 32, False, args.batch, draft_cost=0.0)
    st["tpf_adaptive"] = spec_run(task_prompts, 32, False, args.batch)[1]["tpf"]
    ar = [g.tokens for g in L.generate(task_prompts, ar=True, max_new_tokens=32)]
    hits = sum(is_correct(ex, tok.decode(t)) for ex, t in zip(examples, ar))
    res["tasks"] = {**st, "ar_accuracy": hits / len(examples), "ci95": list(wilson_interval(hits, len(examples))),
                    "lossless": sum(g.tokens == t for g, t in zip(gens, ar)) / len(ar)}
    res["_task_ar"] = ar
    # code (EOS ignored)
    gens, st = spec_run(code_prompts, args.code_tokens, True, args.batch, draft_cost=0.0)
    st["tpf_adaptive"] = spec_run(code_prompts, args.code_tokens, True, args.batch)[1]["tpf"]
    code_ar = [ar_generate(model, p, max_new_tokens=args.code_tokens, eos_ids=()).tokens for p in code_prompts]
    res["code"] = {**st, "lossless": sum(g.tokens == t for g, t in zip(gens, code_ar)) / len(code_ar)}
    res["_code_ar"] = code_ar
    # block modes at the checkpoint's block size
    res["block"] = {}
    for mode in [m for m in args.block_modes.split(",") if m]:
        cfg = L.decode_config(mode=mode, max_new_tokens=32)
        gens = []
        for i in range(0, len(task_prompts), args.block_batch):
            gens += L.generate(task_prompts[i:i + args.block_batch], cfg)
        hits = sum(is_correct(ex, tok.decode(g.tokens)) for ex, g in zip(examples, gens))
        res["block"][mode] = {"block_size": cfg.block_size, "accuracy": hits / len(examples),
                              "ci95": list(wilson_interval(hits, len(examples))),
                              "tpf": sum(g.n_generated for g in gens) / max(sum(g.forwards for g in gens), 1)}
    report = Path(path).parent / "report.json"
    res["train_wall_s"] = json.loads(report.read_text()).get("train_wall_s") if report.is_file() else None
    # speed, batch 1
    L.generate(code_prompts[:1], L.decode_config(mode="spec", max_new_tokens=8))  # warm-up
    t0 = time.perf_counter()
    spec_n = sum(spec_run([p], args.code_tokens, True, 1)[1]["tokens"] for p in code_prompts)
    spec_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ar_n = sum(ar_generate(model, p, max_new_tokens=args.code_tokens, eos_ids=()).n_generated for p in code_prompts)
    ar_s = time.perf_counter() - t0
    res["speed"] = {"spec_tps": spec_n / spec_s, "ar_tps": ar_n / ar_s, "x_ar": (spec_n / spec_s) / (ar_n / ar_s)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="assets/tiny-bd,runs/spec-distill/final",
                    help="comma-separated checkpoint folders; the first is the baseline for AR agreement")
    ap.add_argument("--tasks", type=int, default=200, help="held-out task prompts (count)")
    ap.add_argument("--seed", type=int, default=1, help="held-out task seed (1: development, 2: final check)")
    ap.add_argument("--code", type=int, default=8, help="held-out 64-token code prompts (count)")
    ap.add_argument("--code-tokens", type=int, default=128, help="generated tokens per code prompt")
    ap.add_argument("--draft-len", type=int, default=3, help="spec drafts per forward")
    ap.add_argument("--batch", type=int, default=1, help="rows per spec call (TPF / acceptance runs); the engine "
                    "shrinks drafts as the batch grows (DecodeConfig.spec_tokens), so 1 measures the drafts themselves")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--block-modes", default="threshold,S,Q",
                    help="comma-separated block decoding modes whose task accuracy is measured at the checkpoint's "
                    "block size ('' = none)")
    ap.add_argument("--block-batch", type=int, default=50, help="rows per block-mode call")
    ap.add_argument("--name", default="spec-distill", help="stem of the results file name (before the date)")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()

    import torch

    from blockdiff.data.corpus import stdlib_documents
    from blockdiff.data.tasks import generate_examples
    from blockdiff.load import load_checkpoint

    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    tok = load_checkpoint(models[0]).tokenizer
    examples = generate_examples("heldout", args.tasks, seed=args.seed)
    task_prompts = [tok.encode(ex.prompt) for ex in examples]
    code = [d for d in stdlib_documents("heldout", 400_000) if len(tok.encode(d)) >= 64]
    code_prompts = [tok.encode(d)[:64] for d in code[:args.code]]

    rows = []
    for m in models:
        t0 = time.perf_counter()
        r = measure(m, args, examples, task_prompts, code_prompts)
        base = rows[0] if rows else r
        r["tasks"]["agree"] = sum(a == b for a, b in zip(r["_task_ar"], base["_task_ar"])) / len(examples)
        r["code"]["agree"] = sum(_prefix_frac(a, b, args.code_tokens)
                                 for a, b in zip(r["_code_ar"], base["_code_ar"])) / len(code_prompts)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(r)
        print(f"[bench] {m}: task TPF {r['tasks']['tpf']:.2f}, code TPF {r['code']['tpf']:.2f}, "
              f"{r['seconds']} s", file=sys.stderr, flush=True)
    for r in rows:
        r.pop("_task_ar"), r.pop("_code_ar")

    machine = describe(args.threads)
    date = dt.date.today().isoformat()
    lines = [f"# spec distill bench {date}: {machine.get('cpu', '?')}, {args.threads} thread(s), draft_len "
             f"{args.draft_len}",
             f"# tasks: {args.tasks} held-out prompts (seed {args.seed}), EOS on, max 32; code: {len(code_prompts)} "
             f"held-out 64-token prompts x {args.code_tokens} tokens, EOS ignored; agree = own AR output vs "
             f"{models[0]}'s",
             "",
             "| model | task TPF always / adaptive | task accept | own-AR acc [95% CI] | AR agree | lossless | code TPF always / adaptive | code accept "
             "| code AR agree | spec tok/s | AR tok/s | spec / AR |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, c, s = r["tasks"], r["code"], r["speed"]
        lines.append(f"| {r['model']} | {t['tpf']:.2f} / {t['tpf_adaptive']:.2f} | {t['acceptance']:.3f} | {t['ar_accuracy']:.3f} "
                     f"[{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}] | {t['agree']:.3f} | {t['lossless']:.3f} / "
                     f"{c['lossless']:.3f} | {c['tpf']:.2f} / {c['tpf_adaptive']:.2f} | {c['acceptance']:.3f} | {c['agree']:.3f} | "
                     f"{s['spec_tps']:.0f} | {s['ar_tps']:.0f} | {s['x_ar']:.2f}x |")
    modes = list(rows[0]["block"])
    if modes:
        lines += ["", "Block modes on the same task prompts at each checkpoint's own block size (B), max 32 new "
                  "tokens; training wall time from the run's report.json:", "",
                  "| model | B | " + " | ".join(f"{m} acc [95% CI] / TPF" for m in modes) + " | training wall s |",
                  "|---|---|" + "---|" * len(modes) + "---|"]
        for r in rows:
            b = r["block"]
            cells = [f"{b[m]['accuracy']:.3f} [{b[m]['ci95'][0]:.3f}, {b[m]['ci95'][1]:.3f}] / {b[m]['tpf']:.2f}"
                     for m in modes]
            wall = "-" if r["train_wall_s"] is None else f"{r['train_wall_s']:.0f}"
            lines.append(f"| {r['model']} | {b[modes[0]]['block_size']} | " + " | ".join(cells) + f" | {wall} |")
    table = "\n".join(lines)
    print(table)
    out = REPO / "bench" / "results" / f"{args.name}-{date}{'-' + args.tag if args.tag else ''}"
    summary = {"date": date, "machine": machine, "args": vars(args), "rows": rows}
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"bench": "spec_distill", "seed": args.seed, **{
        Path(r["model"]).as_posix(): {"task_tpf": round(r["tasks"]["tpf"], 3), "task_accept": round(r["tasks"]["acceptance"], 3),
                                      "ar_acc": r["tasks"]["ar_accuracy"], "agree": r["tasks"]["agree"],
                                      "code_tpf": round(r["code"]["tpf"], 3), "x_ar": round(r["speed"]["x_ar"], 2),
                                      **{f"{m}_acc": b["accuracy"] for m, b in r["block"].items()}}
        for r in rows}}))


if __name__ == "__main__":
    main()
