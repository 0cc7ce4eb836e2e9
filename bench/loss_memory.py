"""Peak memory of the loss at a large vocabulary: the head applied in chunks vs the whole [b, L, V] logits (issue 20
part 4), with the loss and gradients of both compared, and the memory plan of LLaDA2-mini SFT at 32k.

    python bench/loss_memory.py [--vocab 151936] [--seq-len 1024] [--batch 2] [--chunks 0,1024,512,256]

Each setting runs in a fresh process: a tiny random model with a Qwen-sized vocabulary (hidden 64, 2 layers,
untied head), one forward + backward of the real objective (`diffusion_loss`, B = 32 on [x_t ; x0], every token
masked: t = 1, the case the plan counts; and `ar_loss`), fp32, 1 thread. Peak = VmHWM of that process; the loss
peak = VmHWM minus the RSS before the step (weights, torch). Chunk 0 = off (today's full logits). The equality
check runs both objectives at chunk 0 and at each chunk on the same weights and batch. The plan rows are
`blockdiff plan`'s for the README's LLaDA2-mini SFT example (32k, batch 1, 8 x H100 80 GB, ac full). Prints a
table, ends with one JSON line; writes bench/results/loss-memory-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from blockdiff.model.config import ModelConfig
from blockdiff.model.transformer import Transformer
from blockdiff.objectives.diffusion import DiffusionLossConfig, ar_loss, diffusion_loss
torch.set_num_threads(1)
kind, V, L, b, chunks = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
model = Transformer(ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=16, tie_word_embeddings=False, max_position_embeddings=L))
model.init_weights(seed=0)
x0 = torch.randint(0, V - 1, (b, L), generator=torch.Generator().manual_seed(1))

def step(c):
    model.zero_grad(set_to_none=True)
    if kind == "ar":
        loss, m = ar_loss(model, {"input_ids": x0}, chunk_tokens=c)
    else:
        cfg = DiffusionLossConfig(mask_token_id=V - 1, block_size=32, t_lo=1.0, t_hi=1.0, loss_chunk_tokens=c)
        loss, m = diffusion_loss(model, {"input_ids": x0}, cfg, generator=torch.Generator().manual_seed(2))
    loss.backward()
    return float(loss.detach()), m, {n: p.grad.clone() for n, p in model.named_parameters()}

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

if chunks.startswith("compare:"):  # loss and gradients, chunk 0 vs each chunk
    ref = step(0)
    out = {}
    for c in map(int, chunks[8:].split(",")):
        got = step(c)
        rel = max(float((got[2][n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in ref[2].items())
        out[c] = {"loss_abs_diff": abs(got[0] - ref[0]), "grad_max_rel_diff": rel,
                  "metrics_equal": all(abs(got[1][k] - ref[1][k]) <= 1e-6 * max(1, abs(ref[1][k])) for k in ref[1])}
    print(json.dumps({"loss": ref[0], "by_chunk": out}))
else:
    c = int(chunks)
    base = status("VmRSS")
    t0 = time.perf_counter()
    loss, _, _ = step(c)
    print(json.dumps({"loss": loss, "base": base, "hwm": status("VmHWM"), "step_s": time.perf_counter() - t0}))
"""


def run_child(*args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "src"), *map(str, args)], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llada2_mini_plans() -> list[dict]:
    """`blockdiff plan` for the README's LLaDA2-mini 32k SFT rows (shape from scripts/model_size.py)."""
    from blockdiff.model.config import ModelConfig
    from blockdiff.objectives.chunked_ce import LOSS_CHUNK_TOKENS
    from blockdiff.train.plan import GIB, plan_memory

    spec = importlib.util.spec_from_file_location("model_size", REPO / "scripts" / "model_size.py")
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    cfg = ModelConfig.from_hf(shapes.SHAPES["llada2-mini"], source="llada2-mini")
    rows = []
    for comp in (True, False):
        for chunk in (0, LOSS_CHUNK_TOKENS):
            p = plan_memory(cfg, seq_len=32768, batch_size=1, block_size=32, kind="sft", devices=8, device="h100",
                            device_memory=80 * GIB, ac=True, complementary=comp, loss_chunk_tokens=chunk)
            rows.append({"complementary": comp, "loss_chunk_tokens": chunk,
                         **{f"{k}_gib": round(v / GIB, 1) for k, v in p.rows.items()},
                         "total_gib": round(p.total / GIB, 1), "fits_80gib": p.fits})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--chunks", default="0,1024,512,256", help="chunk sizes in tokens; 0 = off (full logits)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    mib = 2**20
    rows = []
    for kind in ("diffusion", "ar"):
        for c in chunks:
            r = run_child(kind, args.vocab, args.seq_len, args.batch, c)
            rows.append({"objective": kind, "chunk": c, "loss": r["loss"], "peak_mib": round(r["hwm"] / mib),
                         "loss_peak_mib": round((r["hwm"] - r["base"]) / mib), "step_s": round(r["step_s"], 2)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    same = {kind: run_child(kind, args.vocab, args.seq_len, args.batch, "compare:" + ",".join(str(c) for c in chunks
                                                                                              if c))
            for kind in ("diffusion", "ar")}
    plans = llada2_mini_plans()

    date = dt.date.today().isoformat()
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), 1 thread, fp32"
    lines = [f"# Loss memory: chunked head vs full logits ({date})", "",
             f"{machine}. Tiny untied model (hidden 64, 2 layers) with vocabulary {args.vocab:,}; batch {args.batch} x "
             f"{args.seq_len} tokens; one forward + backward; peak = VmHWM of a fresh process, loss peak = VmHWM "
             "minus RSS before the step. diffusion: B = 32 on [x_t ; x0], every token masked (t = 1).", "",
             "| objective | chunk (tokens) | loss | peak MiB | loss peak MiB | cut vs off | step s | max rel grad diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for r in rows:
        off = next(x for x in rows if x["objective"] == r["objective"] and x["chunk"] == 0)
        cut = off["loss_peak_mib"] / max(r["loss_peak_mib"], 1)
        diff = "-" if r["chunk"] == 0 else f"{same[r['objective']]['by_chunk'][str(r['chunk'])]['grad_max_rel_diff']:.1e}"
        lines.append(f"| {r['objective']} | {r['chunk'] or 'off'} | {r['loss']:.6f} | {r['peak_mib']} | "
                     f"{r['loss_peak_mib']} | {cut:.1f}x | {r['step_s']} | {diff} |")
        summary[f"{r['objective']}_chunk{r['chunk']}_loss_peak_mib"] = r["loss_peak_mib"]
    lines += ["", "Loss and gradients, chunked vs off (same weights and batch):", ""]
    for kind, s in same.items():
        for c, d in s["by_chunk"].items():
            lines.append(f"- {kind}, chunk {c}: |loss diff| {d['loss_abs_diff']:.1e}, max relative gradient "
                         f"difference {d['grad_max_rel_diff']:.1e}, metrics equal: {d['metrics_equal']}")
    lines += ["", "Memory plan (`blockdiff plan`) of the README's LLaDA2-mini SFT at 32k, batch 1 per GPU, 8 x H100 "
              "80 GB, ac full:", "",
              "| complementary | loss chunk | weights | grads | AdamW | activations | transient | total GiB | fits |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in plans:
        lines.append(f"| {'on' if p['complementary'] else 'off'} | {p['loss_chunk_tokens'] or 'off'} | "
                     f"{p['weights_gib']} | {p['gradients_gib']} | {p['optimizer_gib']} | {p['activations_gib']} | "
                     f"{p['transient_gib']} | {p['total_gib']} | {'yes' if p['fits_80gib'] else 'no'} |")
    md = "\n".join(lines) + "\n"
    print(md)
    result = {"bench": "loss_memory", "date": date, "machine": machine, "vocab": args.vocab, "seq_len": args.seq_len,
              "batch": args.batch, "rows": rows, "equality": same, "llada2_mini_32k_plan": plans, **summary}
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"loss-memory-{date}.md").write_text(md)
    (out / f"loss-memory-{date}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"bench": "loss_memory", **summary,
                      "llada2_mini_32k_fits": [p["fits_80gib"] for p in plans if p["loss_chunk_tokens"]]}))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"[loss_memory] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
