"""Tiny LLaDA2-MoE / Ling 2.0 checkpoints in the official HF layout, written independently of our adapter:
config.json in the official spelling, one tensor per expert under the official names, sharded safetensors with
model.safetensors.index.json (no real weights exist on this machine; shapes follow docs/design.md 5)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from blockdiff.data.tokenizer import save_tokenizer, train_bpe_tokenizer

VOCAB_TEXTS = ["the quick brown fox jumps over the lazy dog 0123456789 " * 4, "def f(x): return x + 1\n" * 4]


def official_config(family: str = "llada2_moe", **overrides) -> dict:
    """hidden 64, 3 layers (layer 0 dense), 8 experts in 2 groups, top-2, partial rotary 0.5."""
    arch = {"llada2_moe": "LLaDA2MoeModelLM", "bailing_moe_v2": "BailingMoeV2ForCausalLM"}[family]
    mod = {"llada2_moe": "llada2_moe", "bailing_moe_v2": "bailing_moe_v2"}[family]
    cfg_cls = {"llada2_moe": "LLaDA2MoeConfig", "bailing_moe_v2": "BailingMoeV2Config"}[family]
    hf = {
        "architectures": [arch],
        "auto_map": {"AutoConfig": f"configuration_{mod}.{cfg_cls}",
                     "AutoModelForCausalLM": f"modeling_{mod}.{arch}"},
        "model_type": family,
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "partial_rotary_factor": 0.5,
        "rope_theta": 600000,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "norm_head": False,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_shared_experts": 1,
        "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 32,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "router_dtype": "fp32",
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    if family == "bailing_moe_v2":
        hf["num_nextn_predict_layers"] = 0
    hf.update(overrides)
    return hf


def official_tensors(hf: dict, seed: int = 0, mtp_layers: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official names. Norms near 1 and a non-zero expert_bias, so a dropped or
    misplaced tensor changes the output. `mtp_layers` appends Ling-style MTP layers (keys beyond the decoder)."""
    g = torch.Generator().manual_seed(seed)
    d, V, hd = hf["hidden_size"], hf["vocab_size"], hf["head_dim"]
    H, Hkv, E = hf["num_attention_heads"], hf["num_key_value_heads"], hf["num_experts"]
    inter, moe_inter = hf["intermediate_size"], hf["moe_intermediate_size"]

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    t = {"model.word_embeddings.weight": w(V, d, std=0.5), "model.norm.weight": norm(d), "lm_head.weight": w(V, d)}
    for i in range(hf["num_hidden_layers"] + mtp_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(d)
        t[p + "post_attention_layernorm.weight"] = norm(d)
        t[p + "attention.query_key_value.weight"] = w((H + 2 * Hkv) * hd, d)
        t[p + "attention.dense.weight"] = w(d, H * hd)
        t[p + "attention.query_layernorm.weight"] = norm(hd)
        t[p + "attention.key_layernorm.weight"] = norm(hd)
        if i < hf["first_k_dense_replace"]:
            for proj, shape in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
                t[p + f"mlp.{proj}.weight"] = w(*shape)
            continue
        t[p + "mlp.gate.weight"] = w(E, d, std=0.3)
        t[p + "mlp.gate.expert_bias"] = 0.05 * torch.randn(E, generator=g)
        for e in range(E):
            for proj, shape in (("gate_proj", (moe_inter, d)), ("up_proj", (moe_inter, d)), ("down_proj", (d, moe_inter))):
                t[p + f"mlp.experts.{e}.{proj}.weight"] = w(*shape)
        si = moe_inter * hf["num_shared_experts"]
        for proj, shape in (("gate_proj", (si, d)), ("up_proj", (si, d)), ("down_proj", (d, si))):
            t[p + f"mlp.shared_experts.{proj}.weight"] = w(*shape)
        if i >= hf["num_hidden_layers"]:  # MTP layer extras (Ling: embedding/hidden norms and a projection)
            t[p + "enorm.weight"] = norm(d)
            t[p + "hnorm.weight"] = norm(d)
            t[p + "eh_proj.weight"] = w(d, 2 * d)
    return t


def write_official_folder(folder: Path, hf: dict, tensors: dict[str, torch.Tensor], *, n_shards: int = 3,
                          mask_token: bool = True) -> Path:
    """config.json, n_shards safetensors + index, and a small BPE tokenizer (id 0 `<|endoftext|>`; with
    `mask_token`, `<|mask|>` as a special token, as the official LLaDA2 tokenizer has)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[s::n_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    specials = ["<|endoftext|>"] + (["<|mask|>"] if mask_token else [])
    tok = train_bpe_tokenizer(VOCAB_TEXTS, hf["vocab_size"], specials)
    assert tok.get_vocab_size() <= hf["vocab_size"]
    save_tokenizer(tok, folder, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return folder
