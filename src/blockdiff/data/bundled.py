"""The bundled default data: the pretraining corpus (synthetic tasks with exact answers plus Python
standard-library source) and post-training data in chat form (SFT conversations, DPO pairs), written as
ordinary jsonl files so the bundled runs exercise exactly the path users' own data takes.

Everything is generated on the machine, deterministically, with no download.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text
from .chat_template import user_turn
from .corpus import stdlib_documents
from .tasks import SYSTEM_PROMPT, TaskExample, generate_examples


@dataclass
class BundledCorpus:
    train: Path  # jsonl, field "text"
    valid: Path  # jsonl, held-out tasks + held-out stdlib files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


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
    _write_jsonl(paths.train, [{"text": t} for t in train])
    _write_jsonl(paths.valid, [{"text": t} for t in valid])
    return paths


# ---- post-training data (blockdiff make-data --kind chat|pairs) ----

def task_conversation(ex: TaskExample, system: str = SYSTEM_PROMPT) -> dict:
    """Instruction format of a synthetic task: the task prompt as the user turn, the exact answer as the reply."""
    return {"messages": user_turn(ex.prompt, system) + [{"role": "assistant", "content": ex.answer}]}


def wrong_answer(ex: TaskExample, rng: random.Random) -> str:
    """A plausible wrong answer: one digit/letter changed (off by one for numbers) or two elements swapped."""
    a = ex.answer
    for _ in range(20):
        chars = list(a)
        if ex.task in ("add", "lookup") or rng.random() < 0.5:
            i = rng.randrange(len(chars))
            c = chars[i]
            if c.isdigit():
                chars[i] = str((int(c) + rng.choice((1, 9))) % 10)
            elif c.isalpha():
                chars[i] = chr((ord(c) - 97 + rng.randint(1, 25)) % 26 + 97)
        else:  # swap two positions (sort: two numbers; reverse: two letters)
            i, j = rng.sample(range(len(chars)), 2) if len(chars) > 1 else (0, 0)
            chars[i], chars[j] = chars[j], chars[i]
        w = "".join(chars)
        if w != a:
            return w
    return a + "0"


def write_post_data(out_dir: str | Path, kind: str, *, train: int, valid: int, seed: int = 0) -> list[Path]:
    """Write {sft,pairs}_{train,valid}.jsonl from the synthetic tasks (train / held-out splits)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    for split, n, name in (("train", train, "train"), ("heldout", valid, "valid")):
        exs = generate_examples(split, n, seed=seed + (split == "heldout"))
        if kind == "chat":
            rows = [task_conversation(e) for e in exs]
            path = out / f"sft_{name}.jsonl"
        elif kind == "pairs":
            rows = [{"prompt": task_conversation(e)["messages"][:2], "chosen": e.answer,
                     "rejected": wrong_answer(e, rng), "task": e.task} for e in exs]
            path = out / f"pairs_{name}.jsonl"
        else:
            raise ValueError(f"unknown data kind {kind!r}; expected chat or pairs")
        _write_jsonl(path, rows)
        written.append(path)
    return written
