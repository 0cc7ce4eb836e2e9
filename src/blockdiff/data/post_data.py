"""Post-training data: chat conversations (SFT), preference pairs (DPO) and RL prompts, read from jsonl with
errors that name file:line and field, tokenised with the chat template into block-aligned rows.

Formats (one JSON object per line):
    SFT    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    pairs  {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}
    RL     {"prompt": "...", "answer": "..."}

SFT rows (LLaDA2.0 SFT, docs/design.md 4.1): prompt tokens are never masked and never in the loss
(`loss_mask` False); assistant tokens (content + end-of-turn) are; the sequence then gets one EOS and is
padded with EOS up to the next multiple of B (the padding is response: the model learns to end, as in the open
trainer). Over-length examples (more than seq_len tokens before padding) are dropped with a counted warning
(`over_length = "drop"`, default) or rejected (`"error"`); truncation is never done, because a cut response
would teach the model to stop mid-answer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat_template import ChatExample, ChatTemplate, tokenize_conversation, user_turn, validate_messages
from .documents import DataError, read_jsonl
from .packing import PackedDataset
from .sources import iter_field
from .tasks import SYSTEM_PROMPT, TaskExample, generate_examples
from .tokenizer import Tokenizer

OVER_LENGTH = ("drop", "error")


def _filter_length(examples: list, seq_len: int, policy: str, what: str) -> list:
    """`examples`: ChatExample or tuples of them (pairs); an item is over-length if any of its parts is."""
    if policy not in OVER_LENGTH:
        raise ValueError(f"over_length must be one of {OVER_LENGTH}, got {policy!r}")
    kept, dropped = [], []
    for ex in examples:
        longest = max(ex if isinstance(ex, tuple) else (ex,), key=lambda e: len(e.ids))
        (dropped if len(longest.ids) > seq_len else kept).append(ex)
    if dropped:
        first = dropped[0][0] if isinstance(dropped[0], tuple) else dropped[0]
        msg = (f"{len(dropped)} of {len(examples)} {what} exceed seq_len={seq_len} tokens after block alignment "
               f"(first: {first.where}, {len(first.ids)} tokens)")
        if policy == "error":
            raise DataError(f"{msg}; raise seq_len or set over_length = \"drop\"")
        print(f"[blockdiff] warning: dropped {msg}", file=sys.stderr)
    if not kept:
        raise DataError(f"no {what} fit in seq_len={seq_len}")
    return kept


def read_chat(paths: list[str], tok: Tokenizer, *, block_size: int, seq_len: int, over_length: str = "drop",
              field: str = "messages", split: str = "train") -> list[ChatExample]:
    """Conversations in `field` of every row of `paths`: jsonl files, or any source of data/sources.py (parquet,
    arrow, a saved dataset's `split`)."""
    template = ChatTemplate(tok)
    out = []
    for src, row, value in iter_field(paths, field, "messages", split=split, key="messages_field"):
        where = src.at(row)
        msgs = validate_messages(value, where, field=field)
        out.append(tokenize_conversation(msgs, tok, template, block_size, where))
    return _filter_length(out, seq_len, over_length, "conversations")


def chat_rows(examples: list[ChatExample], seq_len: int, pad_id: int, *, pack: bool) -> PackedDataset:
    """Fixed-length rows. Unpacked: one conversation per row, EOS-padded to seq_len (padding in the loss, as the
    block-aligned EOS padding). Packed: whole conversations placed greedily, each its own document (doc_ids,
    positions from 0, so blocks are aligned per conversation); a row's unused tail is a padding document
    outside the loss."""
    rows: list[list[ChatExample]] = []
    fill = seq_len
    for ex in examples:
        if len(ex.ids) > seq_len:
            raise DataError(f"{ex.where}: {len(ex.ids)} tokens exceed seq_len={seq_len} (filter with over_length)")
        if not pack or fill + len(ex.ids) > seq_len:
            rows.append([])
            fill = 0
        rows[-1].append(ex)
        fill += len(ex.ids)
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    doc_ids = torch.zeros((n, seq_len), dtype=torch.int32)
    positions = torch.zeros((n, seq_len), dtype=torch.long)
    loss_mask = torch.zeros((n, seq_len), dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for d, ex in enumerate(row):
            k = len(ex.ids)
            input_ids[r, at:at + k] = torch.tensor(ex.ids)
            loss_mask[r, at:at + k] = torch.tensor(ex.loss_mask)
            doc_ids[r, at:at + k] = d
            positions[r, at:at + k] = torch.arange(k)
            at += k
        if at < seq_len:
            if pack:  # padding document, never attended by real tokens, never in the loss
                doc_ids[r, at:] = len(row)
                positions[r, at:] = torch.arange(seq_len - at)
            else:  # EOS padding of the single conversation, trained like the block-aligned padding
                loss_mask[r, at:] = True
                positions[r, at:] = torch.arange(at, seq_len)
    return PackedDataset(input_ids, doc_ids, positions, loss_mask=loss_mask)


# ---- preference pairs (DPO) ----

def _prompt_messages(prompt, where: str, system: str | None) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return user_turn(prompt, system)
    msgs = validate_messages(prompt, where, need_assistant=False)
    if msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt' must end with a user turn, not an assistant turn")
    return msgs


def read_pairs(paths: list[str], tok: Tokenizer, *, block_size: int, seq_len: int, over_length: str = "drop",
               system: str | None = None) -> PackedDataset:
    """Rows [N, 2, seq_len]: index 0 = prompt + chosen, 1 = prompt + rejected; loss_mask on the response."""
    template = ChatTemplate(tok)
    pairs = []
    for p in paths:
        for lineno, obj in read_jsonl(p, ("prompt", "chosen", "rejected")):
            where = f"{Path(p)}:{lineno}"
            msgs = _prompt_messages(obj["prompt"], where, system)
            exs = []
            for f in ("chosen", "rejected"):
                if not isinstance(obj[f], str) or not obj[f].strip():
                    raise DataError(f"{where}: field {f!r} must be a non-empty string")
                exs.append(tokenize_conversation(msgs + [{"role": "assistant", "content": obj[f]}], tok, template,
                                                 block_size, where))
            pairs.append(tuple(exs))
    pairs = _filter_length(pairs, seq_len, over_length, "preference pairs")
    rows = chat_rows([e for p in pairs for e in p], seq_len, tok.pad_id, pack=False)
    n = len(pairs)
    return PackedDataset(rows.input_ids.view(n, 2, seq_len), rows.doc_ids.view(n, 2, seq_len),
                         rows.positions.view(n, 2, seq_len), loss_mask=rows.loss_mask.view(n, 2, seq_len))


# ---- RL prompts ----

@dataclass(frozen=True)
class RLPrompt:
    messages: tuple  # chat messages ending with the user turn (tuple of dicts)
    answer: str
    where: str


def read_rl_prompts(paths: list[str], *, system: str | None = SYSTEM_PROMPT, n_tasks: int = 2000,
                    seed: int = 0) -> list[RLPrompt]:
    """`paths == ["tasks"]`: the bundled synthetic tasks (train split); else jsonl with prompt and answer."""
    if list(paths) == ["tasks"]:
        return [task_prompt(ex, system) for ex in generate_examples("train", n_tasks, seed=seed)]
    out = []
    for p in paths:
        for lineno, obj in read_jsonl(p, ("prompt", "answer")):
            where = f"{Path(p)}:{lineno}"
            if not isinstance(obj["answer"], str):
                raise DataError(f"{where}: field 'answer' must be a string")
            out.append(RLPrompt(tuple(_prompt_messages(obj["prompt"], where, system)), obj["answer"], where))
    return out


def task_prompt(ex: TaskExample, system: str | None = SYSTEM_PROMPT) -> RLPrompt:
    return RLPrompt(tuple(user_turn(ex.prompt, system)), ex.answer, f"task:{ex.task}")
