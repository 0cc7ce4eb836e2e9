"""Preallocated KV cache for exact block decoding (and AR decoding of the parent model).

Protocol used by the model's attention layers: `update(layer, k, v)` writes this forward's keys/values into the
slots right after the committed prefix and returns the prefix plus them. Nothing is committed until the caller
calls `commit(n)`: while a block is being denoised its slots are simply overwritten by each step, and when the
block is final one more forward writes its clean K/V and the caller commits it. No tensor is reallocated per
step, and the prefix is exact (the block-causal training mask's clean half trained exactly these keys).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, cfg, batch: int, max_len: int, *, device=None, dtype=torch.float32):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0  # committed tokens

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def commit(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ValueError(f"cannot commit {n} tokens: {self.length} + {n} > capacity {self.max_len}")
        self.length += n
