"""State-dict adapter for the LLaDA2-MoE / Ling 2.0 (BailingMoeV2) family: official HF key names <-> ours.

Official names (docs/design.md 5): `model.word_embeddings`, per layer `input_layernorm`,
`post_attention_layernorm`, `attention.query_key_value`, `attention.query_layernorm`, `attention.key_layernorm`,
`attention.dense`, dense layers `mlp.{gate,up,down}_proj`, MoE layers `mlp.gate.weight`, buffer
`mlp.gate.expert_bias`, `mlp.experts.E.{gate,up,down}_proj`, `mlp.shared_experts.{gate,up,down}_proj`;
`model.norm`, `lm_head`. HF stores one tensor per expert; we stack them, so an expert key maps to
(our stacked name, expert index) and loading writes straight into that slice.

Ling 2.0 checkpoints may append multi-token-prediction (MTP) layers after the last decoder layer
(`model.layers.{num_hidden_layers + i}.*`, `num_nextn_predict_layers` of them). They only serve MTP training
and speculative decoding; the loader skips them (`is_extra_layer`).

Loading rules of the family (`MoEAdapter`, asked by `hf_io`): `expert_bias` stays fp32 in memory and on disk
whatever the dtype (selection compares biased scores that differ by ~1e-3, which bf16 would blur) and may be
absent when `moe_router_enable_expert_bias` is false (an absent bias is zero, the official buffer's init); with
`num_shared_experts = 0` Ling's code still saves a zero-width shared expert, which stands for nothing.
"""

from __future__ import annotations

import re
import sys

from .adapters import StateDictAdapter

_LAYER_MAP = [
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attention.wqkv.weight", "attention.query_key_value.weight"),
    ("attention.wqkv.bias", "attention.query_key_value.bias"),
    ("attention.wo.weight", "attention.dense.weight"),
    ("attention.wo.bias", "attention.dense.bias"),
    ("attention.q_norm.weight", "attention.query_layernorm.weight"),
    ("attention.k_norm.weight", "attention.key_layernorm.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("feed_forward.router.weight", "mlp.gate.weight"),
    ("feed_forward.router.expert_bias", "mlp.gate.expert_bias"),
    ("feed_forward.shared.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("feed_forward.shared.w3.weight", "mlp.shared_experts.up_proj.weight"),
    ("feed_forward.shared.w2.weight", "mlp.shared_experts.down_proj.weight"),
]
_GLOBAL_MAP = [
    ("tok_embeddings.weight", "model.word_embeddings.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]
_EXPERT_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_EXPERT_OURS = {v: k for k, v in _EXPERT_PROJ.items()}

_HF_LAYER = {hf: ours for ours, hf in _LAYER_MAP}
_OURS_LAYER = dict(_LAYER_MAP)
_HF_GLOBAL = {hf: ours for ours, hf in _GLOBAL_MAP}
_OURS_GLOBAL = dict(_GLOBAL_MAP)

_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_OURS_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_OURS_EXPERT_RE = re.compile(r"^feed_forward\.experts\.(w1|w2|w3)$")


def _layer_of(hf_key: str) -> int | None:
    m = _HF_LAYER_RE.match(hf_key)
    return int(m.group(1)) if m else None


class MoEAdapter(StateDictAdapter):
    """LLaDA2-MoE / Ling 2.0 (BailingMoeV2)."""

    ignored = re.compile(r"rotary_emb\.inv_freq$")  # derived buffers that some exports carry

    def hf_to_ours(self, hf_key: str) -> tuple[str, int | None] | None:
        return _hf_to_ours(hf_key)

    def ours_to_hf(self, name: str, expert: int | None = None) -> str:
        return _ours_to_hf(name, expert)

    def is_stacked(self, name: str) -> bool:
        m = _OURS_LAYER_RE.match(name)
        return bool(m and _OURS_EXPERT_RE.match(m.group(2)))

    def is_extra_layer(self, key: str, num_layers: int) -> bool:
        """Ling's MTP layers: indices >= num_hidden_layers."""
        layer = _layer_of(key)
        return layer is not None and layer >= num_layers

    def skipped_extra_layers(self, keys: list[str], cfg, folder) -> None:
        n = len({_layer_of(k) for k in keys})
        print(f"[blockdiff] {folder}: skipped {n} multi-token-prediction layer(s) ({len(keys)} tensors) after layer "
              f"{cfg.num_layers - 1}: they are not part of the decoder", file=sys.stderr)
        cfg.hf_extra["num_nextn_predict_layers"] = 0  # a folder we save holds no MTP layers

    def fp32_buffer(self, name: str) -> bool:
        return name.endswith("expert_bias")

    def absent_on_load(self, name: str, shape: tuple[int, ...], cfg) -> bool:
        return ".shared." in name and not cfg.moe.num_shared_experts and 0 in shape

    def may_be_missing(self, key: str, cfg) -> bool:
        return key.endswith("mlp.gate.expert_bias") and not cfg.moe.expert_bias


def _hf_to_ours(hf_key: str) -> tuple[str, int | None] | None:
    """(our name, expert index or None) for an official key, or None if we do not model it."""
    if hf_key in _HF_GLOBAL:
        return _HF_GLOBAL[hf_key], None
    m = _HF_LAYER_RE.match(hf_key)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    e = _HF_EXPERT_RE.match(rest)
    if e:
        return f"layers.{layer}.feed_forward.experts.{_EXPERT_PROJ[e.group(2)]}", int(e.group(1))
    ours = _HF_LAYER.get(rest)
    return (f"layers.{layer}.{ours}", None) if ours is not None else None


def _ours_to_hf(name: str, expert: int | None = None) -> str:
    """Official key for our tensor `name` (for stacked experts: for its slice `expert`)."""
    if name in _OURS_GLOBAL:
        return _OURS_GLOBAL[name]
    m = _OURS_LAYER_RE.match(name)
    if m:
        layer, rest = m.group(1), m.group(2)
        e = _OURS_EXPERT_RE.match(rest)
        if e:
            if expert is None:
                raise KeyError(f"{name} is a stacked expert tensor: pass the expert index")
            return f"model.layers.{layer}.mlp.experts.{expert}.{_EXPERT_OURS[e.group(1)]}.weight"
        if rest in _OURS_LAYER:
            return f"model.layers.{layer}.{_OURS_LAYER[rest]}"
    raise KeyError(f"no HF name for parameter {name!r}")


MOE = MoEAdapter()
