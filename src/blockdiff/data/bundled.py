"""The bundled default corpus: synthetic tasks with exact answers plus Python standard-library source, written
as ordinary jsonl files so the bundled runs exercise exactly the path users' own data takes.

Everything is generated on the machine, deterministically, with no download.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .corpus import stdlib_documents
from .tasks import generate_examples


@dataclass
class BundledCorpus:
    train: Path  # jsonl, field "text"
    valid: Path  # jsonl, held-out tasks + held-out stdlib files


def _write_jsonl(path: Path, texts: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    os.replace(tmp, path)


def write_bundled_corpus(
    out_dir: str | Path,
    *,
    train_examples: int,
    train_code_chars: int,
    valid_examples: int = 400,
    valid_code_chars: int = 40_000,
    seed: int = 0,
) -> BundledCorpus:
    """Write train.jsonl / valid.jsonl: each task example is one document ("prompt answer"), each stdlib chunk
    (<= 2000 chars) one document; documents are shuffled together deterministically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = [e.text for e in generate_examples("train", train_examples, seed=seed)]
    train += stdlib_documents("train", train_code_chars, seed=seed)
    rng.shuffle(train)
    valid = [e.text for e in generate_examples("heldout", valid_examples, seed=seed + 1)]
    valid += stdlib_documents("heldout", valid_code_chars, seed=seed)
    rng.shuffle(valid)
    # Drop chunks that are only whitespace (e.g. a file of blank lines): read_documents rejects empty text.
    train = [t for t in train if t.strip()]
    valid = [t for t in valid if t.strip()]
    paths = BundledCorpus(out / "train.jsonl", out / "valid.jsonl")
    _write_jsonl(paths.train, train)
    _write_jsonl(paths.valid, valid)
    return paths
