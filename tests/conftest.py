"""Shared fixtures: tiny random models in the HF folder layout, built in a second on CPU (no downloads)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from decode_helpers import SHARPEN

from blockdiff.data.corpus import stdlib_documents
from blockdiff.data.tasks import generate_examples
from blockdiff.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer
from blockdiff.model.config import DiffusionInfo, ModelConfig
from blockdiff.model.hf_io import load_pretrained, save_pretrained
from blockdiff.model.transformer import Transformer, resize_vocab

torch.set_num_threads(1)  # 2 shared cores: one thread per test process is faster and deterministic
# Tokenised-corpus cache of the test session: a fresh folder, never the user's ~/.cache/blockdiff.
os.environ.setdefault("BLOCKDIFF_CACHE", tempfile.mkdtemp(prefix="blockdiff-test-cache-"))


def tiny_texts(n_examples: int = 400, code_chars: int = 20_000) -> list[str]:
    return [e.text for e in generate_examples("train", n_examples, seed=7)] + stdlib_documents("train", code_chars, seed=7)


def make_tiny_model_dir(folder: Path, *, seed: int = 0, vocab: int = 320, hidden: int = 32, layers: int = 2,
                        diffusion_block: int | None = None) -> Path:
    """A random tiny Llama with a trained BPE tokenizer (no mask token) saved as an HF folder; with
    `diffusion_block`, a mask token is added and the config gets a blockdiff diffusion section."""
    tok = train_bpe_tokenizer(tiny_texts(), vocab, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, folder, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tk = load_tokenizer(folder)
    cfg = ModelConfig(family="llama", vocab_size=tk.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4, tie_word_embeddings=True,
                      max_position_embeddings=512)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    if diffusion_block is not None:
        tk = tk.with_mask_token()
        resize_vocab(model, tk.mask_id + 1)
        model.cfg.diffusion = DiffusionInfo(mask_token_id=tk.mask_id, block_size=diffusion_block)
    save_pretrained(model, folder, tokenizer=tk)
    return folder


@pytest.fixture
def no_grad():
    """Autograd off for a test; modules of forward-only tests use it with `pytestmark = pytest.mark.usefixtures`."""
    with torch.no_grad():
        yield


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="session")
def tiny_ar_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_ar") / "model")


@pytest.fixture(scope="session")
def tiny_bd_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_bd") / "model", diffusion_block=8)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    train = write_jsonl(d / "train.jsonl", tiny_texts(300, 15_000))
    valid = write_jsonl(d / "valid.jsonl", [e.text for e in generate_examples("heldout", 40, seed=3)])
    return {"train": train, "valid": valid}


@pytest.fixture(scope="module")
def bd(tiny_bd_dir):
    """(model, mask_id, eos_id): the tiny diffusion model in eval mode with logits x SHARPEN (decode_helpers)."""
    model = load_pretrained(tiny_bd_dir).eval()
    with torch.no_grad():
        model.norm.weight.mul_(SHARPEN)
    assert model.cfg.diffusion is not None
    return model, model.cfg.diffusion.mask_token_id, load_tokenizer(tiny_bd_dir).eos_id


@pytest.fixture(scope="module")
def ar(tiny_ar_dir):
    """(model, eos_id): the tiny AR model in eval mode with logits x SHARPEN."""
    model = load_pretrained(tiny_ar_dir).eval()
    with torch.no_grad():
        model.norm.weight.mul_(SHARPEN)
    return model, load_tokenizer(tiny_ar_dir).eos_id
