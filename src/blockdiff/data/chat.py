"""Post-training data: chat conversations (SFT), preference pairs (DPO) and RL prompts, read from jsonl with
errors that name file:line and field, tokenised into block-aligned rows.

Formats (one JSON object per line):
    SFT    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    pairs  {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}
    RL     {"prompt": "...", "answer": "..."}

Chat template: the tokenizer's own (a Jinja template in tokenizer_config.json, rendered with jinja2 the way
transformers' `apply_chat_template` does) when it has one, else DEFAULT_TEMPLATE below. Assistant turns are
found by rendering prefixes: the text of turn k is render(messages[:k+1]) minus render(messages[:k],
add_generation_prompt=True), so any prefix-stable template works.

SFT rows (LLaDA2.0 SFT, SYSTEM.md section 4): prompt tokens are never masked and never in the loss
(`loss_mask` False); assistant tokens (content + end-of-turn) are; the sequence then gets one EOS and is
padded with EOS up to the next multiple of B (the padding is response: the model learns to end, as in the open
trainer). Over-length examples (more than seq_len tokens before padding) are dropped with a counted warning
(`over_length = "drop"`, default) or rejected (`"error"`); truncation is never done, because a cut response
would teach the model to stop mid-answer.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .documents import DataError, _decode
from .packing import PackedDataset
from .tasks import TaskExample, generate_examples
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
OVER_LENGTH = ("drop", "error")
# Used when the tokenizer has no chat template: plain-text markers, so any tokenizer can encode it.
DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Tokens that end an assistant turn in common templates; an answer is cut at the first of them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
SYSTEM_PROMPT = "Answer with the result only."


def answer_text(tok: Tokenizer, ids: list[int]) -> str:
    """The assistant's answer in a generation (already cut at EOS): text before the first end-of-turn marker
    (the SFT rows teach `answer<end-of-turn>\n<eos>...`, so decoding stops at EOS and the marker is cut here)."""
    text = tok.decode(ids)
    for marker in (*END_OF_TURN, "<|user|>", "<|assistant|>"):
        text = text.split(marker)[0]
    return text.strip()


class ChatTemplate:
    def __init__(self, tok: Tokenizer):
        import jinja2  # a transformers dependency; imported here so `import blockdiff` stays light

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        self.source = tok.chat_template or DEFAULT_TEMPLATE
        self.template = env.from_string(self.source)
        self.specials = {"eos_token": tok.eos_token, "bos_token": tok.bos_token or ""}

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.specials)


def validate_messages(messages, where: str, *, need_assistant: bool = True) -> list[dict]:
    """Check an OpenAI-style message list; raise DataError naming `where` (file:line) and the field."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] is a JSON {type(m).__name__}, expected an object")
        if "role" not in m:
            raise DataError(f"{where}: messages[{i}] has no 'role' (expected one of {', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {type(m.get('content')).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant turn")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to train on)")
    return messages


def _read_jsonl(path: str | Path, fields: tuple[str, ...]):
    """Yield (where, obj) for each non-blank line; obj is a dict holding `fields`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    content = _decode(path, path.read_bytes())
    n = 0
    for lineno, raw in enumerate(content.split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: line is a JSON {type(obj).__name__}, expected an object")
        for f in fields:
            if f not in obj:
                raise DataError(f"{where}: missing field {f!r} (keys present: {', '.join(map(repr, obj)) or 'none'})")
        n += 1
        yield where, obj
    if n == 0:
        raise DataError(f"{path}: empty file; expected one JSON object per line with {', '.join(fields)}")


@dataclass
class ChatExample:
    ids: list[int]  # tokens, EOS-padded to a multiple of B
    loss_mask: list[bool]  # True on response tokens (assistant turns, end-of-turn, EOS padding)
    where: str  # file:line


def tokenize_conversation(messages: list[dict], tok: Tokenizer, template: ChatTemplate, block_size: int,
                          where: str = "<conversation>") -> ChatExample:
    """Prompt segments (loss_mask False) and assistant segments (True), then EOS padding to a multiple of B."""
    ids: list[int] = []
    mask: list[bool] = []
    done = ""  # text already tokenised
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = template.render(messages[:k], add_generation_prompt=True)
        full = template.render(messages[: k + 1])
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError(f"{where}: the chat template is not prefix-stable (rendering more turns changed earlier "
                            "text), so prompt and response tokens cannot be separated")
        for text, is_resp in ((prefix[len(done):], False), (full[len(prefix):], True)):
            piece = tok.encode(text) if text else []
            ids += piece
            mask += [is_resp] * len(piece)
        done = full
    ids.append(tok.eos_id)
    mask.append(True)
    pad = -len(ids) % block_size
    return ChatExample(ids + [tok.eos_id] * pad, mask + [True] * pad, where)


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


def read_chat(paths: list[str], tok: Tokenizer, *, block_size: int, seq_len: int, over_length: str = "drop") -> list[ChatExample]:
    template = ChatTemplate(tok)
    out = []
    for p in paths:
        for where, obj in _read_jsonl(p, ("messages",)):
            msgs = validate_messages(obj["messages"], where)
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
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
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
        for where, obj in _read_jsonl(p, ("prompt", "chosen", "rejected")):
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
        for where, obj in _read_jsonl(p, ("prompt", "answer")):
            if not isinstance(obj["answer"], str):
                raise DataError(f"{where}: field 'answer' must be a string")
            out.append(RLPrompt(tuple(_prompt_messages(obj["prompt"], where, system)), obj["answer"], where))
    return out


def task_prompt(ex: TaskExample, system: str | None = SYSTEM_PROMPT) -> RLPrompt:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": ex.prompt}]
    return RLPrompt(tuple(msgs), ex.answer, f"task:{ex.task}")


def encode_prompt(messages, tok: Tokenizer, template: ChatTemplate | None = None) -> list[int]:
    return tok.encode((template or ChatTemplate(tok)).render(list(messages), add_generation_prompt=True))


# ---- generated data (blockdiff make-data --kind chat|pairs) ----

def task_conversation(ex: TaskExample, system: str = SYSTEM_PROMPT) -> dict:
    """Instruction format of a synthetic task: the task prompt as the user turn, the exact answer as the reply."""
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": ex.prompt},
                         {"role": "assistant", "content": ex.answer}]}


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
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        written.append(path)
    return written
