"""Conversion benchmark: held-out accuracy (threshold, S, Q) and TPF of the converted model against conversion
tokens, for the LLaDA2 same-position recipe and each AR-preserving variant, at equal token budgets, in one run.

    python bench/convert.py [--steps 400] [--points 4] [--prompts 100] [--variants same,shift,...] [--threads 2]

Every variant converts the bundled AR parent (`assets/tiny-ar`) on the bundled corpus (`blockdiff make-data`)
with the same optimiser, batch (16 x 256 tokens per step) and number of steps; only the objective's options and,
for the LLaDA2 baseline, the phases differ (the baseline keeps `recipes/tiny_wsd.toml` as it was before label
alignment existed, scaled to --steps). Checkpoints at --points evenly spaced steps are each decoded on the same
--prompts held-out task prompts (the development split, seed 7: the main job's report uses another draw, seed 123,
so the recipe is not tuned to the prompts it is judged on) with the three modes through the batched engine at
batch 1. The AR parent is decoded (greedy) on the same prompts once.

Outputs under bench/results/: convert-<date>.md (tables), convert-<date>.json (the last line) and
convert-<date>.png (Q-mode accuracy against conversion tokens, one line per variant, the parent as a horizontal
line; threshold and S in the JSON). The last stdout line is the JSON, holding a `variants` object: per variant its
curve points and the conversion tokens it needed to reach 90% of the parent's accuracy (null if never).
Runs take a while (about 1.5 s per step on 2 cores plus evaluation): run it in the background.

    python bench/convert.py --adapter [--prompts 200] [--threads 2] [--reuse]

Full-weight vs mask-only adapter conversion (issue 19, docs/adapter.md) at one budget: the main job's recipe
(`recipes/tiny_wsd.toml`) and `recipes/tiny_adapter.toml` (same data, batch, steps), each run as the real
`blockdiff convert` in a fresh child process that reports its own peak RSS (VmHWM) and wall time; then both merged
results and the parent are decoded on the same --prompts held-out prompts of a third split (seed 29: neither the
development split above nor the main job's report draw): accuracy with 95% intervals for threshold, S, Q and
spec, tokens per forward, tokens/s and the ratio to the parent's greedy AR in the same run, spec's agreement
with the parent's greedy output, and trainable parameters. Results: convert-adapter-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name, describe, new_plot, save_plot

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# name -> (base recipe, objective overrides). Everything else (data, optimiser, steps) is shared.
DEMO = "recipes/tiny_wsd.toml"
BASELINE = "bench/recipes/llada2_same.toml"
VARIANTS: dict[str, tuple[str, dict]] = {
    "same (LLaDA2)": (BASELINE, {}),
    "same+ar": (DEMO, {"labels": "same", "clean_stream": "block_causal", "ar_weight": 1.0, "mask_suffix": 0.0}),
    "shift": (DEMO, {"labels": "shift", "clean_stream": "block_causal", "ar_weight": 0.0, "mask_suffix": 0.0}),
    "shift+ar": (DEMO, {"labels": "shift", "clean_stream": "block_causal", "ar_weight": 1.0, "mask_suffix": 0.0}),
    "shift+causal+ar": (DEMO, {"labels": "shift", "clean_stream": "causal", "ar_weight": 1.0, "mask_suffix": 0.0}),
    "shift+causal+ar+slope": (DEMO, {"labels": "shift", "clean_stream": "causal", "ar_weight": 1.0,
                                     "mask_suffix": 0.0, "mask_slope": 1.0}),
    "shift+causal+ar+suffix": (DEMO, {"labels": "shift", "clean_stream": "causal", "ar_weight": 1.0,
                                      "mask_suffix": 0.5}),
}
MODES = ("threshold", "S", "Q")


def scaled_phases(recipe, steps: int) -> None:
    """Rescale the recipe's phases to `steps` optimiser steps in all, keeping their proportions (each >= 1)."""
    old = recipe.phase_steps()
    total = sum(old)
    new = [max(1, round(s * steps / total)) for s in old]
    new[-1] += steps - sum(new)
    for p, n in zip(recipe.phases, new):
        p.steps, p.tokens = n, 0


def run_variant(name: str, base: str, overrides: dict, args, examples, out_root: Path) -> dict:
    from blockdiff.eval.task_accuracy import evaluate_checkpoint
    from blockdiff.train.loop import train
    from blockdiff.train.recipe import load_recipe, validate

    # labels / clean_stream are the [objective]'s (the checkpoint's alignment); the aids are the [diffusion] loss's
    recipe = load_recipe(REPO / base, {f"{'objective' if k in ('labels', 'clean_stream') else 'diffusion'}.{k}": v
                                       for k, v in overrides.items()})
    scaled_phases(recipe, args.steps)
    every = max(1, args.steps // args.points)
    recipe.train.save_every = recipe.train.eval_every = every
    recipe.train.keep_last = 0
    recipe.train.threads = args.threads
    recipe.train.decay_steps = min(recipe.train.decay_steps, args.steps // 4)
    recipe.merge.top_k = 0
    recipe.eval.tasks = 0
    validate(recipe)
    run_dir = out_root / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
    done = run_dir / "bench_train.json"
    if args.reuse and done.is_file():  # trained by an earlier invocation with the same settings: evaluate only
        info = json.loads(done.read_text())
        if info["steps"] != args.steps or info["objective"] != overrides:
            raise SystemExit(f"{run_dir}: trained with other settings ({info}); drop --reuse or use another --work")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        result = train(recipe, run_dir, progress=False)
        info = {"steps": args.steps, "objective": overrides, "train_s": round(time.perf_counter() - t0, 1),
                "train_tokens_per_s": round(result.tokens_per_s, 1)}
        done.write_text(json.dumps(info) + "\n")
    points = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(ckpt.name.split("_")[1])
        if step % every and step != args.steps:
            continue  # phase-end checkpoints between the evenly spaced points
        res = evaluate_checkpoint(ckpt, examples, modes=MODES, max_new_tokens=32, steps=32)
        pt = {"step": step, "tokens": step * recipe.tokens_per_step,
              "accuracy": {m: round(res[m]["accuracy"], 4) for m in MODES},
              "ci95": {m: res[m]["ci95"] for m in MODES},
              "tpf": {m: round(res[m]["tpf"], 3) for m in MODES},
              "per_task": {m: {k: round(v, 3) for k, v in res[m]["per_task"].items()} for m in MODES},
              "tpf_per_task": {m: {k: round(v, 2) for k, v in res[m]["tpf_per_task"].items()} for m in MODES}}
        points.append(pt)
        print(f"  {name} step {step}: " + ", ".join(f"{m} {pt['accuracy'][m]:.3f} (TPF {pt['tpf'][m]:.2f})"
                                                   for m in MODES), flush=True)
    o, d = recipe.objective, recipe.diffusion
    return {"recipe": base, "objective": {"labels": o.labels or "same", "clean_stream": o.clean_stream or "block_causal",
                                          "ar_weight": d.ar_weight, "mask_slope": d.mask_slope,
                                          "mask_suffix": d.mask_suffix},
            "phases": [(p.name, p.block_size, p.steps) for p in recipe.phases], "train_s": info["train_s"],
            "train_tokens_per_s": info["train_tokens_per_s"], "points": points}


def tokens_to_reach(points: list[dict], target: float, mode: str = "Q") -> int | None:
    for p in points:
        if p["accuracy"][mode] >= target:
            return p["tokens"]
    return None


def plot(variants: dict, parent_acc: float, path: Path) -> None:
    fig, ax = new_plot()
    for name, v in variants.items():
        xs = [p["tokens"] / 1e6 for p in v["points"]]
        ax.plot(xs, [p["accuracy"]["Q"] for p in v["points"]], marker="o", label=name)
    ax.axhline(parent_acc, color="black", ls="--", lw=1, label=f"AR parent ({parent_acc:.2f})")
    ax.axhline(0.9 * parent_acc, color="grey", ls=":", lw=1, label="90% of parent")
    ax.set_xlabel("conversion tokens (millions)")
    ax.set_ylabel("held-out task accuracy (Q mode)")
    ax.set_ylim(0, 1)
    ax.set_title("Conversion of assets/tiny-ar: accuracy vs conversion tokens")
    save_plot(fig, ax, path, fontsize=7, loc="lower right")


ADAPTER_RUNS = {"full": "recipes/tiny_wsd.toml", "adapter": "recipes/tiny_adapter.toml"}
FINAL_SEED = 29  # the adapter comparison's prompts: a split no recipe or decoder setting was chosen on


def child_convert(recipe_path: str, out: str, threads: int) -> None:
    """Run one conversion in this (fresh) process and print its measurements as the last line."""
    import torch

    from blockdiff.convert import run_conversion
    from blockdiff.model import mask_adapter
    from blockdiff.model.hf_io import load_config
    from blockdiff.train.recipe import load_recipe

    torch.set_num_threads(threads)
    recipe = load_recipe(REPO / recipe_path, {"train.threads": threads, "eval.tasks": 0})
    t0 = time.perf_counter()
    res = run_conversion(recipe, REPO / out, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    from machine import peak_rss_mb

    cfg = load_config(recipe.model.path)
    trainable = (mask_adapter.adapter_parameters(cfg, recipe.adapter) if recipe.adapter.enabled
                 else cfg.num_parameters() + cfg.hidden_size)  # + the added [MASK] row
    print(json.dumps({"recipe": recipe_path, "model": str(res.model_dir), "wall_s": round(wall, 1),
                      "train_tokens_per_s": res.report["train_tokens_per_s"], "steps": res.report["steps"],
                      "peak_rss_mb": round(peak_rss_mb(), 1), "trainable_params": trainable,
                      "parent_params": cfg.num_parameters()}))


def compare_adapter(args) -> None:
    import torch

    from blockdiff.data.tasks import generate_examples
    from blockdiff.eval.task_accuracy import evaluate_checkpoint
    from blockdiff.load import load_checkpoint

    torch.set_num_threads(args.threads)
    if not (REPO / "runs/data/train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "blockdiff.cli", "make-data", "--out", str(REPO / "runs/data")], check=True)
    work = REPO / args.work
    runs = {}
    for name, recipe in ADAPTER_RUNS.items():
        done = work / f"{name}.train.json"
        if args.reuse and done.is_file():
            runs[name] = json.loads(done.read_text())
            print(f"[{name}] reusing {runs[name]['model']}", flush=True)
            continue
        print(f"[{name}] blockdiff convert --recipe {recipe} (child process)", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--_child", recipe, str((work / name).relative_to(REPO)),
                               str(args.threads)], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"[{name}] conversion failed:\n{proc.stderr[-3000:]}")
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        work.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(runs[name]) + "\n")
        print(f"[{name}] {runs[name]}", flush=True)
    examples = generate_examples("heldout", args.prompts, seed=FINAL_SEED)
    t0 = time.perf_counter()
    parent = evaluate_checkpoint(REPO / "assets/tiny-ar", examples)["AR"]
    print(f"AR parent: accuracy {parent['accuracy']:.3f} {parent['ci95']}, {parent['tps']:.0f} tokens/s", flush=True)
    parent_loaded = load_checkpoint(REPO / "assets/tiny-ar")
    prompts = [parent_loaded.tokenizer.encode(e.prompt) for e in examples]
    parent_out = [g.tokens for g in parent_loaded.generate(prompts, max_new_tokens=32)]
    rows = {}
    for name, r in runs.items():
        res = evaluate_checkpoint(REPO / r["model"], examples, modes=("threshold", "S", "Q", "spec"),
                                  max_new_tokens=32, steps=32)
        loaded = load_checkpoint(REPO / r["model"])
        cfg = loaded.decode_config(mode="spec", max_new_tokens=32)
        spec = [loaded.generate([p], cfg)[0] for p in prompts]  # batch 1, as the evaluation: drafts are used
        own_ar = [g.tokens for g in loaded.generate(prompts, ar=True, max_new_tokens=32)]
        rows[name] = {"train": r, "modes": {m: {"accuracy": round(v["accuracy"], 4), "ci95": [round(x, 4) for x in v["ci95"]],
                                                 "tpf": round(v["tpf"], 3), "tps": round(v["tps"], 1),
                                                 "vs_parent": round(v["tps"] / parent["tps"], 3)}
                                             for m, v in res.items()},
                      "spec_agrees_with_parent": sum(g.tokens == p for g, p in zip(spec, parent_out)) / len(prompts),
                      "own_ar_agrees_with_parent": sum(a == p for a, p in zip(own_ar, parent_out)) / len(prompts),
                      "spec_accepted_per_forward": round(sum(g.accepted for g in spec) / max(1, sum(g.forwards for g in spec)), 3),
                      "spec_acceptance": round(sum(g.accepted for g in spec) / max(1, sum(g.drafted for g in spec)), 3)}
        m = rows[name]["modes"]
        print(f"[{name}] " + ", ".join(f"{k} {v['accuracy']:.3f} TPF {v['tpf']:.2f} {v['vs_parent']:.2f}x"
                                        for k, v in m.items()), flush=True)
    date = dt.date.today().isoformat()
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = f"convert-adapter-{date}{'-' + args.tag if args.tag else ''}"
    mach = describe(args.threads)
    lines = [f"# Full-weight vs mask-only adapter conversion ({date})", "",
             f"Machine: {cpu_name()}, {args.threads} torch threads, load {mach['load1']}, torch {torch.__version__}. "
             f"{args.prompts} held-out prompts (seed {FINAL_SEED}), batch 1, max 32 new tokens. Evaluation wall: "
             f"{time.perf_counter() - t0:.0f} s.", "",
             f"AR parent (greedy): accuracy {parent['accuracy']:.3f} {parent['ci95']}, {parent['tps']:.0f} tokens/s", "",
             "| conversion | trainable params | train wall | peak RSS | mode | accuracy | 95% CI | TPF | tokens/s | vs parent |",
             "|---|---:|---:|---:|---|---:|---|---:|---:|---:|"]
    for name, r in rows.items():
        t = r["train"]
        share = 100 * t["trainable_params"] / t["parent_params"]
        for i, (mode, v) in enumerate(r["modes"].items()):
            head = (f"| {name} | {t['trainable_params']:,} ({share:.1f}%) | {t['wall_s']:.0f} s | {t['peak_rss_mb']:.0f} MB"
                    if i == 0 else "| | | | ")
            lines.append(f"{head} | {mode} | {v['accuracy']:.3f} | [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | "
                         f"{v['tpf']:.2f} | {v['tps']:.0f} | {v['vs_parent']:.2f}x |")
    lines += ["", "| conversion | spec output == parent's greedy output | own AR == parent's | spec drafts accepted per "
                  "forward | drafts accepted |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['spec_agrees_with_parent']:.3f} | {r['own_ar_agrees_with_parent']:.3f} | "
                     f"{r['spec_accepted_per_forward']:.2f} | {r['spec_acceptance']:.2f} |")
    md = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(md)
    summary = {"date": date, "machine": cpu_name(), "threads": args.threads, "load1": mach["load1"],
               "prompts": args.prompts, "seed": FINAL_SEED, "parent": {k: parent[k] for k in ("accuracy", "ci95", "tpf", "tps")},
               "runs": rows}
    (out / f"{stem}.json").write_text(json.dumps(summary) + "\n")
    print(md)
    print(json.dumps(summary))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--_child":
        child_convert(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps per variant (16 x 256 tokens each)")
    ap.add_argument("--points", type=int, default=4, help="evaluated checkpoints per variant (evenly spaced)")
    ap.add_argument("--prompts", type=int, default=100, help="held-out task prompts per evaluation")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--work", default="runs/bench-convert", help="folder for the runs' checkpoints")
    ap.add_argument("--out", default="bench/results", help="folder for the md / json / png results")
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--reuse", action="store_true", help="evaluate runs an earlier invocation already trained (same "
                    "--steps and variant) instead of training them again")
    ap.add_argument("--adapter", action="store_true", help="full-weight vs mask-only adapter conversion at one "
                    "budget (recipes/tiny_wsd.toml vs recipes/tiny_adapter.toml)")
    args = ap.parse_args()
    if args.adapter:
        compare_adapter(args)
        return
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {', '.join(bad)}; allowed: {', '.join(VARIANTS)}")
    if args.steps < args.points or args.points < 1:
        ap.error("--steps must be >= --points >= 1")

    import torch

    torch.set_num_threads(args.threads)
    from blockdiff.data.tasks import generate_examples
    from blockdiff.eval.task_accuracy import evaluate_checkpoint

    if not (REPO / "runs/data/train.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "blockdiff.cli", "make-data", "--out", str(REPO / "runs/data")], check=True)
    examples = generate_examples("heldout", args.prompts, seed=7)
    parent = evaluate_checkpoint(REPO / "assets/tiny-ar", examples)["AR"]
    print(f"AR parent: accuracy {parent['accuracy']:.3f} {parent['ci95']} on {args.prompts} prompts", flush=True)
    work = REPO / args.work
    variants = {}
    t0 = time.perf_counter()
    for name in names:
        base, over = VARIANTS[name]
        print(f"[{name}] {base} + {over}", flush=True)
        variants[name] = run_variant(name, base, over, args, examples, work)
        variants[name]["tokens_to_90pct_parent_Q"] = tokens_to_reach(variants[name]["points"], 0.9 * parent["accuracy"])
        variants[name]["tokens_to_90pct_parent_threshold"] = tokens_to_reach(
            variants[name]["points"], 0.9 * parent["accuracy"], "threshold")

    date = dt.date.today().isoformat()
    stem = f"convert-{date}{'-' + args.tag if args.tag else ''}"
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Conversion benchmark ({date})", "",
             f"Machine: {cpu_name()}, {args.threads} torch threads, {platform.python_version()}, torch "
             f"{torch.__version__}. Steps per variant: {args.steps} x 4,096 tokens; {args.prompts} held-out prompts "
             f"(seed 7) per point, batch 1, max 32 new tokens. Wall: {time.perf_counter() - t0:.0f} s.", "",
             f"AR parent (greedy): accuracy {parent['accuracy']:.3f}, 95% CI {parent['ci95']}", "",
             "| variant | step | tokens | threshold | S | Q | TPF thr | TPF S | TPF Q | Q 95% CI |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, v in variants.items():
        for p in v["points"]:
            a, f = p["accuracy"], p["tpf"]
            lines.append(f"| {name} | {p['step']} | {p['tokens'] / 1e6:.2f}M | {a['threshold']:.3f} | {a['S']:.3f} | "
                         f"{a['Q']:.3f} | {f['threshold']:.2f} | {f['S']:.2f} | {f['Q']:.2f} | {p['ci95']['Q']} |")
    lines += ["", "| variant | tokens to 90% of parent (Q) | (threshold) | train tokens/s |", "|---|---:|---:|---:|"]
    for name, v in variants.items():
        fmt = lambda x: "not reached" if x is None else f"{x / 1e6:.2f}M"  # noqa: E731
        lines.append(f"| {name} | {fmt(v['tokens_to_90pct_parent_Q'])} | {fmt(v['tokens_to_90pct_parent_threshold'])} | "
                     f"{v['train_tokens_per_s']} |")
    lines += ["", "Per-task accuracy and TPF of the last point (Q mode):", ""]
    for name, v in variants.items():
        p = v["points"][-1]
        lines.append(f"- {name}: accuracy {p['per_task']['Q']}, TPF {p['tpf_per_task']['Q']}")
    md = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(md)
    plot(variants, parent["accuracy"], out / f"{stem}.png")
    summary = {"date": date, "machine": cpu_name(), "threads": args.threads, "load1": describe(args.threads)["load1"],
               "steps": args.steps,
               "prompts": args.prompts, "parent_accuracy": parent["accuracy"], "parent_ci95": parent["ci95"],
               "plot": str((out / f"{stem}.png").relative_to(REPO)), "variants": variants}
    (out / f"{stem}.json").write_text(json.dumps(summary) + "\n")
    print(md)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
