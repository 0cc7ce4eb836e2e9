"""Attention-mask builders: causal, full, block-causal and the block-diffusion training mask.

Conventions (shared by every builder in this file):

- Masks are boolean, ``True`` = the query may attend the key.
- Packing: ``doc_ids`` ``[b, L]`` (int) gives each token's document; attention never crosses a
  document boundary (LLaDA2.0 document-level mask, docs/design.md 2.3). ``None`` = one document per row.
- Blocks are defined from per-token ``positions`` ``[b, L]`` (position inside the document, restarting
  at 0 at each document start): block(j) = positions[j] // block_size. So the block rule applies inside
  each document. If ``positions`` is ``None`` it is derived from ``doc_ids`` (restart at every change of
  doc id along the row), or is ``arange(L)`` without doc ids.
- Modes (``MASK_MODES``):
  - ``"causal"``: same doc and key index <= query index (the AR parent model).
  - ``"full"``: same doc, bidirectional (MDLM, block_size = L).
  - ``"block_causal"``: same doc and block(key) <= block(query) (inference; block_size 1 == causal).
  - ``"bd_train"``: the vectorised block-diffusion training mask on the doubled input ``[x_t ; x0]``
    of length 2L (LLaDA2.0 eq. 3, docs/design.md 2.2). Both halves reuse the same doc ids and positions.
    With noisy = index < L and blocks taken in each half:
      noisy q, noisy k: same block (block-diagonal);
      noisy q, clean k: key block strictly earlier (offset block-causal);
      clean q, clean k: key block <= query block (block-causal; trains the KV the decoder caches);
      clean q, noisy k: never.
  - ``"bd_train_causal"``: as ``"bd_train"`` but the clean half is token-causal (clean q, clean k: key index <=
    query index), the NBDiff "context-causal" clean stream: the K/V of finished blocks are then exactly what the
    AR parent computes, and every clean logit is a plain next-token prediction (the AR loss term reads them).

Every mode is a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)``. The same function builds the
dense ``[b, 1, Q, K]`` mask for SDPA (evaluated on broadcast index tensors) and the sparse
``BlockMask`` for FlexAttention, so the two cannot drift apart. On CPU, torch 2.13's FlexAttention has
no backward: CPU training uses the dense mask.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MASK_MODES = ("causal", "full", "block_causal", "bd_train", "bd_train_causal")
_BLOCK_MODES = ("block_causal", "bd_train", "bd_train_causal")

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def validate_block_size(seq_len: int, block_size: int) -> None:
    """Raise ValueError unless 1 <= block_size <= seq_len and block_size divides seq_len."""
    divisors = [d for d in range(1, seq_len + 1) if seq_len % d == 0]
    shown = ", ".join(str(d) for d in divisors[:8]) + (", ..." if len(divisors) > 8 else "")
    allowed = f"allowed: divisors of {seq_len} such as {shown}"
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise ValueError(f"block_size must be an int, got {block_size!r}; {allowed}")
    if block_size < 1 or block_size > seq_len:
        raise ValueError(f"block_size {block_size} must lie in [1, seq_len={seq_len}]; {allowed}")
    if seq_len % block_size != 0:
        raise ValueError(f"block_size {block_size} does not divide seq_len {seq_len}; {allowed}")


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """Position inside the document, restarting at 0 wherever the doc id changes along a row. [b, L]"""
    b, L = doc_ids.shape
    idx = torch.arange(L, device=doc_ids.device).expand(b, L)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # index of the most recent document start at or before each token
    last_start = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


def _check_inputs(
    mode: str,
    seq_len: int,
    block_size: int | None,
    doc_ids: Tensor | None,
    positions: Tensor | None,
) -> None:
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if mode in _BLOCK_MODES:
        if block_size is None:
            raise ValueError(f"mask mode {mode!r} needs block_size (got None)")
        validate_block_size(seq_len, block_size)
    for name, t in (("doc_ids", doc_ids), ("positions", positions)):
        if t is None:
            continue
        if t.dim() != 2 or t.shape[1] != seq_len:
            raise ValueError(
                f"{name} must have shape [b, seq_len] = [b, {seq_len}], got {list(t.shape)}"
            )
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if doc_ids is not None and positions is not None and doc_ids.shape != positions.shape:
        raise ValueError(
            f"doc_ids and positions must have the same shape, expected {list(doc_ids.shape)}, "
            f"got {list(positions.shape)}"
        )


def mask_mod(
    mode: str,
    *,
    block_size: int | None = None,
    doc_ids: Tensor | None = None,
    positions: Tensor | None = None,
    seq_len: int,
) -> MaskMod:
    """FlexAttention-style mask_mod(b, h, q_idx, kv_idx) -> bool for one mode.

    seq_len is L, the length of the doc_ids / positions rows; for bd_train the query and key length is
    2L. Works on scalar tensors (create_block_mask) and on broadcast index tensors (dense_mask).
    """
    _check_inputs(mode, seq_len, block_size, doc_ids, positions)
    L = seq_len
    if positions is None and doc_ids is not None:
        positions = positions_from_doc_ids(doc_ids)

    # Index maps into [b, L] tables. Indices are reduced mod L: this is the half-index j for bd_train
    # and keeps padded indices (a kernel may evaluate q, k >= Q_LEN) in bounds for the other modes.
    def same_doc(b: Tensor, q: Tensor, k: Tensor) -> Tensor | None:
        if doc_ids is None:
            return None
        return doc_ids[b, q % L] == doc_ids[b, k % L]

    def block(b: Tensor, i: Tensor) -> Tensor:
        if positions is None:
            return (i % L) // block_size
        return positions[b, i % L] // block_size

    def with_doc(b: Tensor, q: Tensor, k: Tensor, allowed: Tensor) -> Tensor:
        sd = same_doc(b, q, k)
        return allowed if sd is None else allowed & sd

    if mode == "causal":

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return with_doc(b, q_idx, kv_idx, kv_idx <= q_idx)

    elif mode == "full":

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            # q_idx == q_idx gives a bool of the broadcast shape without a doc table
            return with_doc(b, q_idx, kv_idx, (q_idx == q_idx) & (kv_idx == kv_idx))

    elif mode == "block_causal":

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return with_doc(b, q_idx, kv_idx, block(b, kv_idx) <= block(b, q_idx))

    else:  # bd_train (LLaDA2.0 eq. 3) and bd_train_causal (its clean half token-causal)
        causal_clean = mode == "bd_train_causal"

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            q_noisy = q_idx < L
            k_noisy = kv_idx < L
            bq = block(b, q_idx)
            bk = block(b, kv_idx)
            noisy_noisy = q_noisy & k_noisy & (bk == bq)
            noisy_clean = q_noisy & ~k_noisy & (bk < bq)
            clean_ok = (kv_idx <= q_idx) if causal_clean else (bk <= bq)
            clean_clean = ~q_noisy & ~k_noisy & clean_ok
            return with_doc(b, q_idx, kv_idx, noisy_noisy | noisy_clean | clean_clean)

    return mod


def _qk_len(mode: str, seq_len: int) -> int:
    return 2 * seq_len if mode.startswith("bd_train") else seq_len


def _batch_of(batch: int, doc_ids: Tensor | None, positions: Tensor | None) -> int | None:
    """Batch size the mask depends on, or None when every row gets the same mask."""
    table = doc_ids if doc_ids is not None else positions
    if table is None:
        return None
    if batch not in (1, table.shape[0]):
        raise ValueError(
            f"batch={batch} does not match doc_ids/positions batch {table.shape[0]}; "
            f"expected batch in (1, {table.shape[0]}), got {batch}"
        )
    return table.shape[0]


def _default_device(device, doc_ids: Tensor | None, positions: Tensor | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in (doc_ids, positions):
        if t is not None:
            return t.device
    return torch.device("cpu")


def dense_mask(
    mode: str,
    *,
    seq_len: int,
    block_size: int | None = None,
    doc_ids: Tensor | None = None,
    positions: Tensor | None = None,
    batch: int = 1,
    device=None,
) -> Tensor:
    """Dense boolean mask [b, 1, Q, K] (Q = K = L, or 2L for bd_train) for SDPA's attn_mask.

    b is the doc_ids / positions batch when given, else `batch` (an expanded view: rows are shared).
    """
    mod = mask_mod(mode, block_size=block_size, doc_ids=doc_ids, positions=positions, seq_len=seq_len)
    dev = _default_device(device, doc_ids, positions)
    mb = _batch_of(batch, doc_ids, positions)
    n = _qk_len(mode, seq_len)
    b_idx = torch.arange(mb or 1, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    q_idx = torch.arange(n, device=dev).view(1, 1, n, 1)
    kv_idx = torch.arange(n, device=dev).view(1, 1, 1, n)
    if doc_ids is not None or positions is not None:
        # the tables may live elsewhere than `device`; index them where they are
        src = (doc_ids if doc_ids is not None else positions).device
        m = mod(b_idx.to(src), h_idx.to(src), q_idx.to(src), kv_idx.to(src)).to(dev)
    else:
        m = mod(b_idx, h_idx, q_idx, kv_idx)
    return m.expand(mb or batch, 1, n, n)


def flex_block_mask(
    mode: str,
    *,
    seq_len: int,
    block_size: int | None = None,
    doc_ids: Tensor | None = None,
    positions: Tensor | None = None,
    batch: int = 1,
    device=None,
    flex_block: int = 128,
):
    """FlexAttention BlockMask for one mode (B = doc batch or None without per-row tables, H = None).

    flex_block is FlexAttention's tile size (tokens), unrelated to the diffusion block_size.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    mod = mask_mod(mode, block_size=block_size, doc_ids=doc_ids, positions=positions, seq_len=seq_len)
    dev = _default_device(device, doc_ids, positions)
    mb = _batch_of(batch, doc_ids, positions)
    n = _qk_len(mode, seq_len)
    return create_block_mask(mod, mb, None, n, n, device=dev, BLOCK_SIZE=flex_block)
