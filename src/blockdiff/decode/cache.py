"""Preallocated KV cache for exact block decoding (and AR decoding of the parent model), one committed length
per batch row.

Protocol used by the model's attention layers: `update(layer, k, v)` writes this forward's keys/values [b, h, T, d]
into each row's slots right after its committed prefix and returns the keys/values the queries attend to.
Nothing is committed until the caller calls `commit(n)`: while a block is being denoised its slots are simply
overwritten by each step; when the block is final its clean K/V are in the slots (written by the last forward)
and the caller commits them. No tensor is reallocated per step, and the prefix is exact (the block-causal
training mask's clean half trained exactly these keys).

Rows of different lengths: row r's new keys go to slots [len_r, len_r + T). `update` then returns slots
[0, max_r len_r + T) for every row; `attn_mask(T)` gives the boolean mask that hides, for each row, the slots
past its own len_r + T (stale values from earlier steps, always finite). When all rows have the same length the
mask is None and the update is a plain slice.

Rows that finish leave the batch with `keep(rows)`: their slots are compacted away in place (a copy when a row
finishes, never per step), so a finished row stops costing compute. Rows join a running batch with
`append(other)`: the prefilled rows of a second cache are copied in after the current rows (a copy when a row
joins), up to the row capacity the cache was built with.
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
        self.batch = batch  # rows in use (a prefix of the allocated rows)
        self.lengths = [0] * batch  # committed tokens per row
        self._len_t = torch.zeros(batch, dtype=torch.long, device=device)

    @staticmethod
    def bytes_per_position(cfg, dtype=torch.float32) -> int:
        """Bytes one position of one row takes: K and V of every layer ([kv_heads, head_dim] each)."""
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes allocated for K and V (every row and slot, used or not)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def capacity(self) -> int:
        """Rows this cache can hold."""
        return self.k[0].shape[0]

    @property
    def length(self) -> int:
        """Committed length when every row has the same one (the batch-1 case)."""
        if len(set(self.lengths)) > 1:
            raise ValueError("rows have different committed lengths; use .lengths")
        return self.lengths[0] if self.lengths else 0

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    def _check(self, T: int) -> None:
        end = max(self.lengths) + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b, T = k.shape[0], k.shape[2]
        if b != self.batch:
            raise ValueError(f"KV cache holds {self.batch} rows, forward has {b}")
        self._check(T)
        kc, vc = self.k[layer][:b], self.v[layer][:b]
        if self.uniform:
            n = self.lengths[0] if b else 0
            kc[:, :, n:n + T] = k
            vc[:, :, n:n + T] = v
            return kc[:, :, :n + T], vc[:, :, :n + T]
        rows = torch.arange(b, device=k.device)[:, None]  # [b, 1]
        slots = self._len_t[:b, None] + torch.arange(T, device=k.device)  # [b, T]
        kc[rows, :, slots] = k.permute(0, 2, 1, 3)  # advanced indices first: [b, T, h, d]
        vc[rows, :, slots] = v.permute(0, 2, 1, 3)
        end = max(self.lengths) + T
        return kc[:, :, :end], vc[:, :, :end]

    def attn_mask(self, T: int, *, causal: bool = False, causal_rows: Tensor | None = None) -> Tensor | None:
        """Bool mask [b, 1, T, K] for a forward of T new tokens per row: each row sees its own committed prefix and
        its T new tokens (all of them, or causally with `causal`, or causally in the rows where the bool [b]
        `causal_rows` is True). None when every row has the same length and nothing is causal."""
        any_causal = causal or (causal_rows is not None and bool(causal_rows.any()))
        if self.uniform and not any_causal:
            return None
        end = max(self.lengths) + T
        key = torch.arange(end, device=self._len_t.device)
        lens = self._len_t[:self.batch, None, None]  # [b, 1, 1]
        q = torch.arange(T, device=key.device)[None, :, None]  # [1, T, 1]
        if causal_rows is not None and not causal:
            span = torch.where(causal_rows.to(key.device)[:, None, None], q + 1, T)  # [b, T, 1]
        else:
            span = q + 1 if causal else T
        visible = key[None, None, :] < lens + span
        return visible[:, None]  # [b, 1, T, K]

    def segment_mask(self, T: int, n_causal: Tensor, n_block: Tensor) -> Tensor:
        """Bool mask [b, 1, T, K] for a forward whose rows mix layouts (self-speculation beside block rows): row r's
        first n_causal[r] new tokens are causal (each sees the committed prefix and the new tokens up to itself), the
        next n_block[r] form one bidirectional block after them (they see the prefix and all causal and block
        tokens), and the rest is padding (sees only itself; nothing sees it)."""
        end = max(self.lengths) + T
        dev = self._len_t.device
        j = torch.arange(end, device=dev)[None, None, :] - self._len_t[:self.batch, None, None]  # [b, 1, K]
        q = torch.arange(T, device=dev)[None, :, None]  # [1, T, 1]
        nc, nb = n_causal.to(dev)[:, None, None], n_block.to(dev)[:, None, None]  # [b, 1, 1]
        new = torch.where(q < nc, j <= q, torch.where(q < nc + nb, j < nc + nb, j == q))
        return ((j < 0) | (new & (j >= 0)))[:, None]

    def commit(self, n: int | list[int]) -> None:
        """Commit n tokens for every row, or n[r] for row r."""
        ns = [n] * self.batch if isinstance(n, int) else list(n)
        if len(ns) != self.batch:
            raise ValueError(f"commit got {len(ns)} counts for {self.batch} rows")
        for r, m in enumerate(ns):
            if self.lengths[r] + m > self.max_len:
                raise ValueError(f"cannot commit {m} tokens: {self.lengths[r]} + {m} > capacity {self.max_len}")
        self.lengths = [a + m for a, m in zip(self.lengths, ns)]
        self._len_t[:self.batch] = torch.tensor(self.lengths, dtype=torch.long, device=self._len_t.device)

    def append(self, other: "KVCache") -> None:
        """Add the rows of `other` (their committed K/V and lengths) after this cache's rows."""
        b0, n = self.batch, other.batch
        if b0 + n > self.capacity:
            raise ValueError(f"KV cache holds at most {self.capacity} rows: cannot add {n} to {b0}")
        T = max(other.lengths, default=0)
        if T > self.max_len:
            raise ValueError(f"KV cache overflow: {T} tokens > capacity {self.max_len}")
        for dst, src in zip((*self.k, *self.v), (*other.k, *other.v)):
            dst[b0:b0 + n, :, :T] = src[:n, :, :T]
        self.lengths = self.lengths + list(other.lengths)
        self.batch = b0 + n
        self._len_t[:self.batch] = torch.tensor(self.lengths, dtype=torch.long, device=self._len_t.device)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order) as the new rows 0..len(rows)-1; their slots move in place."""
        if rows == list(range(self.batch)):
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self._len_t.device)
        for buf in (*self.k, *self.v):
            buf[:len(rows)] = buf[idx]
        self.lengths = [self.lengths[r] for r in rows]
        self.batch = len(rows)
        self._len_t[:self.batch] = torch.tensor(self.lengths, dtype=torch.long, device=self._len_t.device)
