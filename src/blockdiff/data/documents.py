"""Read user text files (.txt, .jsonl, .json) with errors that say where and why: the package's one jsonl
reader (`read_jsonl`, also used by the post-training readers and data/sources.py) and the pretraining documents.

A `.txt` file is one document. A `.jsonl` file holds one JSON object per non-blank line, whose
`text_field` is the document; it is read line by line (never whole), so a large file streams. A `.json`
file is either JSON lines too or one JSON array of objects (read whole). Nothing is skipped silently: every
problem raises `DataError` with a message starting `path:line:` (or `path:` when no line applies) that says
what was found and what was expected. Folders, globs, parquet / arrow files and saved Hugging Face datasets
are data/sources.py's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """User data that cannot be read as documents; the message names the file and line."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the file it came from, as given (directories expanded)
    line: int  # 1-based line of a .jsonl file or row of a table / dataset; 0 for a whole-file .txt document


def _decode(path: Path, data: bytes, line: int = 1, offset: int = 0) -> str:
    """`data` is the file's bytes from byte `offset` (on line `line`) onwards."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line += data.count(b"\n", 0, e.start)
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {offset + e.start} "
            f"of the file: {e.reason}); expected UTF-8 text, re-encode the file "
            "(e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    # A leading byte-order mark (Windows editors) is not part of the text.
    return text.removeprefix("\ufeff") if offset == 0 else text


def _json_objects(path: Path, example: str) -> Iterator[tuple[int, object]]:
    """(1-based line, parsed value) of each non-blank line, read one line at a time; a `.json` file that holds
    one array instead yields its items (numbered from 1)."""
    with open(path, "rb") as f:
        first = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
        f.seek(0)
        if path.suffix == ".json" and first == b"[":
            try:
                items = json.loads(_decode(path, f.read()))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); expected an "
                                f"array of objects like [{example}] or one object per line") from None
            if not isinstance(items, list):
                raise DataError(f"{path}: a JSON {type(items).__name__}; expected an array of objects or JSON lines")
            yield from enumerate(items, start=1)
            return
        offset = 0
        for lineno, raw in enumerate(f, start=1):
            text = _decode(path, raw, lineno, offset)
            offset += len(raw)
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                    f"expected one JSON object per line like {example}"
                ) from None


def read_jsonl(path: str | Path, fields: tuple[str, ...] = (), *, example: str | None = None,
               missing_hint: str = "") -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line of a jsonl file; every object is a dict
    holding `fields`. Errors name `path:line`; `example` (default: built from `fields`) shows the expected
    line, `missing_hint` is appended to a missing-field error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    example = example or "{" + ", ".join(f'"{f}": ...' for f in fields) + "}"
    n = 0
    for lineno, obj in _json_objects(path, example):
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}:{lineno}: line is a JSON {type(obj).__name__}, not an object; "
                f"expected an object like {example}"
            )
        for f in fields:
            if f not in obj:
                keys = ", ".join(repr(k) for k in list(obj)[:20]) or "none"
                raise DataError(f"{path}:{lineno}: missing field {f!r} (keys present: {keys}){missing_hint}")
        n += 1
        yield lineno, obj
    if n == 0:
        raise DataError(f"{path}: empty file (no lines); expected one JSON object per line like {example}")


def read_txt(path: Path) -> Iterator[Document]:
    text = _decode(path, path.read_bytes())
    if not text.strip():
        raise DataError(f"{path}: empty file (no text); expected a .txt file holding one document")
    yield Document(text=text, source=str(path), line=0)


def jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    lines = read_jsonl(path, (text_field,), example=f'{{"{text_field}": "..."}}',
                       missing_hint="; pass text_field= to read another field")
    for lineno, obj in lines:
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{lineno}: field {text_field!r} is a JSON {type(text).__name__}, expected a string"
            )
        if not text.strip():
            raise DataError(f"{path}:{lineno}: field {text_field!r} is empty; expected non-empty text")
        yield Document(text=text, source=str(path), line=lineno)


def read_documents(paths: list[str | Path], text_field: str = "text") -> list[Document]:
    """Documents of every source in `paths` (files, folders searched recursively, globs, saved datasets; see
    data/sources.py), in order, in memory. Large corpora: `sources.iter_documents` streams them."""
    from .sources import iter_documents  # sources imports this module

    return list(iter_documents(paths, text_field))
