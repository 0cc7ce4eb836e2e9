"""Tokenizer: training, round trips, HF compatibility, special-token discovery."""

import json

import pytest

from blockdiff.data.corpus import stdlib_documents
from blockdiff.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer

SPECIALS = ["<|endoftext|>", "<|pad|>"]
SAMPLES = [
    "def f(x):\n    return x + 12345  # comment, with punctuation!\n",
    "add 482+97=579",
    "lookup a=3 k=7 c=1 k?7",
    "  leading spaces\tand tabs\n\n\ntrailing   ",
    "Unicode survives too: café, naïve, 日本語, emoji 🙂",
    "",
]


@pytest.fixture(scope="module")
def texts():
    return stdlib_documents("train", 60_000) + ["add 12+345=357", "sort 5 3 9 1=1 3 5 9"]


@pytest.fixture(scope="module")
def raw(texts):
    return train_bpe_tokenizer(texts, 300, SPECIALS)


@pytest.fixture()
def folder(raw, tmp_path):
    save_tokenizer(raw, tmp_path / "tok", eos_token="<|endoftext|>", pad_token="<|pad|>",
                   chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return tmp_path / "tok"


def test_training_is_deterministic_and_specials_come_first(raw, texts):
    again = train_bpe_tokenizer(texts, 300, SPECIALS)
    assert raw.to_str() == again.to_str()
    assert raw.get_vocab_size() == 300
    assert [raw.token_to_id(t) for t in SPECIALS] == [0, 1]


def test_round_trip_and_single_digit_tokens(folder):
    tok = load_tokenizer(folder)
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    ids = tok.encode("9081726354")
    assert len(ids) == 10 and [tok.decode([i]) for i in ids] == list("9081726354")
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    # Specials are not added by encode, but are recognised in text and skippable on decode.
    assert tok.encode("hi")[-1] != tok.eos_id
    ids = tok.encode("hi<|endoftext|>")
    assert ids[-1] == tok.eos_id and tok.decode(ids, skip_special_tokens=True) == "hi"


def test_loaded_attributes(folder):
    tok = load_tokenizer(folder)
    assert (tok.eos_id, tok.eos_ids, tok.pad_id, tok.bos_id) == (0, (0,), 1, None)
    assert tok.mask_id is None and tok.mask_token is None
    assert tok.vocab_size == 300
    assert "messages" in tok.chat_template
    # Files are written atomically: no temp files are left behind.
    assert sorted(p.name for p in folder.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_hf_autotokenizer_loads_and_matches(folder):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for s in SAMPLES + ["x<|endoftext|>y"]:
        assert hf(s)["input_ids"] == tok.encode(s)
        assert hf.decode(tok.encode(s)) == tok.decode(tok.encode(s))
    assert (hf.eos_token_id, hf.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert hf.chat_template == tok.chat_template

    masked = tok.with_mask_token()
    masked.save(folder.parent / "masked")
    hf = transformers.AutoTokenizer.from_pretrained(folder.parent / "masked")
    assert hf.mask_token_id == masked.mask_id
    assert hf("a<|mask|>b")["input_ids"] == masked.encode("a<|mask|>b")


def test_with_mask_token(folder, tmp_path):
    tok = load_tokenizer(folder)
    masked = tok.with_mask_token()
    assert masked is not tok and tok.mask_id is None  # the original is untouched
    assert masked.vocab_size == tok.vocab_size + 1
    assert masked.mask_id == tok.vocab_size and masked.mask_token == "<|mask|>"
    assert masked.encode("a<|mask|>b")[1] == masked.mask_id
    assert masked.with_mask_token("[MASK]") is masked  # already has one: unchanged
    assert masked.fingerprint() != tok.fingerprint()

    masked.save(tmp_path / "m")
    back = load_tokenizer(tmp_path / "m")
    assert (back.mask_id, back.eos_id, back.pad_id, back.vocab_size) == (
        masked.mask_id, masked.eos_id, masked.pad_id, masked.vocab_size)
    assert back.chat_template == tok.chat_template
    assert back.fingerprint() == masked.fingerprint()


def test_fingerprint_is_stable_and_tracks_specials(folder):
    before = load_tokenizer(folder).fingerprint()
    assert load_tokenizer(folder).fingerprint() == before
    # special_tokens_map.json still says <|pad|>: tokenizer_config.json wins.
    _rewrite_config(folder, pad_token="<|endoftext|>")
    tok = load_tokenizer(folder)
    assert tok.pad_id == 0 and tok.fingerprint() != before


def _rewrite_config(folder, **changes):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_specials_as_dicts_and_special_tokens_map_fallback(folder):
    _rewrite_config(folder, eos_token={"content": "<|pad|>", "special": True}, pad_token=None)
    tok = load_tokenizer(folder)
    assert tok.eos_id == 1 and tok.pad_id == 1  # pad from special_tokens_map.json
    _rewrite_config(folder, eos_token=None)
    assert load_tokenizer(folder).eos_id == 0  # eos from special_tokens_map.json


def test_ids_from_config_json_and_generation_config(raw, tmp_path):
    folder = tmp_path / "t"
    save_tokenizer(raw, folder, eos_token="<|endoftext|>")
    _rewrite_config(folder, eos_token=None)
    (folder / "special_tokens_map.json").write_text("{}")
    with pytest.raises(ValueError, match="no EOS token"):
        load_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [1, 0], "bos_token_id": 5}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7], "pad_token_id": 1}))
    tok = load_tokenizer(folder)
    assert (tok.eos_id, tok.eos_ids, tok.pad_id, tok.bos_id) == (1, (1, 0, 7), 1, 5)
    # A declared eos_token comes first; config ids still end generation.
    _rewrite_config(folder, eos_token="<|endoftext|>")
    assert load_tokenizer(folder).eos_ids == (0, 1, 7)


def test_mask_token_found_by_name(raw, tmp_path):
    import tokenizers

    t = tokenizers.Tokenizer.from_str(raw.to_str())
    t.add_special_tokens([tokenizers.AddedToken("[MASK]", special=True, normalized=False)])
    save_tokenizer(t, tmp_path / "t", eos_token="<|endoftext|>")
    tok = load_tokenizer(tmp_path / "t")
    assert tok.mask_id == 300 and tok.mask_token == "[MASK]"
    assert tok.with_mask_token() is tok


def test_errors_name_folder_and_file(raw, tmp_path):
    with pytest.raises(ValueError, match="nope.*does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        save_tokenizer(raw, tmp_path / "x", eos_token="</s>")


# Special tokens as Qwen2.5 / Qwen3 and Llama 3 add them after the byte-level BPE vocabulary (a subset of each).
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|fim_pad|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_1|>"]


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_with_mask_token_on_qwen_and_llama_layouts(family, texts, tmp_path):
    """A byte-level BPE with its special tokens added after the merges (ids past the BPE vocabulary, as in Qwen and
    Llama 3) and no mask token: `<|mask|>` is appended after the last special, every existing id and encoding is
    unchanged, and the mask encodes as one special token. A token string that already exists is reused, not added
    (so its row is a trained one: train/loop.py prepare_model leaves it alone)."""
    import tokenizers

    specials = QWEN_SPECIALS if family == "qwen" else LLAMA_SPECIALS
    t = train_bpe_tokenizer(texts, 300, [])
    t.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    eos, bos = ("<|endoftext|>", None) if family == "qwen" else ("<|eot_id|>", "<|begin_of_text|>")
    save_tokenizer(t, tmp_path / "t", eos_token=eos, bos_token=bos)
    tok = load_tokenizer(tmp_path / "t")
    assert tok.mask_id is None and tok.vocab_size == 300 + len(specials)
    assert [tok.token_to_id(s) for s in specials] == list(range(300, 300 + len(specials)))

    masked = tok.with_mask_token()
    assert masked.mask_id == tok.vocab_size and masked.vocab_size == tok.vocab_size + 1
    assert (masked.eos_id, masked.bos_id, masked.pad_id, masked.eos_ids) == (tok.eos_id, tok.bos_id, tok.pad_id,
                                                                             tok.eos_ids)
    text = "".join(specials) + SAMPLES[0] + specials[1] + SAMPLES[4]
    assert masked.encode(text) == tok.encode(text)
    ids = masked.encode("a<|mask|>b")
    assert ids == tok.encode("a") + [masked.mask_id] + tok.encode("b")
    assert masked.decode(ids, skip_special_tokens=True) == "ab"

    assert tok.with_mask_token(specials[-1]).mask_id == tok.token_to_id(specials[-1])  # reused: no new id
    assert tok.with_mask_token(specials[-1]).vocab_size == tok.vocab_size
