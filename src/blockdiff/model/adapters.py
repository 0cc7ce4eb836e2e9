"""State-dict adapters: HF key names <-> ours, and the loading rules that differ by family (docs/design.md, Code
conventions 1). `model/hf_io.py` has one load path and one save path; everything family-specific it needs is
asked of the family's adapter: `DENSE` here, `moe_adapter.MOE` for LLaDA2-MoE / Ling 2.0.

Our names follow the short gpt-fast / torchtitan convention (tok_embeddings, layers.N.attention.wq, ...). A family
differs only by which HF names map to them; the Llama / Qwen2 / Qwen3 dense family shares one table (Qwen2 adds
q/k/v biases, Qwen3 adds q_norm / k_norm), so one adapter serves all three.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

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


class StateDictAdapter(ABC):
    """The interface hf_io asks; the defaults are the dense family's answers (no stacked experts, no extra
    layers, every tensor in the model dtype, every tensor required)."""

    ignored: re.Pattern  # HF keys that are derived buffers, never weights: safe to ignore when loading

    @abstractmethod
    def hf_to_ours(self, key: str) -> tuple[str, int | None] | None:
        """(our name, expert index or None) for an HF key, or None if the key is not a tensor we model."""

    @abstractmethod
    def ours_to_hf(self, name: str, expert: int | None = None) -> str:
        """The HF key of our tensor `name` (of its slice `expert` for a stacked expert tensor)."""

    def is_stacked(self, name: str) -> bool:
        """True if `name` stacks per-expert HF tensors along dim 0 (saved as one HF tensor per expert)."""
        return False

    def is_extra_layer(self, key: str, num_layers: int) -> bool:
        """True for tensors of layers after the decoder's last (Ling's MTP layers): skipped with a note."""
        return False

    def skipped_extra_layers(self, keys: list[str], cfg, folder) -> None:
        """Called once after loading with the keys `is_extra_layer` skipped, when there were any."""

    def fp32_buffer(self, name: str) -> bool:
        """True for a buffer kept in fp32 in memory and on disk whatever the load/save dtype."""
        return False

    def absent_on_load(self, name: str, shape: tuple[int, ...], cfg) -> bool:
        """True if a checkpoint tensor mapped to `name` stands for nothing in our model (skip it silently)."""
        return False

    def may_be_missing(self, key: str, cfg) -> bool:
        """True if a checkpoint may lack HF tensor `key` (the model keeps its initial value)."""
        return False


class DenseAdapter(StateDictAdapter):
    """Llama / Qwen2 / Qwen3."""

    ignored = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")

    def hf_to_ours(self, key: str) -> tuple[str, None] | None:
        tpl, idx = _template(key)
        ours = _HF_TO_OURS.get(tpl)
        if ours is None:
            return None
        return (ours.format(idx) if idx is not None else ours), None

    def ours_to_hf(self, name: str, expert: int | None = None) -> str:
        tpl, idx = _template(name)
        if tpl not in _OURS_TO_HF:
            raise KeyError(f"no HF name for parameter {name!r}")
        hf = _OURS_TO_HF[tpl]
        return hf.format(idx) if idx is not None else hf


DENSE = DenseAdapter()
