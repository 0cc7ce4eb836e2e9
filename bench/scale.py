"""Scaling of block-diffusion training over ranks (issue 14 part 7), through the path users run: `blockdiff convert`
on a recipe, plain and under `torchrun` (FSDP2, gloo on CPU).

Three runs of the same recipe and the same global batch G on the bundled model (assets/tiny-ar):
  plain      one process, the plain loop ([parallel] fsdp = "off"), batch G            -- the baseline
  fsdp x1    torchrun --nproc-per-node 1 (FSDP2 on a 1-rank group), batch G            -- FSDP2's own overhead
  fsdp x2    torchrun --nproc-per-node 2, batch G/2 per rank                            -- data parallelism
Every rank uses --threads torch threads (default 1), so on a 2-core machine 2 ranks can at best double 1 rank.
Throughput is measured between the end of step --warmup and the last step from the loop's own metrics.jsonl
(cumulative tokens / elapsed per step), so start-up, data loading and checkpoint writing at the end are excluded;
checkpoints are saved only at the end. The quality number beside the speed is the final train loss (the runs see
the same rows; noise draws differ per rank), averaged over the timed steps. GPU throughput / MFU are not measured here (no GPU was lent to
this run); the JSON says so.

    python bench/scale.py                       # prints a table, ends with one JSON line
    python bench/scale.py --steps 30 --batch 16 --seq-len 256
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import describe

from blockdiff.data.bundled import write_bundled_corpus

REPO = Path(__file__).resolve().parents[1]


def recipe_toml(model: Path, data: Path, *, batch: int, seq_len: int, steps: int, threads: int, fsdp: str,
                device: str = "cpu", block_size: int = 32) -> str:
    """The measured recipe (also bench/gpu.py's FSDP2 section): one phase, checkpoints and evals only at the end."""
    return f"""
[model]
path = "{model}"
[data]
train = ["{data / 'train.jsonl'}"]
seq_len = {seq_len}
[train]
batch_size = {batch}
warmup_steps = 2
save_every = {steps}
eval_every = {steps}
threads = {threads}
device = "{device}"
[parallel]
fsdp = "{fsdp}"
[[phases]]
block_size = {block_size}
steps = {steps}
lr = 3e-4
"""


def run(name: str, nproc: int, toml: Path, out: Path, warmup: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    args = ["convert", "--recipe", str(toml), "--out", str(out), "--no-progress"]
    if nproc == 0:
        cmd = [sys.executable, "-m", "blockdiff.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "blockdiff.cli", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    a, b = steps[warmup - 1], steps[-1]
    # the loop logs cumulative tokens / elapsed: elapsed(step s) = s * tokens_per_step / tokens_per_s(s)
    saved = json.loads((out / "checkpoints" / f"step_{b['step']:06d}" / "recipe.json").read_text())
    tps = saved["train"]["batch_size"] * saved["data"]["seq_len"] * saved["parallel"]["ranks"]
    t_a, t_b = a["step"] * tps / a["tokens_per_s"], b["step"] * tps / b["tokens_per_s"]
    return {"name": name, "ranks": max(nproc, 1), "tokens_per_s": (b["step"] - a["step"]) * tps / (t_b - t_a),
            "step_ms": (t_b - t_a) / (b["step"] - a["step"]) * 1e3,
            "loss": sum(r["loss"] for r in steps[warmup:]) / len(steps[warmup:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "assets" / "tiny-ar"), help="HF model folder")
    ap.add_argument("--steps", type=int, default=24, help="optimiser steps per run")
    ap.add_argument("--warmup", type=int, default=4, help="steps excluded from the timing")
    ap.add_argument("--batch", type=int, default=16, help="global batch G (rows); 2 ranks take G/2 each")
    ap.add_argument("--seq-len", type=int, default=256, help="L, tokens per row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder")
    args = ap.parse_args()
    if args.batch % 2 or args.batch < 2:
        ap.error(f"--batch must be even and >= 2 (2 ranks take half each), got {args.batch}")
    if not 1 <= args.warmup < args.steps:
        ap.error(f"--warmup must be in [1, --steps), got {args.warmup}")
    tmp = Path(tempfile.mkdtemp(prefix="blockdiff-scale-"))
    data = tmp / "data"
    write_bundled_corpus(data, train_examples=3000, train_code_chars=200_000, valid_examples=50)
    model = Path(args.model).resolve()
    results = []
    for name, nproc, batch, fsdp in (("plain", 0, args.batch, "off"), ("fsdp x1", 1, args.batch, "auto"),
                                     ("fsdp x2", 2, args.batch // 2, "auto")):
        toml = tmp / f"{name.replace(' ', '_')}.toml"
        toml.write_text(recipe_toml(model, data, batch=batch, seq_len=args.seq_len, steps=args.steps,
                                    threads=args.threads, fsdp=fsdp))
        results.append(run(name, nproc, toml, tmp / name.replace(" ", "_"), args.warmup))
    plain, one, two = results
    machine = describe()
    lines = [f"bench/scale.py: bundled model, global batch {args.batch} x L {args.seq_len}, B=32, {args.steps} steps "
             f"({args.warmup} untimed), {args.threads} thread(s) per rank; {machine['cpu']}, {machine['cores']} cores, "
             f"1-minute load {machine['load1']} at the start", "",
             "| run | ranks | tokens/s | step ms | vs plain | mean train loss (timed steps) |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['ranks']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.0f} | "
                     f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x | {r['loss']:.3f} |")
    print("\n".join(lines))
    summary = {
        "bench": "scale", "date": dt.date.today().isoformat(), "machine": machine, "model": str(model),
        "global_batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "threads_per_rank": args.threads,
        "tokens_per_s_plain": round(plain["tokens_per_s"], 1), "tokens_per_s_1rank": round(one["tokens_per_s"], 1),
        "tokens_per_s_2ranks": round(two["tokens_per_s"], 1),
        "fsdp_overhead": round(plain["tokens_per_s"] / one["tokens_per_s"] - 1, 4),  # extra time per token at 1 rank
        "scaling_2ranks": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
        "mean_loss": {r["name"]: round(r["loss"], 4) for r in results},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scale-{summary['date']}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / f"scale-{summary['date']}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
