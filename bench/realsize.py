"""A real-size shape converted, decoded and served on this CPU (issue 20 part 6): what a user with a 0.5B checkpoint
and no GPU sees, in one run.

    python bench/realsize.py                         # Qwen2.5-0.5B shape; results under bench/results/
    python bench/realsize.py --shape llama-3.2-1b --steps 4 --no-save

The parent is the published shape (bench/shapes.py) at random init with the bundled tokenizer, which has no mask
token and 1,024 ids: `<|mask|>` lands on an unused row of the 151,936-row table, as it would for a real Qwen
tokenizer. No weights are downloaded; a random parent has nothing to keep, so the accuracies of this bench are
not quality numbers (they are printed, beside the speed, as the rules ask, and they are ~0). What it measures:

  convert   `blockdiff convert` of a short recipe (--steps steps of 1 x --seq-len rows, B 4 then 32, one
            checkpoint at the end): training tokens/s, wall time, peak RSS of the process against `blockdiff plan`,
            and the report's evaluation time against the training's ([eval] time_share, default 0.5: the report
            may not cost more than the training it reports on);
  decode    bench/decode.py on the converted model at batch 1: the AR parent (HF generate), the converted model's
            own AR, S, Q, threshold and spec, tokens/s and tokens per forward on the task prompts and on a
            --speed-tokens continuation; spec's agreement with own AR (lossless: must be 1.0);
  cost      bench/cost.py's cost curve of one cached forward at batch 1: ms per forward against query tokens k,
            the fit c(1 + beta(k - 1));
  serve     `blockdiff serve` with default flags: the KV-cache line it prints at start, and one request answered.

Prints a table, saves bench/results/realsize-<date>.{md,json} (unless --no-save), ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from machine import cpu_name, describe, write_results  # noqa: E402
from shapes import MINIATURE, SHAPES  # noqa: E402

SHAPES = SHAPES | MINIATURE

BLOCKDIFF = [sys.executable, "-m", "blockdiff.cli"]
RECIPE = """# bench/realsize.py: a short conversion of a real-size shape on CPU
[model]
path = "{parent}"
mask_token = "<|mask|>"

[data]
train = ["{data}/train.jsonl"]
valid = ["{data}/valid.jsonl"]
seq_len = {L}
valid_rows = 2

[train]
batch_size = 1
seed = 0
warmup_steps = 1
decay_steps = 1
grad_clip = 1.0
eval_every = 1000            # validation and checkpoints at phase ends only
save_every = 1000
keep_last = 1

[objective]
kind = "diffusion"
labels = "shift"
clean_stream = "causal"

[diffusion]
ar_weight = 1.0

[[phases]]
name = "warmup-B4"
block_size = 4
steps = {s1}
lr = 1e-4

[[phases]]
name = "stable-B32"
block_size = 32
steps = {s2}
lr = 1e-4

[eval]
tasks = {tasks}
max_new_tokens = 16
steps = 32
"""


def run(cmd: list[str], *, threads: int, log: Path, timeout: float = 7200) -> str:
    """Run `cmd` with `threads` torch threads; its stdout (stderr to `log`); exit with its tail when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "src"))
    with open(log, "a") as err:
        out = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                             timeout=timeout, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:4]))} ... failed (exit {out.returncode}); see {log}:\n"
                         + log.read_text()[-3000:])
    return out.stdout


def make_parent(shape: str, folder: Path, published: bool = False) -> int:
    """The random parent of `shape` (its published, uncut config with `published`), saved with the bundled tokenizer;
    returns its parameter count."""
    import torch

    from blockdiff.data.tokenizer import load_tokenizer
    from blockdiff.model.build import build_model
    from blockdiff.model.config import ModelConfig
    from blockdiff.model.hf_io import save_pretrained

    entry = SHAPES[shape]
    cfg = ModelConfig.from_hf(entry.get("published", entry["config"]) if published else entry["config"], source=shape)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(seed=0)
    save_pretrained(model, folder, tokenizer=load_tokenizer(REPO / "assets" / "tiny-ar"))
    return cfg.num_parameters()


def child_peak_gib() -> float:
    """The largest peak RSS of the children waited for so far (ru_maxrss, KiB). This process stays small (no model),
    so a child's value is its own peak, not the one Linux carries over from its parent at fork."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def convert(args, parent: Path, work: Path, log: Path) -> dict:
    run(BLOCKDIFF + ["make-data", "--out", work / "data"], threads=1, log=log)
    s1 = max(1, args.steps // 3)
    recipe = work / "recipe.toml"
    recipe.write_text(RECIPE.format(parent=parent, data=work / "data", L=args.seq_len, s1=s1, s2=args.steps - s1,
                                    tasks=args.eval_tasks))
    plan = json.loads(run(BLOCKDIFF + ["plan", "--recipe", recipe, "--device", "cpu"], threads=1, log=log)
                      .strip().splitlines()[-1])
    t0 = time.perf_counter()
    run(BLOCKDIFF + ["convert", "--recipe", recipe, "--out", work / "bd", "--set", f"train.threads={args.threads}"],
        threads=args.threads, log=log)
    wall = time.perf_counter() - t0
    report = json.loads((work / "bd" / "report.json").read_text())
    tasks = report["tasks"]
    return {"steps": report["steps"], "rows": f"1 x {args.seq_len}", "train_tokens_per_s": report["train_tokens_per_s"],
            "train_wall_s": report["train_wall_s"], "eval_s": tasks["eval_s"], "eval_prompts": tasks["prompts"],
            "eval_prompts_asked": args.eval_tasks, "eval_over_train": round(tasks["eval_s"] / report["train_wall_s"], 2),
            "wall_s": round(wall, 1), "peak_rss_gib": round(child_peak_gib(), 2),
            "plan_gib": round(plan["total_bytes"] / 2**30, 2), "model": report["model"],
            "accuracy": {"parent": tasks["ar_parent"]["accuracy"],
                         **{m: v["accuracy"] for m, v in tasks["converted_rows"].items()}}}


def decode(args, parent: Path, model: str, log: Path) -> dict:
    out = run([sys.executable, REPO / "bench" / "decode.py", "--model", model, "--parent", parent,
               "--decoders", "ar,own-ar,S,Q,threshold,spec", "--batches", "1", "--tasks", args.decode_tasks,
               "--speed-prompts", "1", "--speed-tokens", args.speed_tokens, "--threads", args.threads,
               "--no-save"], threads=args.threads, log=log)
    summary = json.loads(out.strip().splitlines()[-1])["batch1"]
    return summary


def cost(args, model: str, log: Path) -> dict:
    out = run([sys.executable, REPO / "bench" / "cost.py", "--model", model, "--batches", "1",
               "--ks", "1,2,4,8,16,32", "--drafts", "3", "--warmup", "1", "--repeats", "3",
               "--threads", args.threads, "--no-save"], threads=args.threads, log=log)
    return json.loads(out.strip().splitlines()[-1])


def serve(args, model: str, log: Path, mode: str | None = "S") -> dict:
    import httpx
    from serve_helpers import running_server

    with running_server(Path(model), log=log, threads=args.threads, startup_s=600) as url:
        line = next((s for s in log.read_text().splitlines() if "KV cache" in s), "")
        name = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "add 12+34=", "max_tokens": 8}
                       | ({"mode": mode} if mode else {}), timeout=600)
        latency = time.perf_counter() - t0
    m = re.search(r"KV cache ([\d.]+) GiB", line)
    return {"status": r.status_code, "latency_s": round(latency, 1), "kv_cache_gib": float(m[1]) if m else None,
            "start_line": line.strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=6, help="training steps in all (a third at B = 4, the rest at 32)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tasks", type=int, default=32, help="prompts the conversion report asks for")
    p.add_argument("--decode-tasks", type=int, default=4, help="task prompts per decoder")
    p.add_argument("--speed-tokens", type=int, default=32, help="generated tokens of the continuation workload")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--serve-only", action="store_true",
                   help="only `blockdiff serve` the random parent (an AR model, the published shape uncut) with default "
                        "flags: does it fit and answer? Prints the JSON, saves nothing")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2 (one phase at B = 4, one at B = 32)")
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="realsize-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    timings = {}
    t0 = time.perf_counter()
    params = make_parent(args.shape, work / "parent", published=args.serve_only)
    timings["parent_s"] = round(time.perf_counter() - t0, 1)
    res: dict = {"bench": "realsize", "date": dt.date.today().isoformat(), "cpu": cpu_name(), "threads": args.threads,
                 "load1_at_start": describe(args.threads)["load1"], "shape": args.shape,
                 "cut": "none" if args.serve_only and "published" in SHAPES[args.shape] else SHAPES[args.shape]["cut"],
                 "params": params}
    print(f"[realsize] parent {args.shape}: {params / 1e6:.0f}M params in {timings['parent_s']} s", flush=True)
    if args.serve_only:
        res["serve_parent"] = serve(args, str(work / "parent"), work / "serve.log", mode=None)
        if tmp is not None:
            tmp.cleanup()
        print(json.dumps(res))
        return
    res["convert"] = convert(args, work / "parent", work, log)
    print(f"[realsize] convert: {res['convert']}", flush=True)
    model = res["convert"].pop("model")
    res["decode"] = decode(args, work / "parent", model, log)
    print("[realsize] decode done", flush=True)
    res["cost"] = cost(args, model, log)
    print("[realsize] cost done", flush=True)
    res["serve"] = serve(args, model, work / "serve.log")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["load1_at_end"] = describe(args.threads)["load1"]
    if tmp is not None:
        tmp.cleanup()
    md = table(res)
    if args.no_save:
        print(md)
        print(json.dumps(res))
    else:
        write_results(REPO / "bench" / "results", f"realsize-{res['date']}", md, res)


def table(r: dict) -> str:
    c = r["convert"]
    lines = [f"# Real-size shape on CPU: {r['shape']} ({r['params'] / 1e6:.0f}M parameters, random init; cut: {r['cut']})",
             "", f"{r['date']}, {r['cpu']}, {r['threads']} threads, load {r['load1_at_start']} -> {r['load1_at_end']}; "
             f"whole bench {r['wall_s']} s.", "", "## Conversion", "",
             "| steps | rows | training tokens/s | training s | report evaluation s (prompts) | evaluation / training |"
             " peak RSS | plan |", "|---:|---|---:|---:|---:|---:|---:|---:|",
             f"| {c['steps']} | {c['rows']} | {c['train_tokens_per_s']} | {c['train_wall_s']} | {c['eval_s']} "
             f"({c['eval_prompts']} of {c['eval_prompts_asked']}) | {c['eval_over_train']} | {c['peak_rss_gib']} GiB | "
             f"{c['plan_gib']} GiB |", "", "## Decoding at batch 1", "",
             "| decoder | task tokens/s | TPF | vs AR parent | continuation tokens/s | TPF | vs AR parent | accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in r["decode"].items():
        if not isinstance(d, dict):
            continue
        agree = f" (= own AR: {d['agreement_ar']:.2f} / {d['code_agreement_ar']:.2f})" if "agreement_ar" in d else ""
        lines.append(f"| {name}{agree} | {d['task_tps']} | {d['task_tpf']} | {d.get('task_vs_ar', '-')} | {d['tps']} | "
                     f"{d['tpf']} | {d.get('vs_ar', '-')} | {d['accuracy']:.3f} |")
    c1 = r["cost"]["batch1"]
    lines += ["", "## One cached forward at batch 1 (bench/cost.py)", "",
              f"cost(1) = {c1['c_ms']:.1f} ms; fit cost(k) = c (1 + beta (k - 1)) with beta {c1['beta']:.4f}; "
              + ", ".join(f"cost({k}) / cost(1) = {v}" for k, v in c1["ratio"].items())
              + f"; spec (d = 3) break-even tokens per forward {c1['spec_break_even'].get('3')}"]
    s = r["serve"]
    lines += ["", "## `blockdiff serve`, default flags", "", f"- start: `{s['start_line']}`",
              f"- one S-mode completion of 8 tokens: HTTP {s['status']} in {s['latency_s']} s"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
