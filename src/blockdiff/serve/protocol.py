"""The OpenAI request fields -> one checked `GenRequest`, and the OpenAI error shape.

Parsing is by hand (no pydantic model) so every bad field gets a 400 naming the field and its allowed range, in
the error JSON OpenAI clients expect: {"error": {"message", "type", "param", "code"}}. Standard fields follow the
OpenAI API (`max_tokens`, `temperature`, `top_p`, `stop`, `stream`, `stream_options.include_usage`, `seed`, `n`);
the block-diffusion ones are extra body fields (`mode`, `threshold`, `edit_threshold`, `block_size`, `steps`,
`max_post_steps`, `factor`, `draft_len`, `top_k`, `repeat_penalty`, `eos_fill`, `ignore_eos`, `stream_denoise`), each
defaulting to the server's DecodeConfig (docs/serving.md). A field no API knows (`max_token`) is a 400 naming it,
as the OpenAI API answers; OpenAI fields that do not change the output here (`user`, `metadata`, ...) are accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from ..decode.config import MAX_DRAFT_LEN, MODES, DecodeConfig

MAX_STOP = 16  # stop strings per request
MAX_N = 16  # choices per request (rows)

# the numeric decoding fields: (request field = DecodeConfig field, low, high, integer); top_p and factor exclude low
DECODING_NUMBERS = (("temperature", 0, 2, False), ("top_p", 0, 1, False), ("threshold", 0, 1, False),
                    ("edit_threshold", 0, 1, False), ("top_k", 0, 1 << 20, True), ("steps", 1, 4096, True),
                    ("max_post_steps", 0, 1024, True), ("factor", 0, 1e6, False),
                    ("draft_len", 0, MAX_DRAFT_LEN, True), ("window", 0, 4096, True),
                    ("repeat_penalty", 0, 1e4, False), ("block_size", 1, 4096, True))
DECODING_SWITCHES = ("eos_fill", "ignore_eos")
# OpenAI fields refused when set to anything but their "off" value, and those accepted because they do not change
# the output here (metadata, routing and caching hints)
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "tools", "functions", "audio",
               "prediction", "web_search_options")
TEXT_ONLY = {"response_format": {"type": "text"}, "modalities": ["text"]}  # accepted with this value only
IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_options",
           "prompt_cache_retention", "safety_identifier", "moderation", "parallel_tool_calls", "tool_choice",
           "function_call", "reasoning_effort", "verbosity")
KNOWN_FIELDS = frozenset(("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "mode", "n", "seed",
                          "stop", "stream", "stream_options", "stream_denoise", "presence_penalty", "frequency_penalty",
                          *(name for name, *_ in DECODING_NUMBERS), *DECODING_SWITCHES, *UNSUPPORTED, *TEXT_ONLY,
                          *IGNORED))


class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


@dataclass
class GenRequest:
    """One checked request: its prompts as token ids, the decoding setting, and how to answer."""

    prompts: list[list[int]]  # one per prompt (completions may send several); each yields `n` choices
    cfg: DecodeConfig
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    stream_denoise: bool = False  # opt-in: provisional per-step state in the stream (the viewer)
    chat: bool = False
    model: str = ""
    fields: dict = field(default_factory=dict)  # the DecodeConfig fields the request set


def _typed(body: dict, name: str, kinds, what: str, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise bad(name, f"must be {what}, got a boolean")
    if not isinstance(v, kinds):
        raise bad(name, f"must be {what}, got {type(v).__name__}")
    return v


def _number(body, name, lo, hi, *, integer=False, default=None, lo_open=False):
    kinds = int if integer else (int, float)
    v = _typed(body, name, kinds, "an integer" if integer else "a number", default)
    if v is None:
        return None
    if v != v or (v < lo or (lo_open and v == lo)) or v > hi:
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        raise bad(name, f"must be {lo_s} and <= {hi}, got {v}")
    return v


def parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", "must be a string or a list of strings")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
    if any(not s for s in stop):
        raise bad("stop", "stop strings must not be empty")
    return tuple(stop)


def parse_decoding(body: dict, base: DecodeConfig, *, max_tokens_limit: int,
                   limit_name: str = "") -> tuple[DecodeConfig, dict]:
    """The DecodeConfig of a request: the server's `base` with the fields the body sets, each range-checked
    (`limit_name` says what max_tokens_limit is, in the message of a max_tokens above it)."""
    f: dict = {}
    budget = []
    for name in ("max_tokens", "max_completion_tokens"):
        v = _number(body, name, 1, float("inf"), integer=True)
        if v is not None and v > max_tokens_limit:
            raise bad(name, f"must be >= 1 and <= {max_tokens_limit}" + (f", {limit_name}" if limit_name else "")
                      + f", got {v}")
        budget.append(v)
    mt, mct = budget
    if mt is not None or mct is not None:
        f["max_new_tokens"] = mt if mt is not None else mct
    mode = _typed(body, "mode", str, "a string")
    if mode is not None:
        if mode not in MODES:
            raise bad("mode", f"unknown decoding mode {mode!r}; allowed: {', '.join(MODES)}")
        f["mode"] = mode
    for name, lo, hi, integer in DECODING_NUMBERS:
        v = _number(body, name, lo, hi, integer=integer, lo_open=name in ("top_p", "factor"))
        if v is not None:
            f[name] = v
    for name in DECODING_SWITCHES:
        v = _typed(body, name, bool, "a boolean")
        if v is not None:
            f[name] = v
    try:
        cfg = dataclasses.replace(base, **f)
    except ValueError as e:  # DecodeConfig's own checks (the one owner of the ranges)
        raise APIError(400, str(e)) from None
    return cfg, f


def parse_common(body: dict, base: DecodeConfig, *, max_tokens_limit: int, chat: bool,
                 limit_name: str = "") -> GenRequest:
    """The fields completions and chat share (the prompt is set by the caller)."""
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], KNOWN_FIELDS, n=1)
        raise bad(unknown[0], "unrecognized request argument" + (f" (did you mean {close[0]}?)" if close else ""))
    for name in UNSUPPORTED:
        v = body.get(name)
        if name == "best_of" and v == 1 and v is not True:
            continue
        if v is True or v not in (None, False, 0, [], {}):  # only the "off" values
            raise bad(name, "is not supported by this server")
    for name, only in TEXT_ONLY.items():
        if body.get(name) not in (None, only):
            raise bad(name, f"only {only} is supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _number(body, name, -2, 2)
        if v:
            raise bad(name, "is not supported by this server (use repeat_penalty, a block-diffusion extra)")
    cfg, fields = parse_decoding(body, base, max_tokens_limit=max_tokens_limit, limit_name=limit_name)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options", "must be an object")
    req = GenRequest(prompts=[], cfg=cfg, chat=chat, fields=fields,
                     n=_number(body, "n", 1, MAX_N, integer=True, default=1),
                     seed=_number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True),
                     stop=parse_stop(body), stream=_typed(body, "stream", bool, "a boolean", False),
                     include_usage=bool(so and _typed(so, "include_usage", bool, "a boolean", False)),
                     stream_denoise=_typed(body, "stream_denoise", bool, "a boolean", False),
                     model=_typed(body, "model", str, "a string", ""))
    if req.stream_denoise and not req.stream:
        raise bad("stream_denoise", "needs stream: true")
    return req


def completion_prompts(body: dict, encode, *, max_prompts: int = 64) -> list[list[int]]:
    """`prompt` of /v1/completions: a string, a list of strings, a list of token ids, or a list of such lists."""
    p = body.get("prompt")
    if p is None:
        raise bad("prompt", "is required")
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        items = [p]
    elif isinstance(p, list) and p:
        items = p
    else:
        raise bad("prompt", "must be a non-empty string, list of strings, list of token ids or list of such lists")
    if len(items) > max_prompts:
        raise bad("prompt", f"at most {max_prompts} prompts per request, got {len(items)}")
    out = []
    for k, item in enumerate(items):
        if isinstance(item, str):
            ids = encode(item) if item else []
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = list(item)
        else:
            raise bad("prompt", f"prompt {k} must be a string or a list of token ids")
        if not ids:
            raise bad("prompt", f"prompt {k} is empty: a prompt must hold at least one token")
        out.append(ids)
    return out


def chat_messages(body: dict) -> list[dict]:
    """`messages` of /v1/chat/completions: role system/user/assistant, string content (or text parts)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "must be an object")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}].role", "must be one of system, user, assistant, developer")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise bad(f"messages[{i}].content", "only text content parts are supported")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "must be a string")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out
