"""State-dict adapters: HF key names <-> ours, per model family (docs/design.md, Code conventions 1).

Our names follow the short gpt-fast / torchtitan convention (tok_embeddings, layers.N.attention.wq, ...). A family
differs only by which HF names map to them; the Llama / Qwen2 / Qwen3 dense family shares one table (Qwen2 adds
q/k/v biases, Qwen3 adds q_norm / k_norm), so one adapter serves all three.
"""

from __future__ import annotations

import re

# (our regex, HF template) pairs; {0} is the layer index.
_LAYER_MAP = [
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("attention.wq.bias", "self_attn.q_proj.bias"),
    ("attention.wk.bias", "self_attn.k_proj.bias"),
    ("attention.wv.bias", "self_attn.v_proj.bias"),
    ("attention.wo.bias", "self_attn.o_proj.bias"),
    ("attention.q_norm.weight", "self_attn.q_norm.weight"),
    ("attention.k_norm.weight", "self_attn.k_norm.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("feed_forward.w1.bias", "mlp.gate_proj.bias"),
    ("feed_forward.w3.bias", "mlp.up_proj.bias"),
    ("feed_forward.w2.bias", "mlp.down_proj.bias"),
]
_GLOBAL_MAP = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]
_OURS_TO_HF = dict(_GLOBAL_MAP)
_HF_TO_OURS = {hf: ours for ours, hf in _GLOBAL_MAP}
for _ours, _hf in _LAYER_MAP:
    _OURS_TO_HF["layers.{}." + _ours] = "model.layers.{}." + _hf
    _HF_TO_OURS["model.layers.{}." + _hf] = "layers.{}." + _ours

_LAYER_RE = re.compile(r"^(model\.)?layers\.(\d+)\.(.+)$")


def _template(key: str) -> tuple[str, str | None]:
    m = _LAYER_RE.match(key)
    if not m:
        return key, None
    prefix = "model.layers.{}." if m.group(1) else "layers.{}."
    return prefix + m.group(3), m.group(2)


def hf_to_ours(key: str) -> str | None:
    """Our name for an HF key, or None if the key is not a parameter we model (e.g. rotary inv_freq)."""
    tpl, idx = _template(key)
    ours = _HF_TO_OURS.get(tpl)
    if ours is None:
        return None
    return ours.format(idx) if idx is not None else ours


def ours_to_hf(key: str) -> str:
    tpl, idx = _template(key)
    if tpl not in _OURS_TO_HF:
        raise KeyError(f"no HF name for parameter {key!r}")
    hf = _OURS_TO_HF[tpl]
    return hf.format(idx) if idx is not None else hf


# HF keys that are derived buffers, never weights: safe to ignore when loading.
IGNORED_HF_KEYS = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")
