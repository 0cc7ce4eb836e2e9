"""Memory plan of full-weight vs mask-only adapter conversion of a Qwen3-8B-shaped model (issue 19 part 5).

    python bench/plan_adapter.py [--config bench/configs/qwen3-8b.json] [--seq-len 4096] [--rank 16]

The plan is `blockdiff plan`'s (train/plan.py: counted from config.json, no weights read): 4k tokens per row,
batch 1 per device, B = 32, on 1 and 8 x 80 GB (H100), with and without full activation checkpointing. Prints a
table and ends with one JSON line; writes bench/results/plan-adapter-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from machine import write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench/configs/qwen3-8b.json")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    from blockdiff.model.config import ModelConfig
    from blockdiff.model.mask_adapter import AdapterConfig, adapter_parameters
    from blockdiff.train.plan import GIB, plan_memory

    path = REPO / args.config
    cfg = ModelConfig.from_hf(json.loads(path.read_text()), source=str(path))
    adapter = AdapterConfig(kind="lora", rank=args.rank)
    n_adapter = adapter_parameters(cfg, adapter)
    rows = []
    for name, ad, ac in (("full-weight", None, False), ("full-weight, ac full", None, True),
                         (f"adapter r{args.rank}", adapter, False), (f"adapter r{args.rank}, ac full", adapter, True)):
        row = {"run": name, "ac": ac, "adapter_rank": args.rank if ad else 0}
        for n in (1, 8):
            p = plan_memory(cfg, seq_len=args.seq_len, batch_size=1, block_size=32, devices=n, device="h100",
                            device_memory=80 * GIB, ac=ac, adapter=ad)
            row[f"x{n}"] = {"total_gib": round(p.total / GIB, 2), "fits": p.fits,
                            **{f"{k}_gib": round(v / GIB, 2) for k, v in p.rows.items()}}
        rows.append(row)
    date = dt.date.today().isoformat()
    lines = [f"# Memory plan: full vs mask-only adapter conversion ({date})", "",
             f"{args.config}: {cfg.num_parameters():,} parameters; adapter rank {args.rank} on 7 projections: "
             f"{n_adapter:,} trainable ({100 * n_adapter / cfg.num_parameters():.2f}%). {args.seq_len} tokens per "
             "row, batch 1 per device, B = 32, H100 80 GB.", "",
             "| run | 1 x 80 GB | 8 x 80 GB (FSDP2) |", "|---|---:|---:|"]

    def cell(c: dict) -> str:
        return f"{c['total_gib']:.1f} GiB, {'yes' if c['fits'] else 'no'}"

    for r in rows:
        lines.append(f"| {r['run']} | {cell(r['x1'])} | {cell(r['x8'])} |")
    md = "\n".join(lines) + "\n"
    summary = {"date": date, "config": args.config, "parameters": cfg.num_parameters(), "adapter_parameters": n_adapter,
               "seq_len": args.seq_len, "rows": rows}
    write_results(REPO / args.out, f"plan-adapter-{date}", md, summary)


if __name__ == "__main__":
    main()
