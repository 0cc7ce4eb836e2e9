"""Atomic writes: a file or folder is built under a temporary sibling name and renamed over its target, so a
reader (or a crash) sees the old content or the new, never half of it.

Temporaries live in the target's folder (a rename across file systems is a copy) and end in `.tmp`. They are
created with plain `open`/`mkdir`, so their mode follows the umask like any other file (`tempfile.mkstemp`
and `mkdtemp` would give 0600 / 0700). Nothing is fsynced: the writers this replaced did not either, and the
rename alone already keeps a half-written file from replacing a good one.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


class PendingFile:
    """A file open under a temporary sibling of `path`: `commit()` renames it over `path`, `discard()` removes
    it. For writers whose open and close are separate calls (a trace written step by step)."""

    def __init__(self, path: str | Path, mode: str = "w", *, encoding: str | None = None):
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
        self.path = Path(path)
        self.tmp = _temp_name(self.path)
        enc = (encoding or "utf-8") if mode == "w" else None
        self.file: IO = open(self.tmp, mode.replace("w", "x"), encoding=enc)  # x: never reuse an existing name

    def commit(self) -> Path:
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def open_for_replace(path: str | Path, mode: str = "w", *, encoding: str | None = None) -> Iterator[IO]:
    """`with open_for_replace(p) as f: ...`: `p` is replaced when the block ends cleanly; on an exception the
    temporary is removed and `p` keeps its previous content (or stays absent)."""
    pending = PendingFile(path, mode, encoding=encoding)
    try:
        yield pending.file
    except BaseException:
        pending.discard()
        raise
    try:
        pending.commit()
    except BaseException:
        pending.discard()
        raise


def follow_umask(path: str | Path) -> None:
    """Give a file written by a library that creates it 0600 (safetensors' `save_file`) the mode `open` would:
    0666 minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_bytes(path: str | Path, data: bytes) -> None:
    with open_for_replace(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    """UTF-8 text, written as given (no newline added)."""
    with open_for_replace(path) as f:
        f.write(text)


def write_json(path: str | Path, obj) -> None:
    """`obj` as 2-space indented JSON plus a final newline (the layout of HF config files)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def replace_folder(tmp: str | Path, folder: str | Path) -> None:
    """Put the folder `tmp` in place of `folder` with renames only: the old folder is parked under a hidden name
    until the new one is in place, put back if that rename fails, and removed after."""
    tmp, folder = Path(tmp), Path(folder)
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)  # put the good folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def folder_for_replace(folder: str | Path) -> Iterator[Path]:
    """`with folder_for_replace(f) as tmp: ...` yields an empty temporary sibling folder; when the block ends
    cleanly it replaces `f` (`replace_folder`), on an exception it is removed and `f` is untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(folder)
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
