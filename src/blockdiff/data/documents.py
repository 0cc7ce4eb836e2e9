"""Read user data files (.txt and .jsonl) with errors that say where and why: the package's one jsonl
reader (`read_jsonl`, also used by the post-training readers) and the pretraining documents.

A `.txt` file is one document. A `.jsonl` file holds one JSON object per non-blank line, whose
`text_field` is the document. Nothing is skipped silently: every problem raises `DataError` with
a message starting `path:line:` (or `path:` when no line applies) that says what was found and
what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXTENSIONS: tuple[str, ...] = (".txt", ".jsonl")


class DataError(ValueError):
    """User data that cannot be read as documents; the message names the file and line."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the file it came from, as given (directories expanded)
    line: int  # 1-based line in a .jsonl file; 0 for a whole-file .txt document


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start} "
            f"of the file: {e.reason}); expected UTF-8 text, re-encode the file "
            "(e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    # A leading byte-order mark (Windows editors) is not part of the text.
    return text.removeprefix("\ufeff")


def read_jsonl(path: str | Path, fields: tuple[str, ...] = (), *, example: str | None = None,
               missing_hint: str = "") -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line of a jsonl file; every object is a dict
    holding `fields`. Errors name `path:line`; `example` (default: built from `fields`) shows the expected
    line, `missing_hint` is appended to a missing-field error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    example = example or "{" + ", ".join(f'"{f}": ...' for f in fields) + "}"
    content = _decode(path, path.read_bytes())
    n = 0
    for lineno, raw in enumerate(content.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                f"expected one JSON object per line like {example}"
            ) from None
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


def _read_txt(path: Path) -> list[Document]:
    text = _decode(path, path.read_bytes())
    if not text.strip():
        raise DataError(f"{path}: empty file (no text); expected a .txt file holding one document")
    return [Document(text=text, source=str(path), line=0)]


def _jsonl_documents(path: Path, text_field: str) -> list[Document]:
    docs = []
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
        docs.append(Document(text=text, source=str(path), line=lineno))
    return docs


def _expand(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in EXTENSIONS)
        if not files:
            raise DataError(
                f"{path}: directory holds no {' or '.join(EXTENSIONS)} files (searched recursively)"
            )
        return files
    if path.suffix not in EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"expected one of {', '.join(EXTENSIONS)}"
        )
    return [path]


def read_documents(paths: list[str | Path], text_field: str = "text") -> list[Document]:
    """Documents of every file in `paths` (files, or directories searched recursively), in order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]  # a lone path is an easy mistake; treat it as a list of one
    if not paths:
        raise DataError(f"no data paths given; expected files or directories of {', '.join(EXTENSIONS)}")
    docs: list[Document] = []
    for p in paths:
        for f in _expand(Path(p)):
            docs.extend(_read_txt(f) if f.suffix == ".txt" else _jsonl_documents(f, text_field))
    return docs
