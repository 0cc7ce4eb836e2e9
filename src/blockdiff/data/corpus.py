"""Natural text that every machine has: the Python standard library's own source.

Used to train the bundled tokenizer and to mix real text into the tiny model's pretraining
without any download. Files (not documents) are assigned to splits, so held-out text never
shares a file with training text.
"""

from __future__ import annotations

import hashlib
import os
import random
import sysconfig
from pathlib import Path

SPLITS: tuple[str, ...] = ("train", "heldout")

# Third-party code, the huge test suites and the old tools are not "the stdlib" we want:
# tests are repetitive and would dominate the sample.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
MAX_DOC_CHARS = 2000  # documents are at most this many characters
HELDOUT_MODULUS = 20  # one file in 20 is held out (5%)


def _split_of(rel_path: str) -> str:
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % HELDOUT_MODULUS == 0 else "train"


def _stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the stdlib's .py files, sorted so the order never depends on the filesystem."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                rels.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(rels)


def split_lines_into_documents(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut `text` at line boundaries into pieces of at most `max_chars` characters.

    A single line longer than `max_chars` is cut mid-line (rare in source code).
    """
    docs: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                docs.append(current)
                current = ""
            docs.append(line[:max_chars])
            line = line[max_chars:]
        if len(current) + len(line) > max_chars:
            docs.append(current)
            current = ""
        current += line
    if current:
        docs.append(current)
    return [d for d in docs if d.strip()]


def stdlib_documents(split: str, max_chars: int, seed: int = 0) -> list[str]:
    """Documents (<= 2000 chars each, whole lines) from stdlib .py files of `split`, `max_chars` in total.

    Files are shuffled with `seed` and read lazily, so asking for a little text reads few files.
    The last document is cut (at a line boundary where possible) so the total is at most `max_chars`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if max_chars <= 0:
        return []
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [rel for rel in _stdlib_files(root) if _split_of(rel) == split]
    random.Random(seed).shuffle(files)
    docs: list[str] = []
    total = 0
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are latin-1 test data or unreadable links
        for doc in split_lines_into_documents(text):
            room = max_chars - total
            if len(doc) > room:
                cut = doc.rfind("\n", 0, room) + 1  # keep whole lines if any fit
                doc = doc[: cut or room]
            docs.append(doc)
            total += len(doc)
            if total >= max_chars:
                return docs
    return docs
