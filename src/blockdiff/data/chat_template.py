"""The chat template: rendering OpenAI-style messages to text, splitting a conversation into prompt and
response tokens, and cutting the answer out of a generation.

Template: the tokenizer's own (a Jinja template in tokenizer_config.json, rendered with jinja2 the way
transformers' `apply_chat_template` does) when it has one, else DEFAULT_TEMPLATE below. Assistant turns are
found by rendering prefixes: the text of turn k is render(messages[:k+1]) minus render(messages[:k],
add_generation_prompt=True), so any prefix-stable template works.

`answer_text` lives here rather than beside `tasks.is_correct`: it undoes the template (its end-of-turn and
role markers), while tasks.py judges plain text and knows nothing of tokenizers or templates.
"""

from __future__ import annotations

from dataclasses import dataclass

from .documents import DataError
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# Used when the tokenizer has no chat template: plain-text markers, so any tokenizer can encode it.
DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Tokens that end an assistant turn in common templates; an answer is cut at the first of them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
# Where an answer ends: an end-of-turn marker, or the default template's next role marker (also the server's
# implicit stop strings for chat completions).
ANSWER_ENDS = (*END_OF_TURN, "<|user|>", "<|assistant|>")


def answer_text(tok: Tokenizer, ids: list[int]) -> str:
    """The assistant's answer in a generation (already cut at EOS): text before the first end-of-turn marker
    (the SFT rows teach `answer<end-of-turn>\n<eos>...`, so decoding stops at EOS and the marker is cut here)."""
    text = tok.decode(ids)
    for marker in ANSWER_ENDS:
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


def user_turn(prompt: str, system: str | None = None) -> list[dict]:
    """Messages of a single-turn prompt: an optional system turn, then `prompt` as the user turn."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def validate_messages(messages, where: str, *, need_assistant: bool = True, field: str = "messages") -> list[dict]:
    """Check an OpenAI-style message list; raise DataError naming `where` (file:line) and the field."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} objects, "
                        f"got {type(messages).__name__}")
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


def encode_prompt(messages, tok: Tokenizer, template: ChatTemplate | None = None) -> list[int]:
    """Token ids of `messages` rendered with the generation prompt: what the model continues from."""
    return tok.encode((template or ChatTemplate(tok)).render(list(messages), add_generation_prompt=True))


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
