"""The table of `blockdiff plan` examples in docs/distributed.md, from the plan itself (tests/test_plan.py checks the
page shows exactly this).

    python scripts/plan_examples.py          # prints the markdown table
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from shapes import LLADA2_FLASH, LLADA2_MINI, QWEN25_15B  # noqa: E402

from blockdiff.model.config import ModelConfig  # noqa: E402
from blockdiff.train.plan import GIB, plan_memory  # noqa: E402

MODELS = {"Qwen2.5-1.5B": QWEN25_15B, "LLaDA2-mini": LLADA2_MINI, "LLaDA2-flash": LLADA2_FLASH}
# model, kind, L, batch per GPU, complementary masks, GPUs, activation checkpointing, loss chunk (0 = whole logits)
ROWS = [("Qwen2.5-1.5B", "diffusion", 4096, 2, False, 8, False, 1024),
        ("Qwen2.5-1.5B", "diffusion", 4096, 4, False, 8, False, 1024),
        ("Qwen2.5-1.5B", "diffusion", 4096, 4, False, 8, True, 1024),
        ("LLaDA2-mini", "sft", 4096, 1, True, 8, False, 1024),
        ("LLaDA2-mini", "sft", 4096, 1, True, 8, True, 1024),
        ("LLaDA2-mini", "sft", 32768, 1, True, 8, True, 0),
        ("LLaDA2-mini", "sft", 32768, 1, True, 8, True, 1024),
        ("LLaDA2-mini", "sft", 32768, 1, False, 8, True, 1024),
        ("LLaDA2-flash", "sft", 4096, 1, True, 64, True, 1024),
        ("LLaDA2-flash", "sft", 32768, 1, True, 64, True, 0),
        ("LLaDA2-flash", "sft", 32768, 1, True, 64, True, 1024)]


def table() -> str:
    lines = ["| model | kind | L | batch / GPU | complementary | GPUs | AC | loss chunk | weights | grads | AdamW | "
             "activations | temporaries | total GiB | KV cache (1 row, full context) | fits 80 GiB |",
             "|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, kind, L, b, comp, gpus, ac, chunk in ROWS:
        cfg = ModelConfig.from_hf(MODELS[name], source=name)
        p = plan_memory(cfg, seq_len=L, batch_size=b, block_size=32, kind=kind, devices=gpus, device="h100",
                        device_memory=80 * GIB, ac=ac, complementary=comp, loss_chunk_tokens=chunk)
        g = {k: f"{v / GIB:.1f}" for k, v in p.rows.items()}
        lines.append(f"| {name} | {kind} | {L} | {b} | {'on' if comp else 'off'} | {gpus} | {'full' if ac else 'none'} | "
                     f"{chunk or 'off'} | {g['weights']} | {g['gradients']} | {g['optimizer']} | {g['activations']} | "
                     f"{g['transient']} | {p.total / GIB:.1f} | {p.kv_cache / GIB:.2f} | {'yes' if p.fits else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
