"""MoE layer cost: the sort-based grouped expert forward against a straightforward per-expert masked loop.

    python bench/moe.py [--sizes 256x512,...,512x32x256] [--experts 64] [--top-k 8] [--repeats 5]
                        [--backward] [--device cpu|cuda] [--dtype float32|bfloat16]

Both run the same `blockdiff.model.moe.MoE` layer (router + routed experts + shared expert) on the same inputs;
only the routed-expert computation differs:
  grouped  `grouped_expert_forward` (what the model runs): sort the (token, expert) pairs by expert, one matmul
           triple per expert on a contiguous slice, index_add_ back;
  loop     for every expert: find its tokens with a mask (nonzero), gather them, run the expert, index_add_ back
           (the shape of the HF reference MoE blocks).
Outputs are checked equal (allclose) before timing. Sizes are hidden x tokens [x experts]; experts are hidden/2
wide, in 8 groups with 4 kept (LLaDA2's routing shape at a smaller width). The default sizes cover training-
like batches (64 experts, 512-4096 tokens) and decoding-like ones (one 32-token block, or 8 of them, against
LLaDA2's 256 experts, where most experts get no token). Time is the median of --repeats after one warm-up, the two implementations timed alternately.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from blockdiff.model.moe import MoE  # noqa: E402
from blockdiff.model.moe_config import MoEConfig  # noqa: E402


def loop_expert_forward(x, idx, weights, w1, w3, w2):
    """Baseline: one pass over the routing table per expert. Expert weights via unbind (one view per expert,
    like HF's per-expert nn.Linear modules), not w[e], whose backward would dominate with a full-size zero
    gradient per expert."""
    out = torch.zeros_like(x)
    g1, g3, g2 = w1.unbind(0), w3.unbind(0), w2.unbind(0)
    for e in range(w1.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        ye = F.linear(F.silu(F.linear(xe, g1[e])) * F.linear(xe, g3[e]), g2[e])
        out.index_add_(0, tok, ye * weights[tok, slot, None].to(ye.dtype))
    return out


def time_pair(fn_a, fn_b, repeats: int, device) -> tuple[float, float]:
    """Median ms of fn_a and fn_b, timed alternately (a, b, a, b, ...) after one warm-up each, so drift in a
    shared machine's load and the process's first allocations hit both alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats + 1):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])) if i % 2 == 0 else ((fn_b, times[1]), (fn_a, times[0])):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i > 0:
                out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def run(hidden: int, tokens: int, experts: int, args, device, dtype) -> dict:
    m = MoEConfig(num_experts=experts, num_experts_per_tok=args.top_k, moe_intermediate_size=hidden // 2,
                  num_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    layer = MoE(hidden, m).to(device)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, hidden ** -0.5)
        layer.router.expert_bias.normal_(0, 0.01)
    layer = layer.to(dtype)
    layer.router.expert_bias.data = layer.router.expert_bias.float()
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=args.backward)
    grouped_forward = layer.experts.forward

    def loop_forward(xf, idx, w):
        ex = layer.experts
        return loop_expert_forward(xf, idx, w, ex.w1, ex.w3, ex.w2)

    def step(which):
        layer.experts.forward = grouped_forward if which == "grouped" else loop_forward
        if args.backward:
            layer.zero_grad(set_to_none=True)
            y = layer(x)
            y.float().square().mean().backward()
            return y.detach()
        with torch.no_grad():
            return layer(x)

    y_grouped, y_loop = step("grouped"), step("loop")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    ok = torch.allclose(y_grouped.float(), y_loop.float(), atol=tol, rtol=tol)
    if not ok:
        raise SystemExit(f"grouped and loop outputs differ at hidden {hidden}, tokens {tokens}: "
                         f"max |diff| {(y_grouped.float() - y_loop.float()).abs().max():.3g}")
    g_ms, l_ms = time_pair(lambda: step("grouped"), lambda: step("loop"), args.repeats, device)
    layer.experts.forward = grouped_forward
    return {"hidden": hidden, "tokens": tokens, "experts": m.num_experts, "top_k": m.num_experts_per_tok,
            "expert_width": m.moe_intermediate_size, "grouped_ms": round(g_ms, 2), "loop_ms": round(l_ms, 2),
            "speedup": round(l_ms / g_ms, 2), "outputs_equal": ok}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256x512,256x2048,512x1024,512x4096,512x32x256,512x256x256",
                   help="hidden x tokens [x experts], comma separated")
    p.add_argument("--experts", type=int, default=64, help="routed experts where a size does not give them")
    p.add_argument("--top-k", type=int, default=8, help="experts per token")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (median)")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for size in args.sizes.split(","):
        parts = [int(v) for v in size.lower().split("x")]
        hidden, tokens, experts = (parts + [args.experts])[:3]
        rows.append(run(hidden, tokens, experts, args, device, dtype))
    hw = (torch.cuda.get_device_name() if device.type == "cuda" else
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}")
    mode = "fwd+bwd" if args.backward else "fwd"
    print(f"MoE layer ({mode}, {args.dtype}, {hw}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print("| hidden | tokens | experts | top-k | expert width | grouped ms | loop ms | speedup | outputs equal |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['hidden']} | {r['tokens']} | {r['experts']} | {r['top_k']} | {r['expert_width']} | "
              f"{r['grouped_ms']} | {r['loop_ms']} | {r['speedup']}x | {r['outputs_equal']} |")
    print(json.dumps({"bench": "moe", "date": dt.date.today().isoformat(), "device": hw, "mode": mode,
                      "dtype": args.dtype, "rows": rows, "speedup_min": min(r["speedup"] for r in rows),
                      "speedup_max": max(r["speedup"] for r in rows)}))


if __name__ == "__main__":
    main()
