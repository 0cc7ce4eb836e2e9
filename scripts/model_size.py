"""Parameter counts and weight footprint of a checkpoint, computed from its config.json alone (no weights read).

    python scripts/model_size.py /path/to/LLaDA2.1-mini            # a model folder or a config.json
    python scripts/model_size.py --shape llada2-mini --shape llada2-flash   # docs/design.md 5 shapes

For MoE families prints total, active (per token: k routed experts + shared + dense + attention + embeddings)
and active non-embedding parameters, and the bf16 weight bytes (2 bytes per parameter; the fp32 expert_bias
buffers add 4 bytes x experts per MoE layer, negligible). Inference needs the *total* weights resident; the
KV cache (2 x layers x kv_heads x head_dim x 2 bytes per token) and activations come on top.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from blockdiff.model.config import ModelConfig  # noqa: E402

_MOE_COMMON = {"model_type": "llada2_moe", "vocab_size": 157184, "num_key_value_heads": 4, "head_dim": 128,
               "partial_rotary_factor": 0.5, "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1,
               "n_group": 8, "topk_group": 4, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
               "rope_theta": 600000, "max_position_embeddings": 32768}
SHAPES = {  # docs/design.md 5
    "llada2-mini": dict(_MOE_COMMON, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
                        intermediate_size=5120, moe_intermediate_size=512),
    "llada2-flash": dict(_MOE_COMMON, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         intermediate_size=9216, moe_intermediate_size=1024),
}


def describe(name: str, cfg: ModelConfig) -> dict:
    total = cfg.num_parameters()
    row = {"model": name, "family": cfg.family, "total_params": total, "bf16_weights_gib": round(total * 2 / 2**30, 2),
           "kv_cache_kib_per_token_bf16": round(2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 / 1024, 1)}
    if cfg.moe is not None:
        row["active_params"] = cfg.num_parameters(active=True)
        row["active_non_embedding_params"] = cfg.num_parameters(active=True, embeddings=False)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="*", help="model folder(s) or config.json file(s)")
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), default=[], help="a built-in official shape")
    args = p.parse_args()
    if not args.model and not args.shape:
        p.error("give a model folder / config.json or --shape")
    rows = []
    for m in args.model:
        path = Path(m) / "config.json" if Path(m).is_dir() else Path(m)
        if not path.is_file():
            raise SystemExit(f"{path}: file not found")
        rows.append(describe(str(m), ModelConfig.from_hf(json.loads(path.read_text()), source=str(path))))
    rows += [describe(s, ModelConfig.from_hf(SHAPES[s], source=f"--shape {s}")) for s in args.shape]
    print("| model | total params | active params | active non-emb | bf16 weights | KV cache / token (bf16) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        act = f"{r['active_params'] / 1e9:.2f}B" if "active_params" in r else "-"
        ne = f"{r['active_non_embedding_params'] / 1e9:.2f}B" if "active_params" in r else "-"
        print(f"| {r['model']} | {r['total_params'] / 1e9:.2f}B | {act} | {ne} | {r['bf16_weights_gib']} GiB | "
              f"{r['kv_cache_kib_per_token_bf16']} KiB |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
