"""Build, save and load tokenizers (the `tokenizers` library; transformers is never imported here).

A saved folder is a standard Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) that `transformers.AutoTokenizer.from_pretrained` loads and that encodes
identically to our `Tokenizer`. Special-token ids are derived from the folder (tokenizer config,
then config.json / generation_config.json) and never typed twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..atomic import write_text

# Names that mark a mask token when a tokenizer does not declare one (LLaDA, BERT, RoBERTa).
MASK_TOKEN_CANDIDATES: tuple[str, ...] = ("<|mask|>", "[MASK]", "<mask>")
_ROLES: tuple[str, ...] = ("eos", "pad", "bos", "mask")


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str]
) -> tokenizers.Tokenizer:
    """Byte-level BPE with one token per digit (arithmetic tasks need aligned digits).

    `special_tokens` get ids 0..len-1 in order; `vocab_size` counts them and the 256 byte tokens.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        # All 256 bytes even if unseen, so any text round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(
    tok: tokenizers.Tokenizer,
    folder: str | Path,
    *,
    eos_token: str,
    pad_token: str | None = None,
    bos_token: str | None = None,
    mask_token: str | None = None,
    chat_template: str | None = None,
    model_max_length: int = 4096,
) -> None:
    """Write a Hugging Face tokenizer folder; `model_max_length` is in tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    named = {"eos_token": eos_token, "pad_token": pad_token, "bos_token": bos_token, "mask_token": mask_token}
    named = {k: v for k, v in named.items() if v is not None}
    for key, token in named.items():
        if tok.token_to_id(token) is None:
            raise ValueError(f"{key}={token!r} is not in the tokenizer's vocabulary")
    added = {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "model_max_length": model_max_length,
        # HF's default clean-up would rewrite " ," to "," on decode and break round trips.
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_text(folder / "tokenizer.json", tok.to_str(pretty=True))
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    write_text(folder / "special_tokens_map.json", json.dumps(named, indent=2, ensure_ascii=False))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    """Special tokens are stored as "<eos>" or as {"content": "<eos>", ...} (AddedToken form)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> list[int]:
    """`eos_token_id` may be an int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` that knows its special-token ids.

    Build with `load_tokenizer(folder)`; `encode` never adds special tokens, callers add BOS/EOS.
    """

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        eos_id: int,
        eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        bos_id: int | None = None,
        mask_id: int | None = None,
        chat_template: str | None = None,
        model_max_length: int = 4096,
    ):
        self.tok = tok
        self.eos_id = eos_id
        # eos_id first, then every other id that ends generation (e.g. Llama-3 <|eot_id|>).
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys([eos_id, *eos_ids]))
        self.pad_id = eos_id if pad_id is None else pad_id
        self.bos_id = bos_id
        self.mask_id = mask_id
        self.chat_template = chat_template
        self.model_max_length = model_max_length  # tokens

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _token(self, i: int | None) -> str | None:
        return None if i is None else self.tok.id_to_token(i)

    @property
    def eos_token(self) -> str:
        return self.tok.id_to_token(self.eos_id)

    @property
    def pad_token(self) -> str:
        return self.tok.id_to_token(self.pad_id)

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_id)

    @property
    def mask_token(self) -> str | None:
        return self._token(self.mask_id)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking and runs on all cores.
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def with_mask_token(self, token: str = "<|mask|>") -> Tokenizer:
        """A new Tokenizer whose `token` is a special mask token; `self` if a mask token exists."""
        if self.mask_id is not None:
            return self
        tok = tokenizers.Tokenizer.from_str(self.tok.to_str())
        tok.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
        return Tokenizer(
            tok,
            eos_id=self.eos_id,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            bos_id=self.bos_id,
            mask_id=tok.token_to_id(token),
            chat_template=self.chat_template,
            model_max_length=self.model_max_length,
        )

    def save(self, folder: str | Path) -> None:
        """Write a folder that `load_tokenizer` and `AutoTokenizer.from_pretrained` both read."""
        save_tokenizer(
            self.tok,
            folder,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            bos_token=self.bos_token,
            mask_token=self.mask_token,
            chat_template=self.chat_template,
            model_max_length=self.model_max_length,
        )

    def fingerprint(self) -> str:
        """sha256 over the serialized tokenizer and special ids: a cache key for tokenized data."""
        h = hashlib.sha256(self.tok.to_str().encode("utf-8"))
        specials = {"eos_ids": self.eos_ids, "pad": self.pad_id, "bos": self.bos_id, "mask": self.mask_id}
        h.update(json.dumps(specials, sort_keys=True).encode("utf-8"))
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_ids={self.eos_ids}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, mask_id={self.mask_id})"
        )


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load a Hugging Face tokenizer folder (ours or a downloaded checkpoint's).

    Special tokens come from tokenizer_config.json, then special_tokens_map.json; ids missing
    there come from config.json, then generation_config.json, in the same folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"tokenizer folder {folder} does not exist (expected a folder with tokenizer.json)")
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(
            f"tokenizer folder {folder} has no tokenizer.json "
            "(only fast tokenizers are supported; save one with transformers' save_pretrained)"
        )
    tok = tokenizers.Tokenizer.from_file(str(tok_file))
    tok_config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    model_configs = [_read_json(folder / "config.json"), _read_json(folder / "generation_config.json")]

    def declared_id(role: str) -> int | None:
        key = f"{role}_token"
        for source in (tok_config, special_map):
            token = _token_str(source.get(key))
            if token is not None:
                i = tok.token_to_id(token)
                if i is None:
                    raise ValueError(f"tokenizer folder {folder}: {key}={token!r} is not in tokenizer.json")
                return i
        return None

    def config_ids(role: str) -> list[int]:
        return [i for cfg in model_configs for i in _ids(cfg.get(f"{role}_token_id"))]

    ids = {role: declared_id(role) for role in _ROLES}
    for role in _ROLES:
        if ids[role] is None and config_ids(role):
            ids[role] = config_ids(role)[0]
    if ids["mask"] is None:
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        ids["mask"] = next((specials[c] for c in MASK_TOKEN_CANDIDATES if c in specials), None)
    if ids["eos"] is None:
        raise ValueError(
            f"tokenizer folder {folder}: no EOS token found (expected eos_token in tokenizer_config.json "
            "or special_tokens_map.json, or eos_token_id in config.json / generation_config.json)"
        )
    template = tok_config.get("chat_template")
    template_file = folder / "chat_template.jinja"  # where transformers >= 4.50 saves it
    if template is None and template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    max_len = tok_config.get("model_max_length")
    # HF writes a huge sentinel (1e30) when the length is unknown.
    max_len = max_len if isinstance(max_len, int) and max_len < 2**31 else 4096
    return Tokenizer(
        tok,
        eos_id=ids["eos"],
        eos_ids=config_ids("eos"),
        pad_id=ids["pad"],
        bos_id=ids["bos"],
        mask_id=ids["mask"],
        chat_template=template if isinstance(template, str) else None,
        model_max_length=max_len,
    )
