"""Tokenize documents (in memory here; cached on disk, streaming, by data/token_cache.py) and pack them into
fixed-length rows with document ids.

Packing follows LLaDA2 (arXiv:2512.15745, continual pretraining): documents are concatenated
into rows of `seq_len` tokens and the attention mask keeps each document to itself, so every
token has a document id and a position within its document. Departures: a document never
straddles two rows unless it is longer than a row (then each `seq_len` piece is its own
document), and the unused tail of a row is padding that forms its own document.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from blockdiff.data.documents import Document
from blockdiff.data.tokenizer import Tokenizer

_ENCODE_CHUNK = 4096  # documents per encode_batch call: bounds the Encoding objects alive at once


@dataclass
class TokenizedCorpus:
    tokens: np.ndarray  # int32 [n_tokens]: every document followed by one EOS, concatenated
    doc_offsets: np.ndarray  # int64 [n_docs + 1]: document i is tokens[doc_offsets[i]:doc_offsets[i+1]]
    from_cache: bool = False  # True when read from the token cache (data/token_cache.py) instead of tokenized

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def tokenize_documents(docs: Sequence[Document], tok: Tokenizer) -> TokenizedCorpus:
    """Encode every document and append `tok.eos_id`, in memory. Training reads its corpus through the on-disk,
    streaming cache instead (data/token_cache.py corpus_tokens); this is the small in-memory form (benchmarks, and
    the tests' independent reference for that cache)."""
    lengths = np.zeros(len(docs), dtype=np.int64)
    pieces = []
    for start in range(0, len(docs), _ENCODE_CHUNK):
        batch = tok.encode_batch([d.text for d in docs[start : start + _ENCODE_CHUNK]])
        for j, ids in enumerate(batch):
            lengths[start + j] = len(ids) + 1
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(np.array([tok.eos_id], dtype=np.int32))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedCorpus(tokens, offsets)


@dataclass
class PackedDataset:
    input_ids: torch.Tensor  # int64 [N, L]
    doc_ids: torch.Tensor  # int32 [N, L]: 0, 1, 2, ... per document within each row
    positions: torch.Tensor  # int64 [N, L]: position within the token's document, from 0
    loss_mask: torch.Tensor | None = None  # bool [N, L]: tokens that may be noised (SFT: response only)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of rows `idx`: input_ids, doc_ids, positions (and loss_mask when set)."""
        batch = {"input_ids": self.input_ids[idx], "doc_ids": self.doc_ids[idx], "positions": self.positions[idx]}
        if self.loss_mask is not None:
            batch["loss_mask"] = self.loss_mask[idx]
        return batch


def _pad_documents(
    corpus: TokenizedCorpus, pad_id: int, multiple: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad each document with `pad_id` to a multiple of `multiple` tokens; returns (stream, lengths)."""
    lengths = np.diff(corpus.doc_offsets)
    if multiple <= 0:
        return corpus.tokens, lengths
    padded = -(-lengths // multiple) * multiple
    new_offsets = np.concatenate([[0], np.cumsum(padded)])
    stream = np.full(int(new_offsets[-1]), pad_id, dtype=np.int32)
    doc = np.repeat(np.arange(len(lengths)), lengths)  # document of each original token
    dest = new_offsets[doc] + np.arange(corpus.n_tokens) - corpus.doc_offsets[doc]
    stream[dest] = corpus.tokens
    return stream, padded


def _place(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy placement of documents of `lengths` tokens in rows of `seq_len`: (flat start of each piece in the
    [n_rows * seq_len] output, its length, n_rows). Pieces cover the document stream contiguously, in order, and
    every row starts with a piece."""
    # Greedy placement is sequential (each document depends on the row fill before it), so it is
    # a Python loop over documents; all per-token work is vectorised.
    piece_dst: list[int] = []
    piece_len: list[int] = []
    row, fill = 0, 0
    for n in lengths.tolist():
        if n > seq_len - fill:
            if fill > 0:  # the rest of this row becomes a padding document
                row, fill = row + 1, 0
            while n > seq_len:
                piece_dst.append(row * seq_len)
                piece_len.append(seq_len)
                row, n = row + 1, n - seq_len
        piece_dst.append(row * seq_len + fill)
        piece_len.append(n)
        fill += n
        if fill == seq_len:
            row, fill = row + 1, 0
    return np.asarray(piece_dst, dtype=np.int64), np.asarray(piece_len, dtype=np.int64), row + (fill > 0)


def pack(
    corpus: TokenizedCorpus, seq_len: int, pad_id: int, eos_pad_multiple: int = 0
) -> PackedDataset:
    """Pack documents in order into rows of `seq_len` tokens.

    `eos_pad_multiple > 0` pads each document (which already ends in EOS) with `pad_id` to a
    multiple of that many tokens, inside the document, so the model learns EOS EOS ... after an
    answer (LLaDA2 SFT pads answers with EOS to whole blocks). A document that does not fit in
    the rest of a row starts a new row, the gap being padding with its own document id; one longer
    than `seq_len` is cut into `seq_len` pieces, each starting a row and each its own document.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stream, lengths = _pad_documents(corpus, pad_id, eos_pad_multiple)
    piece_dst, piece_len, n_rows = _place(lengths, seq_len)
    size = n_rows * seq_len

    dst, lens = piece_dst, piece_len
    src = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
    input_ids = np.full(size, pad_id, dtype=np.int64)
    input_ids[np.repeat(dst - src, lens) + np.arange(len(stream))] = stream

    # A document starts at every piece start, every row start, and where padding follows a piece.
    starts = np.zeros(size, dtype=bool)
    starts[dst] = True
    starts[::seq_len] = True
    ends = dst + lens
    starts[ends[ends < size]] = True
    doc_ids = np.cumsum(starts).reshape(n_rows, seq_len)
    doc_ids -= doc_ids[:, :1]
    idx = np.arange(size)
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    return PackedDataset(
        input_ids=torch.from_numpy(input_ids).view(n_rows, seq_len),
        doc_ids=torch.from_numpy(doc_ids.astype(np.int32)),
        positions=torch.from_numpy(positions).view(n_rows, seq_len),
    )


class PackedRows:
    """The rows `pack` builds, made on demand from a (memory-mapped) corpus: only the placement (three int64
    numbers per piece) is held, and `rows(idx)` reads the tokens of the rows asked for, so a corpus larger than
    memory trains. Equal to `pack(corpus, ...)` row for row (tests/test_data_sources.py)."""

    loss_mask = None

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, pad_id: int, eos_pad_multiple: int = 0):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.corpus, self.pad_id, self._seq_len = corpus, pad_id, seq_len
        self._lengths = np.diff(corpus.doc_offsets)  # real tokens per document (EOS included)
        padded = self._lengths if eos_pad_multiple <= 0 else -(-self._lengths // eos_pad_multiple) * eos_pad_multiple
        self._padded_offsets = np.concatenate([[0], np.cumsum(padded)])  # document starts in the padded stream
        self._dst, lens, self._n_rows = _place(padded, seq_len)
        self._end = self._dst + lens
        self._src = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens  # piece start in the stream

    def __len__(self) -> int:
        return self._n_rows

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        L = self._seq_len
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        q = (idx[:, None] * L + np.arange(L)).reshape(-1)  # flat output positions [B * L]
        j = np.searchsorted(self._dst, q, side="right") - 1  # the piece at or before each position
        inside = q < self._end[j]  # else: the padding document at a row's end
        first = np.searchsorted(self._dst, q - q % L)  # the row's first piece (every row starts with one)
        doc_ids = j - first + ~inside
        positions = np.where(inside, q - self._dst[j], q - self._end[j])
        s = self._src[j] + q - self._dst[j]  # index in the padded document stream
        k = np.minimum(np.searchsorted(self._padded_offsets, s, side="right") - 1, len(self._lengths) - 1)
        within = s - self._padded_offsets[k]
        real = inside & (within < self._lengths[k])  # a real token, not EOS padding or the row's padding
        ids = np.full(len(q), self.pad_id, dtype=np.int64)
        ids[real] = self.corpus.tokens[self.corpus.doc_offsets[k[real]] + within[real]]
        shape = (len(idx), L)
        return {"input_ids": torch.from_numpy(ids).view(shape),
                "doc_ids": torch.from_numpy(doc_ids.astype(np.int32)).view(shape),
                "positions": torch.from_numpy(positions).view(shape)}


class BatchStream:
    """Deterministic infinite stream of batches: epoch e visits rows in randperm(seed + e) order.

    A batch larger than what is left of an epoch continues into the next one, so any batch size
    works, even one larger than the dataset. `state_dict` / `load_state_dict` resume exactly.
    """

    def __init__(self, data: PackedDataset | PackedRows, batch_size: int, seed: int):
        if len(data) == 0:
            raise ValueError("cannot stream batches from an empty PackedDataset (no rows)")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0  # rows of the current epoch's permutation already served
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(len(self.data), generator=g)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> dict[str, torch.Tensor]:
        """input_ids, doc_ids, positions, each [batch_size, L]."""
        rows = []
        need = self.batch_size
        while need > 0:
            take = min(need, len(self.data) - self.index)
            rows.append(self._permutation()[self.index : self.index + take])
            self.index += take
            need -= take
            if self.index == len(self.data):
                self.epoch, self.index = self.epoch + 1, 0
        return self.data.rows(torch.cat(rows))

    @property
    def sequences_consumed(self) -> int:
        return self.epoch * len(self.data) + self.index

    def state_dict(self) -> dict[str, int]:
        # n_sequences lets load_state_dict refuse to resume on different data.
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_sequences": len(self.data)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        n = state.get("n_sequences", len(self.data))
        if n != len(self.data):
            raise ValueError(
                f"BatchStream state is for {n} sequences but the dataset has {len(self.data)}; "
                "the packed data changed since the checkpoint"
            )
        if not 0 <= state["index"] < len(self.data):
            raise ValueError(f"BatchStream state index {state['index']} out of range [0, {len(self.data)})")
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
