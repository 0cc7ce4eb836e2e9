"""Tokenise a corpus once, streaming, into a memory-mapped token cache.

A cache entry is a folder `tokens-<key>/` holding `tokens.i32` (every document's ids followed by one EOS,
concatenated, int32), `offsets.i64` (document i is tokens[offsets[i]:offsets[i+1]], int64) and `meta.json`
(counts, written last). Documents are encoded a chunk at a time (ENCODE_CHUNK documents or ENCODE_CHARS characters) and appended to the files, so memory is
bounded by a chunk whatever the corpus size; the finished folder is renamed into place, so a killed run
leaves no half entry. A later run memory-maps the two arrays (`TokenizedCorpus` over np.memmap): packing and
batches read only the rows they touch (data/packing.py PackedRows).

The key covers the sources (paths, split and file contents: data/sources.py fingerprint), how a row becomes a
document (the text field, or the messages field and the chat template's source) and the tokenizer, so a
change to any of them tokenises again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .documents import DataError
from .packing import TokenizedCorpus
from .sources import Source, fingerprint, iter_documents, resolve
from .tokenizer import Tokenizer

# One encode_batch call takes documents until either bound: its Encoding objects (ids, offsets, token strings) weigh
# ~50x the text, so the character bound is what keeps memory flat (measured in dev/LOG.md 2026-12-07).
ENCODE_CHUNK = 4096  # documents
ENCODE_CHARS = 1 << 20  # characters
FORMAT = "blockdiff-tokens-v2"


def cache_key(sources: list[Source], tok: Tokenizer, *, text_field: str, messages_field: str = "",
              template: str = "") -> str:
    h = hashlib.sha256(FORMAT.encode())
    how = {"text_field": text_field} if not messages_field else {"messages_field": messages_field,
                                                                  "template": template}
    for part in (tok.fingerprint(), fingerprint(sources), json.dumps(how, sort_keys=True)):
        h.update(part.encode())
    return h.hexdigest()


def _load(folder: Path) -> TokenizedCorpus | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        tokens = np.memmap(folder / "tokens.i32", dtype=np.int32, mode="r", shape=(meta["n_tokens"],))
        offsets = np.memmap(folder / "offsets.i64", dtype=np.int64, mode="r", shape=(meta["n_docs"] + 1,))
    except (OSError, KeyError, ValueError):  # missing or unreadable: tokenise again
        return None
    return TokenizedCorpus(tokens, offsets, from_cache=True)


def _write(folder: Path, docs, tok: Tokenizer) -> dict:
    """Encode `docs` (an iterator) into folder's two arrays; returns the counts."""
    n_tokens, n_docs, docs = 0, 0, iter(docs)
    eos = np.array([tok.eos_id], dtype=np.int32)
    with open(folder / "tokens.i32", "wb") as ft, open(folder / "offsets.i64", "wb") as fo:
        fo.write(np.zeros(1, dtype=np.int64).tobytes())
        while True:
            texts, chars = [], 0
            for d in docs:
                texts.append(d.text)
                chars += len(d.text)
                if len(texts) == ENCODE_CHUNK or chars >= ENCODE_CHARS:
                    break
            if not texts:
                break
            lengths = np.empty(len(texts), dtype=np.int64)
            for j, ids in enumerate(tok.encode_batch(texts)):
                ft.write(np.asarray(ids, dtype=np.int32).tobytes())
                ft.write(eos.tobytes())
                lengths[j] = len(ids) + 1
            fo.write((n_tokens + np.cumsum(lengths)).tobytes())
            n_tokens += int(lengths.sum())
            n_docs += len(texts)
    return {"format": FORMAT, "n_tokens": n_tokens, "n_docs": n_docs}


def corpus_tokens(entries, tok: Tokenizer, cache_dir: str | Path, *, split: str = "train", text_field: str = "text",
                  messages_field: str = "", render: Callable[[list[dict]], str] | None = None,
                  template: str = "") -> TokenizedCorpus:
    """The tokens of every document of `entries` (data/sources.py), from the cache under `cache_dir` when there,
    else tokenised once (streaming) into it. `render` / `template`: the chat template (callable and source)
    that turns `messages_field` rows into documents."""
    sources = resolve(entries, split)
    key = cache_key(sources, tok, text_field=text_field, messages_field=messages_field, template=template)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"tokens-{key}"
    cached = _load(final)
    if cached is not None:
        return cached
    if final.exists():  # an unreadable entry (a disk filled up, a file removed): replaced below
        shutil.rmtree(final, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tokens-{key[:16]}-", dir=cache_dir))
    try:
        docs = iter_documents(sources, text_field, split=split, messages_field=messages_field, render=render)
        meta = _write(tmp, docs, tok)
        if meta["n_docs"] == 0:
            raise DataError(f"{', '.join(map(str, sources))}: no documents")
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, final)
        except OSError:  # another run finished the same entry first: keep theirs
            if _load(final) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    corpus = _load(final)
    return TokenizedCorpus(corpus.tokens, corpus.doc_offsets, from_cache=False)
