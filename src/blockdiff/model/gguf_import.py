"""Import a GGUF checkpoint (llama.cpp's single-file format) once into an HF folder that every blockdiff command
reads: config.json, model.safetensors (fp32), tokenizer.json + tokenizer_config.json (with the chat template),
generation_config.json and gguf_import.json (where it came from).

Why import once instead of reading GGUF at every load: a GGUF is a storage format, not a second model family.
Importing keeps one load path (`hf_io.load_pretrained`, `load.load_checkpoint`) for training, decoding, serving,
the spec decoder and the HF transformers parity tests; the quantised blocks are dequantised once instead of at
every start; and the result is an ordinary HF folder that transformers, the conversion recipes and a diff tool
all read. The price is disk: the folder holds fp32 weights (4 bytes a parameter; 538 MB for SmolLM2-135M against
98 MB of Q4_1). Training starts from fp32 anyway.

What the import does (llama.cpp's `convert_hf_to_gguf.py` run backwards):
- architecture numbers from the `{arch}.*` metadata (block_count, embedding_length, head counts, rope base, ...),
  the vocabulary size from the token embedding;
- every tensor dequantised with the `gguf` package's own reference dequantiser (`gguf.quants.dequantize`) to
  fp32, renamed blk.N.attn_q -> model.layers.N.self_attn.q_proj, ...; a missing output.weight means a tied head;
- for `llama` the q_proj / k_proj rows un-permuted: llama.cpp's converter reorders each head's rows from HF's
  rotate-half RoPE layout (first half, second half) to interleaved pairs (`LlamaModel.permute`); qwen2 / qwen3
  files are written unpermuted (llama.cpp runs them with NeoX-style RoPE);
- the tokenizer rebuilt with the `tokenizers` library from tokenizer.ggml.tokens / merges / token_type, with the
  pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` name stands for (`_PRE_TOKENIZERS`; an unknown name is
  refused rather than guessed, since a wrong split changes every prompt silently);
- the folder written atomically and read back (weights through `hf_io.load_pretrained`, tokenizer through
  `load_tokenizer`) before it replaces `out`.

Needs the `gguf` extra (`pip install -e ".[gguf]"`); `gguf` is imported when an import runs, not with this module.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RawTokenizer

from ..atomic import folder_for_replace, follow_umask, write_json
from ..data.tokenizer import Tokenizer, load_tokenizer
from .config import ModelConfig
from .hf_io import WEIGHTS_NAME, load_pretrained

# GGUF general.architecture -> (HF model_type, whether llama.cpp permuted the q/k rows when it wrote the file).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),  # Llama 1-3, SmolLM, TinyLlama, Mistral-7B (llama.cpp writes them all as llama)
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}

# Tensor types gguf's numpy dequantiser implements that llama.cpp writes for these models. F32, Q8_0 and Q4_1 are
# exercised by tests/test_gguf.py and the SmolLM2 file; the others go through the same type-agnostic path.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor names -> HF names (gguf-py constants.py TENSOR_NAMES for LLM_ARCH_LLAMA / QWEN2 / QWEN3).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre, llama-vocab.cpp) -> the HF pre-tokenizer that splits the same
# way, and whether BPE skips merges for words already in the vocabulary (Llama 3's `ignore_merges`).
_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _regex_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


_PRE_TOKENIZERS: dict[str, tuple[Any, bool]] = {
    "gpt-2": (lambda: _GPT2_SPLIT, False),
    # SmolLM / SmolLM2: one token per digit, then GPT-2's split (llama.cpp: "\p{N}", then the GPT-2 regex)
    "smollm": (lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT]), False),
    "llama-bpe": (lambda: _regex_then_bytes(_LLAMA3_SPLIT), True),
    "qwen2": (lambda: _regex_then_bytes(_QWEN2_SPLIT), False),
}

# tokenizer.ggml.token_type values (gguf-py constants.py TokenType)
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class ImportResult:
    out: Path
    source: Path
    architecture: str  # GGUF general.architecture
    num_parameters: int  # stored parameters (a tied head counted once)
    tensor_types: dict[str, int]  # GGUF tensor type -> number of tensors of that type in the file


def find_gguf(src: str | Path) -> Path:
    """The .gguf file `src` names: the file itself, or the only .gguf in the folder `src`."""
    src = Path(src)
    if src.is_dir():
        found = sorted(src.glob("*.gguf"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise ValueError(f"{src}: expected exactly one .gguf file in the folder, found {len(found)} ({names})")
        return found[0]
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such GGUF file or folder")
    return src


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ValueError(f"importing a GGUF needs the gguf extra: pip install -e '.[gguf]' ({e})") from None
    return gguf


class _Metadata:
    """The key/value section of a GGUF file; errors name the file and the key."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise ValueError(f"{self.path}: GGUF metadata lacks {key}")
        return self.get(key)


def _hf_config(meta: _Metadata, arch: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """config.json keys for the file's architecture, from the `{arch}.*` metadata llama.cpp writes."""
    model_type, _ = SUPPORTED_ARCHITECTURES[arch]
    heads = int(meta.require(f"{arch}.attention.head_count"))
    hidden = int(meta.require(f"{arch}.embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{meta.path}: RoPE rotates {rope_dim} of {head_dim} channels per head; partial RoPE is "
                         "not supported for GGUF import")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in shapes:
        raise ValueError(f"{meta.path}: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs'}) is not "
                         "supported for GGUF import; supported: none")
    hf: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.require(f"{arch}.context_length")),
        "tie_word_embeddings": "output.weight" not in shapes,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if model_type == "llama":
        hf["attention_bias"] = "blk.0.attn_q.bias" in shapes
        hf["mlp_bias"] = "blk.0.ffn_gate.bias" in shapes
    hf.update(_special_ids(meta))
    return hf


def _f32(x: float) -> float:
    """A float32 metadata value as its shortest float32 spelling (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(x)))


def _special_ids(meta: _Metadata) -> dict[str, int]:
    ids = {role: meta.get(f"tokenizer.ggml.{key}") for role, key in
           (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"))}
    return {f"{role}_token_id": int(i) for role, i in ids.items() if i is not None}


def _tokenizer(meta: _Metadata, model_max_length: int) -> Tokenizer:
    """The byte-level BPE tokenizer the file describes, with its special tokens and chat template."""
    kind = meta.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{meta.path}: tokenizer model {kind!r} is not supported for GGUF import; supported: gpt2 "
                         "(byte-level BPE)")
    pre = meta.require("tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{meta.path}: pre-tokenizer {pre!r} is not supported for GGUF import; supported: "
                         f"{', '.join(_PRE_TOKENIZERS)}")
    make_pre, ignore_merges = _PRE_TOKENIZERS[pre]
    tokens = meta.require("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    tok = RawTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    # control tokens (<|im_start|>, ...) are matched whole and are special; user-defined ones are matched whole
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])
    ids = _special_ids(meta)
    if "eos_token_id" not in ids:
        raise ValueError(f"{meta.path}: GGUF metadata lacks tokenizer.ggml.eos_token_id")
    bos = ids.get("bos_token_id")
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token", False):
        # what HF's tokenizer.json does for Llama 3: encode(..., add_special_tokens=True) prepends BOS
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    return Tokenizer(tok, eos_id=ids["eos_token_id"], pad_id=ids.get("pad_token_id"), bos_id=bos,
                     chat_template=meta.get("tokenizer.chat_template"), model_max_length=model_max_length)


def hf_name(gguf_name: str) -> str | None:
    """The HF key of a GGUF tensor name, or None for a tensor the dense family does not have."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `LlamaModel.permute` of a q/k projection (weight [H*hd, d] or bias [H*hd]): per head it
    wrote rows (0, hd/2, 1, hd/2+1, ...) of HF's rotate-half layout; this puts them back in order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _shape(t) -> tuple[int, ...]:
    """A reader tensor's shape in torch order (GGUF lists dims innermost first)."""
    return tuple(int(n) for n in reversed(t.shape))


def _state_dict(reader, gguf, arch: str, hf_cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF key -> fp32 tensor for every tensor in the file (names already checked), dequantised and (llama)
    un-permuted."""
    _, permuted = SUPPORTED_ARCHITECTURES[arch]
    heads = {"attn_q": hf_cfg["num_attention_heads"], "attn_k": hf_cfg["num_key_value_heads"]}
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32", copy=True))
        w = w.reshape(_shape(t))
        m = _LAYER_RE.match(t.name)
        if permuted and m is not None and m.group(2) in heads:
            w = unpermute_rows(w, heads[m.group(2)])
        sd[hf_name(t.name)] = w
    return sd


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_gguf(src: str | Path, out: str | Path, *, overwrite: bool = False) -> ImportResult:
    """Write the GGUF checkpoint `src` (a .gguf file, or a folder holding exactly one) as an HF folder `out`.
    `out` must not exist unless `overwrite`; it appears whole or not at all."""
    gguf = _gguf()
    path = find_gguf(src)
    out = Path(out)
    if out.exists() and not (overwrite and out.is_dir()):
        raise FileExistsError(f"{out} exists" + (" and is not a folder" if overwrite else " (--overwrite replaces it)"))
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, struct errors... on a damaged file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = _Metadata(reader, path)
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if int(meta.get("split.count", 1)) > 1:
        raise ValueError(f"{path}: one part of a split GGUF ({meta.get('split.count')} files); merge them first with "
                         "llama.cpp's llama-gguf-split --merge")
    types = Counter(t.tensor_type.name for t in reader.tensors)
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, a quantisation type the "
                             f"import does not support; supported: {', '.join(SUPPORTED_TYPES)}")
    shapes = {t.name: _shape(t) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{path}: GGUF has no token_embd.weight tensor")
    hf_cfg = _hf_config(meta, arch, shapes)  # before the names: it explains rope_freqs.weight
    for name in shapes:
        if hf_name(name) is None:
            raise ValueError(f"{path}: tensor {name} has no counterpart in a {arch} model; not importable")
    cfg = ModelConfig.from_hf(hf_cfg, source=str(path))  # the one reader of config.json keys checks them
    tok = _tokenizer(meta, cfg.max_position_embeddings)
    sd = _state_dict(reader, gguf, arch, hf_cfg)
    with folder_for_replace(out) as tmp:
        write_json(tmp / "config.json", cfg.to_hf())  # torch_dtype / dtype float32 ride in hf_extra
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        follow_umask(tmp / WEIGHTS_NAME)
        tok.save(tmp)
        write_json(tmp / "generation_config.json", {**_special_ids(meta), "do_sample": False})
        write_json(tmp / "gguf_import.json", {
            "source": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size, "architecture": arch,
            "name": meta.get("general.name"), "tensor_types": dict(types),
        })
        load_pretrained(tmp)  # read back before it replaces `out`: shapes, names, finite values
        load_tokenizer(tmp)
    n_params = sum(t.numel() for t in sd.values())
    return ImportResult(out=out, source=path, architecture=arch, num_parameters=n_params, tensor_types=dict(types))
