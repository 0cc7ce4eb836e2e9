"""The memory plan (`blockdiff plan`, train/plan.py) against the measured peak of real-size shapes on this CPU (issue
20 part 5, issue 21 item 4).

    python bench/plan_shapes.py                    # every shape, results saved under bench/results/
    python bench/plan_shapes.py --shape qwen2.5-0.5b --no-save

Each shape runs in a fresh child process: build the model from its published config.json fields at random init
(no weights downloaded), fp32, then three steps of the conversion objective (block diffusion on [x_t ; x0] with
shifted labels, a causal clean stream and the AR loss, as recipes/tiny_wsd.toml; chunked loss head) with AdamW and
gradient clipping. The measured peak is VmHWM minus the RSS before the model was built (the interpreter and torch
themselves, ~0.3 GiB, are not the run's), against the plan's total for the same run. Beside it, the bytes autograd
saved for backward (a saved_tensors_hooks count, deduplicated by storage) against the plan's counted activations:
the part of the plan that is counted rather than read off the parameter count.

Shapes are cut to the smallest size that still shows what the plan must count (the issue: "at the smallest size
that still shows the effect"): the Qwen shapes in full, the Llama shape and the MoE shape with fewer layers or
experts; each row says what was cut. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from machine import cpu_name, write_results  # noqa: E402
from shapes import SHAPES  # noqa: E402

# Child: prints one JSON line. argv: shape name, b, L, B, steps, threads.
CHILD = r"""
import json, sys, time
import torch
from torch.autograd.graph import saved_tensors_hooks
sys.path.insert(0, sys.argv[7])
from shapes import SHAPES
from blockdiff.model.build import build_model
from blockdiff.model.config import ModelConfig
from blockdiff.objectives.diffusion import DiffusionLossConfig, diffusion_loss

name, b, L, B, steps, threads, layers = sys.argv[1], *map(int, sys.argv[2:7]), int(sys.argv[8])
torch.set_num_threads(threads)
torch.manual_seed(0)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

base = rss()
hf = SHAPES[name]["config"] | ({"num_hidden_layers": layers} if layers else {})
cfg = ModelConfig.from_hf(hf, source=name)
model = build_model(cfg).train()
weights = rss() - base
V = cfg.vocab_size
opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
g = torch.Generator().manual_seed(0)
lcfg = DiffusionLossConfig(mask_token_id=V - 1, block_size=B, shift=True, clean_causal=True, ar_weight=1.0)
saved = {}

def pack(t):
    s = t.untyped_storage()
    saved[s.data_ptr()] = s.nbytes()
    return t

def reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

step_s, phases = [], []
for step in range(steps):
    batch = {"input_ids": torch.randint(0, V - 1, (b, L), generator=g)}
    t0 = time.perf_counter()
    row = {"start": rss() - base}
    peak_so_far = hwm()
    reset_hwm()
    if step == steps - 1:
        saved.clear()
        with saved_tensors_hooks(pack, lambda t: t):
            loss, _ = diffusion_loss(model, batch, lcfg, generator=g)
        param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved_bytes = sum(v for k, v in saved.items() if k not in param_ptrs)
    else:
        loss, _ = diffusion_loss(model, batch, lcfg, generator=g)
    row["forward_peak"] = hwm() - base
    reset_hwm()
    loss.backward()
    row["backward_peak"] = hwm() - base
    reset_hwm()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    row["step_peak"] = hwm() - base
    opt.zero_grad(set_to_none=True)
    row["end"] = rss() - base
    phases.append(row)
    step_s.append(time.perf_counter() - t0)
peak = max(max(r["forward_peak"], r["backward_peak"], r["step_peak"]) for r in phases)
print(json.dumps({"peak": peak, "phases": phases, "weights_rss": weights, "saved": saved_bytes, "step_s": step_s,
                  "params": cfg.num_parameters(), "loss": float(loss.detach())}))
"""


def measure(name: str, b: int, L: int, B: int, steps: int, threads: int, layers: int = 0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-c", CHILD, name, str(b), str(L), str(B), str(steps), str(threads),
                          str(REPO / "bench"), str(layers)], capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{name}: the measuring child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan_of(name: str, b: int, L: int, B: int, layers: int = 0):
    from blockdiff.model.config import ModelConfig
    from blockdiff.train.plan import plan_memory

    hf = SHAPES[name]["config"] | ({"num_hidden_layers": layers} if layers else {})
    cfg = ModelConfig.from_hf(hf, source=name)
    return plan_memory(cfg, seq_len=L, batch_size=b, block_size=B, kind="diffusion", device="cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: every shape")
    p.add_argument("--batch-size", type=int, default=1, help="rows per step")
    p.add_argument("--seq-len", type=int, default=512, help="L (the forward runs T = 2L)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count (0 = the shape's)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    names = args.shape or list(SHAPES)
    rows = []
    gib = 2**30
    for name in names:
        t0 = time.time()
        m = measure(name, args.batch_size, args.seq_len, args.block_size, args.steps, args.threads, args.layers)
        plan = plan_of(name, args.batch_size, args.seq_len, args.block_size, args.layers)
        row = {"shape": name, "cut": SHAPES[name]["cut"], "params": m["params"],
               "b": args.batch_size, "L": args.seq_len, "B": args.block_size,
               "plan_gib": round(plan.total / gib, 3), "measured_gib": round(m["peak"] / gib, 3),
               "plan_over_measured": round(plan.total / m["peak"], 3),
               "plan_rows_gib": {k: round(v / gib, 3) for k, v in plan.rows.items()},
               "plan_activations_gib": round(plan.rows["activations"] / gib, 3),
               "saved_for_backward_gib": round(m["saved"] / gib, 3),
               "phases_gib": [{k: round(v / gib, 3) for k, v in ph.items()} for ph in m["phases"]],
               "step_s": round(min(m["step_s"][1:] or m["step_s"]), 2), "wall_s": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{name}: plan {row['plan_gib']:.2f} GiB, measured {row['measured_gib']:.2f} GiB "
              f"(plan/measured {row['plan_over_measured']:.2f}); activations plan {row['plan_activations_gib']:.2f} "
              f"GiB, saved for backward {row['saved_for_backward_gib']:.2f} GiB; {row['step_s']} s/step", flush=True)
    lines = ["| shape | cut | params | b x L, B | plan | measured peak | plan / measured | activations: plan | "
             "saved for backward | s / step |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['cut']} | {r['params'] / 1e6:.0f}M | {r['b']} x {r['L']}, {r['B']} | "
                     f"{r['plan_gib']:.2f} GiB | {r['measured_gib']:.2f} GiB | {r['plan_over_measured']:.2f} | "
                     f"{r['plan_activations_gib']:.2f} GiB | {r['saved_for_backward_gib']:.2f} GiB | {r['step_s']} |")
    table = "\n".join(lines)
    result = {"bench": "plan_shapes", "cpu": cpu_name(), "threads": args.threads, "rows": rows,
              "worst_abs_error": round(max(abs(r["plan_over_measured"] - 1) for r in rows), 3)}
    if args.no_save:
        print(table)
        print(json.dumps(result))
    else:
        write_results(REPO / "bench" / "results", f"plan-shapes-{time.strftime('%Y-%m-%d')}", table + "\n", result)


if __name__ == "__main__":
    main()
