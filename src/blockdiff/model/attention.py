"""Rotary embeddings and the attention kernel dispatch (SDPA with a dense boolean mask, or FlexAttention).

The model never decides which tokens see which: the caller passes the mask (see `masks.py`).
- dense bool tensor [b or 1, 1, Q, K] (True = attend) -> `scaled_dot_product_attention` (CPU training path); the
  model turns it into SDPA's additive float mask once per forward (`additive_mask`), not once per layer;
- a FlexAttention `BlockMask` -> `flex_attention` (CUDA path; on CPU torch 2.13 supports its forward only);
- None -> every query sees every key (used when decoding one block against an exact KV cache).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig

try:  # FlexAttention is optional: present in torch >= 2.5.
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = None  # type: ignore[assignment]
    flex_attention = None  # type: ignore[assignment]

_compiled_flex = None


def rope_inv_freq(cfg: ModelConfig, rotary_dim: int | None = None) -> Tensor:
    """Inverse frequencies [rotary_dim / 2] for the checkpoint's theta and scaling (HF conventions)."""
    dim = rotary_dim or cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = cfg.rope_type
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        # Llama 3.1 frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept,
        # smooth interpolation between (same formula as Meta's reference and HF).
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of shape [b, 1, T, rotary_dim] for integer positions [b, T] (rotate-half layout)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # [b, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, T, dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] channels of x [b, h, T, d]; the rest pass through (partial RoPE)."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def check_mask(mask) -> None:
    """The masks a model accepts: None, a BlockMask, or a bool tensor (True = attend). A 0 / 1 float mask would be
    read by SDPA as an additive bias (attend everywhere): refused."""
    if mask is not None and not (BlockMask is not None and isinstance(mask, BlockMask)) and mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be a bool tensor (True = attend) or a BlockMask, got {mask.dtype}")


def additive_mask(mask, dtype: torch.dtype):
    """A bool mask (True = attend) as SDPA's additive float mask (0 where True, -inf where False); anything else
    unchanged. SDPA makes exactly this tensor from a bool mask itself (same values, so the same outputs, bit for
    bit), but in every layer, and under autograd each layer keeps its own copy for backward: b x T x T x 4 bytes a
    layer, 16 MiB at T = 2048 and 256 MiB at T = 8192, times the layers. Made once per forward, all layers share
    one tensor (tests/test_model.py)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attend(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """q [b, h, Q, d], k/v [b, hkv, K, d] -> [b, h, Q, d]. GQA handled by the kernel. `mask`: None, a BlockMask, a
    bool mask or the additive float mask `additive_mask` made from one."""
    gqa = q.shape[1] != k.shape[1]
    if BlockMask is not None and isinstance(mask, BlockMask):
        return _flex(q, k, v, mask, gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask, gqa: bool) -> Tensor:
    global _compiled_flex
    if q.is_cuda:
        # flex_attention must be compiled to get the fused kernel (eager falls back to a slow dense path).
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def rope_cache_attend(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask, cache, layer_idx: int,
                      q_slice: slice | None = None) -> Tensor:
    """The part of self-attention every decoder family shares, after its own projections and QK norms:
    q [b, Tq, h, d] (already restricted to `q_slice` when given), k / v [b, T, hkv, d] -> RoPE (cos/sin may cover
    only the first rotary dims) -> KV cache (`cache.update(layer_idx, k, v)`) -> SDPA / flex. Returns
    [b, Tq, h * d]."""
    b, Tq = q.shape[:2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, h, T, d]
    if q_slice is not None:
        q, k = apply_rope(q, cos[:, :, q_slice], sin[:, :, q_slice]), apply_rope(k, cos, sin)
        mask = None if mask is None else mask[:, :, q_slice]
    else:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)
    out = attend(q, k, v, mask)  # [b, h, Tq, d]
    return out.transpose(1, 2).reshape(b, Tq, -1)
