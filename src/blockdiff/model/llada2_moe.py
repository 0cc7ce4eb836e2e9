"""The LLaDA2-MoE / Ling 2.0 (BailingMoeV2) decoder in plain PyTorch (docs/design.md 5).

Same interface and KV-cache protocol as `transformer.Transformer` (ids or embeddings, positions, mask ->
logits; `cache.update(layer_idx, k, v)` in every attention layer; `logits_slice`), so the decoding engine,
the objectives and the training loop run it unchanged. Parameter names (tok_embeddings, layers.N.attention_norm,
..., norm, output) match the dense model's where the job is the same, so `resize_vocab` and the embedding-noise
code work on both; `moe_adapter.py` maps them to the official HF names.

Differences from the dense decoder, per the official modeling code:
- packed QKV projection `wqkv` -> [q heads | k heads | v heads] per token, each head_dim wide;
- per-head RMSNorm on q and k (use_qk_norm) before RoPE;
- partial RoPE: rotate-half on the first rotary_dim = head_dim * partial_rotary_factor channels of each head;
- the first first_k_dense_replace layers have a dense SwiGLU, the others a MoE (moe.py).
LLaDA2 attends bidirectionally and Ling causally: that is the caller's mask, not the model's business.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import rope_cache_attend
from .config import ModelConfig
from .moe import MoE, SwiGLU
from .transformer import Block, DecoderLM, RMSNorm


class PackedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.wqkv = nn.Linear(d, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask, cache=None, q_slice: slice | None = None) -> Tensor:
        """Self-attention over x [b, T, d]; with `q_slice` only those positions are queries (dense mask or None)."""
        b, T, _ = x.shape
        qkv = self.wqkv(x).view(b, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        if q_slice is not None:
            q = q[:, q_slice]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.wo(rope_cache_attend(q, k, v, cos, sin, mask, cache, self.layer_idx, q_slice))


class MoEBlock(Block):
    """Pre-norm block with packed-QKV attention and a dense SwiGLU (first `first_k_dense_replace` layers) or MoE
    feed-forward; the residual wiring (and `out_slice`) is the dense Block's."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = PackedAttention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        dense = layer_idx < cfg.moe.first_k_dense_replace
        self.feed_forward = SwiGLU(cfg.hidden_size, cfg.intermediate_size) if dense else MoE(cfg.hidden_size, cfg.moe)


class MoETransformer(DecoderLM):
    def __init__(self, cfg: ModelConfig):
        if cfg.moe is None:
            raise ValueError(f"MoETransformer needs a MoE config; family {cfg.family!r} has none")
        super().__init__(cfg, MoEBlock, rotary_dim=cfg.rotary_dim)

