"""GGUF import (`blockdiff import-gguf`, model/gguf_import.py) on tiny GGUF files written here with the `gguf`
package's writer the way llama.cpp's `convert_hf_to_gguf.py` writes them (tensor names from gguf's own name map,
Llama q/k rows permuted, 2-D weights quantised where a row holds whole blocks). The reference on the other side is
HF transformers on the original folder, or on the gguf-dequantised weights for quantised files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_usage_error, run_cli
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from blockdiff.data.tokenizer import load_tokenizer  # noqa: E402
from blockdiff.load import load_checkpoint  # noqa: E402
from blockdiff.model import gguf_import  # noqa: E402

TINY_AR = Path(__file__).resolve().parents[1] / "assets" / "tiny-ar"
Q = gguf.GGMLQuantizationType
TEXTS = ["The answer is 12345 + 678 = 13023.", "def add(a, b):\n    return a + b  # sum\n",
         "<|im_start|>user\nHello there!<|im_end|>\n", "  leading spaces and émoji 🙂 too"]


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (n_head already the kv head count for k_proj)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantisable(w: np.ndarray, qtype) -> bool:
    return w.ndim == 2 and w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def write_gguf(hf_folder: Path, path: Path, qtype=Q.F32, *, arch: str | None = None, pre: str = "smollm",
               extra=None) -> Path:
    """The HF folder as a GGUF file, written like llama.cpp's converter: `qtype` for every 2-D weight whose rows
    hold whole quantisation blocks (F32 otherwise, as llama.cpp falls back), norms in F32."""
    cfg = json.loads((hf_folder / "config.json").read_text())
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_folder / "tokenizer_config.json").read_text())
    arch = arch or cfg["model_type"]
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)  # tiny-ar splits as SmolLM2 ("smollm"): one token per digit, then GPT-2's regex
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    eos = tok["model"]["vocab"][tok_cfg["eos_token"]]
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_chat_template(tok_cfg["chat_template"])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    for key, t in load_file(hf_folder / "model.safetensors").items():
        t = t.float()
        if arch == "llama" and (".q_proj." in key or ".k_proj." in key):
            t = llama_cpp_permute(t, heads if ".q_proj." in key else kv_heads)
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        a = t.numpy()
        if qtype != Q.F32 and quantisable(a, qtype):
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantised_reference(hf_folder: Path, out: Path, qtype) -> Path:
    """`hf_folder` with every weight the GGUF quantises replaced by gguf's quantise -> dequantise round trip: what
    an exact import must reproduce. (Quantisation blocks run along rows, so llama.cpp's row permutation commutes
    with it.)"""
    shutil.copytree(hf_folder, out)
    sd = load_file(hf_folder / "model.safetensors")
    for k, t in sd.items():
        a = t.float().numpy()
        if quantisable(a, qtype):
            sd[k] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype).copy())
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


def hf_logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.tensor([load_tokenizer(TINY_AR).encode(" ".join(TEXTS))])
    with torch.no_grad():
        return model(ids).logits


def import_ok(src: Path, out: Path) -> Path:
    code, stdout, stderr = run_cli(["import-gguf", src, "--out", out])
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory) -> Path:
    return write_gguf(TINY_AR, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def f32_import(f32_gguf, tmp_path_factory) -> Path:
    return import_ok(f32_gguf, tmp_path_factory.mktemp("imported") / "tiny")


def test_f32_import_reproduces_the_original_logits(f32_import):
    """Names, Llama q/k un-permutation, tied head and config: HF transformers on the import equals it on the
    original (a skipped or wrong un-permutation moves the logits by O(1))."""
    err = (hf_logits(f32_import) - hf_logits(TINY_AR)).abs().max().item()
    assert err <= 1e-5, f"imported F32 GGUF differs from the original by {err:.2e}"
    assert not (f32_import / "lm_head.weight").exists()
    assert json.loads((f32_import / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantised_import_equals_gguf_dequantisation(qtype, tmp_path):
    src = write_gguf(TINY_AR, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    out = import_ok(src, tmp_path / "imported")
    ref = dequantised_reference(TINY_AR, tmp_path / "reference", qtype)
    got, want = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k].float()), f"{qtype.name}: {k} differs from gguf's dequantisation"
    logits = hf_logits(out)
    assert (logits - hf_logits(ref)).abs().max().item() <= 1e-5
    assert (logits - hf_logits(TINY_AR)).abs().max().item() > 1e-3, "nothing was quantised: the test tests nothing"
    types = json.loads((out / "gguf_import.json").read_text())["tensor_types"]
    assert types.get(qtype.name, 0) > 0


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_untied_with_bias_or_qk_norm(family, tmp_path):
    """Qwen files are not permuted; qwen2 adds q/k/v biases, qwen3 q/k norms; both here with an untied head."""
    torch.manual_seed(0)
    Config = getattr(transformers, f"{family.capitalize()}Config")
    Model = getattr(transformers, f"{family.capitalize()}ForCausalLM")
    cfg = Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
                 eos_token_id=0, pad_token_id=0)
    src = tmp_path / "hf"
    Model(cfg).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TINY_AR / f, src / f)
    sd = load_file(src / "model.safetensors")
    sd = {k: (t + 0.1 * torch.randn_like(t) if "norm" in k else t) for k, t in sd.items()}  # norms start at 1
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out = import_ok(write_gguf(src, tmp_path / "q.gguf"), tmp_path / "imported")
    assert (hf_logits(out) - hf_logits(src)).abs().max().item() <= 1e-5
    assert "lm_head.weight" in load_file(out / "model.safetensors")


def test_tokenizer_round_trip_and_chat_template(f32_import):
    ours, orig = load_tokenizer(f32_import), load_tokenizer(TINY_AR)
    hf_ours = transformers.AutoTokenizer.from_pretrained(f32_import)
    hf_orig = transformers.AutoTokenizer.from_pretrained(TINY_AR)
    for text in TEXTS:
        # the split itself, not only the ids: tiny-ar's merges never join digits, so ids alone would not notice
        assert ours.tok.pre_tokenizer.pre_tokenize_str(text) == orig.tok.pre_tokenizer.pre_tokenize_str(text)
        assert ours.encode(text) == orig.encode(text), text
        assert hf_ours(text)["input_ids"] == hf_orig(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
    assert (ours.eos_id, ours.pad_id) == (orig.eos_id, orig.pad_id)
    assert ours.chat_template == orig.chat_template
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    assert hf_ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        hf_orig.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_blockdiff_loads_the_import_and_matches_hf(f32_import):
    loaded = load_checkpoint(f32_import)
    ids = torch.tensor([loaded.tokenizer.encode(" ".join(TEXTS))])
    T = ids.shape[1]
    with torch.no_grad():
        ours = loaded.model(ids, mask=torch.ones(T, T, dtype=torch.bool).tril()[None, None])
    assert (ours - hf_logits(TINY_AR)).abs().max().item() <= 1e-4
    assert not loaded.is_diffusion


def test_source_may_be_a_folder_with_one_gguf(f32_gguf, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    shutil.copy(f32_gguf, folder / "m.gguf")
    out = import_ok(folder, tmp_path / "out")
    assert json.loads((out / "gguf_import.json").read_text())["source"] == "m.gguf"


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def expect_error(tmp_path, src, *needles, out=None, extra=()):
    out = out or tmp_path / "out"
    code, _, stderr = run_cli(["import-gguf", src, "--out", out, *extra])
    assert_usage_error(code, stderr, "import-gguf", *needles)
    return out


def test_unsupported_architecture_is_named(tmp_path):
    src = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(src), "phi2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    out = expect_error(tmp_path, src, "'phi2'", "llama, qwen2, qwen3")
    assert not out.exists() and no_leftovers(tmp_path) == []


def test_unsupported_quantisation_is_named(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]

    def add_iq4(w):
        w.add_tensor("blk.0.extra.weight", np.zeros((4, 64 // block * size), np.uint8), raw_dtype=Q.IQ4_NL)

    src = write_gguf(TINY_AR, tmp_path / "iq.gguf", extra=add_iq4)
    out = expect_error(tmp_path, src, "IQ4_NL", "blk.0.extra.weight", "Q4_1")
    assert not out.exists() and no_leftovers(tmp_path) == []


def test_unknown_pre_tokenizer_is_refused_not_guessed(tmp_path):
    src = write_gguf(TINY_AR, tmp_path / "pre.gguf", pre="mystery-bpe")
    expect_error(tmp_path, src, "'mystery-bpe'", "smollm")


def test_qwen2_split_is_transformers_own():
    qwen2 = pytest.importorskip("transformers.models.qwen2.tokenization_qwen2")
    assert gguf_import._QWEN2_SPLIT == qwen2.PRETOKENIZE_REGEX


def test_missing_source_and_bad_folders(f32_gguf, tmp_path):
    expect_error(tmp_path, tmp_path / "nope.gguf", "nope.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(tmp_path, empty, "exactly one .gguf", "found 0")
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(f32_gguf, two / "a.gguf")
    shutil.copy(f32_gguf, two / "b.gguf")
    expect_error(tmp_path, two, "found 2", "a.gguf, b.gguf")
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    expect_error(tmp_path, not_gguf, "junk.gguf", "not a readable GGUF")


def test_existing_out_is_refused_unless_overwrite(f32_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(tmp_path, f32_gguf, "exists", "--overwrite", out=out)
    assert (out / "keep.txt").read_text() == "mine"
    import_ok_overwrite = run_cli(["import-gguf", f32_gguf, "--out", out, "--overwrite"])
    assert import_ok_overwrite[0] == 0, import_ok_overwrite[2]
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert no_leftovers(tmp_path) == []


def test_a_failure_while_writing_leaves_the_old_folder(f32_gguf, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def broken(folder):
        raise ValueError(f"{folder}: simulated read-back failure")

    monkeypatch.setattr(gguf_import, "load_pretrained", broken)
    expect_error(tmp_path, f32_gguf, "simulated read-back failure", out=out, extra=["--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert no_leftovers(tmp_path) == []


def test_llama_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(gguf_import.unpermute_rows(llama_cpp_permute(w, 3), 3), w)
    assert not torch.equal(llama_cpp_permute(w, 3), w)
