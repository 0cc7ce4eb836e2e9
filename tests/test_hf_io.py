"""HF folder load/save: exact round trips (single file and sharded), the saved folder loads in HF transformers
with the same logits, config.json keeps what we do not model, bad folders fail with messages that name the
file / tensor, and a failed save leaves an existing folder untouched."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import blockdiff.model.hf_io as hf_io
from blockdiff.model.config import DiffusionInfo, ModelConfig
from blockdiff.model.hf_io import INDEX_NAME, WEIGHTS_NAME, load_pretrained, save_pretrained
from blockdiff.model.masks import dense_mask
from blockdiff.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("no_grad")

B, T, V = 2, 13, 97


CASES = {
    "llama": dict(family="llama"),
    "llama-llama3-bias": dict(
        family="llama", qkv_bias=True, o_bias=True, num_kv_heads=4,
        rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32),
    ),
    "qwen2": dict(family="qwen2", qkv_bias=True),
    "qwen3-tied": dict(family="qwen3", qk_norm=True, head_dim=16, tie_word_embeddings=True),
}


def tiny_model(seed: int = 0, **kw) -> Transformer:
    """Random model whose norms and biases are not at their init values (so a dropped tensor shows)."""
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, rope_theta=100.0, max_position_embeddings=128)
    base.update(kw)
    model = Transformer(ModelConfig(**base)).eval()
    model.init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def ids() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert (a.output.weight is a.tok_embeddings.weight) == (b.output.weight is b.tok_embeddings.weight)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hf_logits(folder: Path) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    return ref(input_ids=ids(), position_ids=torch.arange(T).expand(B, T) + 3).logits


def our_logits(model: Transformer) -> torch.Tensor:
    return model(ids(), torch.arange(T).expand(B, T) + 3, dense_mask("causal", seq_len=T))


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_single_file_and_loads_in_hf(case, tmp_path):
    model = tiny_model(**CASES[case])
    out = save_pretrained(model, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    assert (out / WEIGHTS_NAME).is_file() and not (out / INDEX_NAME).exists()
    back = load_pretrained(out)
    assert back.cfg.family == model.cfg.family and back.cfg.rope_scaling == model.cfg.rope_scaling
    assert_same_weights(model, back)
    torch.testing.assert_close(our_logits(back), our_logits(model), rtol=0, atol=0)

    err = (hf_logits(out) - our_logits(model)).abs().max().item()
    assert err <= 1e-4, f"{case}: HF transformers disagrees with our model by {err:.2e}"
    assert list(tmp_path.iterdir()) == [out], "temporary files left next to the checkpoint"


def test_round_trip_sharded(tmp_path):
    model = tiny_model(**CASES["qwen3-tied"])
    out = save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=8 * 1024)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / WEIGHTS_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    stored = {}
    for s in shards:
        with safe_open(str(s), framework="pt") as f:
            stored |= {k: f.get_tensor(k) for k in f.keys()}
    assert stored.keys() == index["weight_map"].keys()
    assert "lm_head.weight" not in stored  # tied: stored once, as the embedding
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())

    back = load_pretrained(out)
    assert_same_weights(model, back)
    err = (hf_logits(out) - our_logits(model)).abs().max().item()
    assert err <= 1e-4


def test_save_dtype_is_recorded_and_read_by_hf(tmp_path):
    # start from a folder written by HF itself (transformers 5 writes `dtype`, older versions `torch_dtype`)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4))
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    out = save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg.get("dtype", "bfloat16") == "bfloat16", "stale dtype from the source config.json"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / WEIGHTS_NAME).values())
    assert next(transformers.AutoModelForCausalLM.from_pretrained(out).parameters()).dtype == torch.bfloat16
    back = load_pretrained(out)  # default: upcast to fp32
    for k, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], t.to(torch.bfloat16).float()), k


def test_config_keeps_unknown_keys(tmp_path):
    model = tiny_model()
    first = save_pretrained(model, tmp_path / "a")
    cfg = json.loads((first / "config.json").read_text())
    cfg.update(foo=1, eos_token_id=[5, 7], bos_token_id=3, auto_map={"AutoModel": "x.Y"})
    (first / "config.json").write_text(json.dumps(cfg))

    loaded = load_pretrained(first)
    second = save_pretrained(loaded, tmp_path / "b")
    cfg2 = json.loads((second / "config.json").read_text())
    assert cfg2["foo"] == 1 and cfg2["eos_token_id"] == [5, 7] and cfg2["bos_token_id"] == 3
    assert cfg2["auto_map"] == {"AutoModel": "x.Y"}
    assert cfg2["architectures"] == ["LlamaForCausalLM"]
    assert_same_weights(model, load_pretrained(second))


def test_diffusion_section_round_trips_and_folder_still_loads_in_hf(tmp_path):
    model = tiny_model(**CASES["qwen2"])
    model.cfg.diffusion = DiffusionInfo(mask_token_id=V - 1, block_size=4)
    out = save_pretrained(model, tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text())["blockdiff"] == {
        "mask_token_id": V - 1, "block_size": 4, "labels": "same", "clean_stream": "block_causal"}
    back = load_pretrained(out)
    assert back.cfg.diffusion == DiffusionInfo(mask_token_id=V - 1, block_size=4) and back.cfg.is_diffusion
    assert "blockdiff" not in back.cfg.hf_extra
    assert_same_weights(model, back)
    # and through a second save
    again = load_pretrained(save_pretrained(back, tmp_path / "again"))
    assert again.cfg.diffusion == back.cfg.diffusion
    err = (hf_logits(out) - our_logits(model)).abs().max().item()
    assert err <= 1e-4


def test_label_alignment_is_a_checkpoint_property(tmp_path):
    """labels / clean_stream round-trip through config.json; a section written before they existed (or by hand)
    reads as LLaDA2's same-position, block-causal convention; a bad value names the field."""
    model = tiny_model(**CASES["llama"])
    model.cfg.diffusion = DiffusionInfo(mask_token_id=V - 1, block_size=4, labels="shift", clean_stream="causal")
    out = save_pretrained(model, tmp_path / "shifted")
    back = load_pretrained(out).cfg.diffusion
    assert (back.labels, back.clean_stream, back.shift, back.causal_clean) == ("shift", "causal", True, True)
    cfg = json.loads((out / "config.json").read_text())
    cfg["blockdiff"] = {"mask_token_id": V - 1, "block_size": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    old = load_pretrained(out).cfg.diffusion
    assert (old.labels, old.clean_stream, old.shift, old.causal_clean) == ("same", "block_causal", False, False)
    cfg["blockdiff"]["labels"] = "left"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"blockdiff.labels must be one of \('same', 'shift'\), got 'left'"):
        load_pretrained(out)


def test_save_over_existing_folder_replaces_it(tmp_path):
    dest = tmp_path / "ckpt"
    save_pretrained(tiny_model(seed=0), dest, max_shard_bytes=8 * 1024)  # sharded
    (dest / "stale.txt").write_text("old")
    new = tiny_model(seed=5)
    save_pretrained(new, dest)  # single file
    assert not (dest / "stale.txt").exists() and not (dest / INDEX_NAME).exists()
    assert_same_weights(new, load_pretrained(dest))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ------------------------------------------------------------------------------ bad folders
@pytest.fixture
def good(tmp_path) -> Path:
    return save_pretrained(tiny_model(), tmp_path / "good")


def _load_fails(folder: Path, exc, *needles):
    before = snapshot(folder) if folder.is_dir() else None
    with pytest.raises(exc) as e:
        load_pretrained(folder)
    msg = str(e.value)
    for needle in needles:
        assert str(needle) in msg, f"{needle!r} not in error: {msg}"
    if before is not None:
        assert snapshot(folder) == before, "loading modified the folder"
    return msg


def test_missing_folder(tmp_path):
    _load_fails(tmp_path / "nope", FileNotFoundError, tmp_path / "nope")


def test_missing_config(good):
    (good / "config.json").unlink()
    _load_fails(good, FileNotFoundError, good / "config.json")


def test_invalid_json_names_file_and_line(good):
    (good / "config.json").write_text('{\n  "model_type": "llama",\n  "vocab_size": 97,,\n}\n')
    _load_fails(good, ValueError, f"{good / 'config.json'}:3", "invalid JSON")


def test_no_weights_lists_what_was_found(good):
    (good / WEIGHTS_NAME).rename(good / "pytorch_model.bin")
    _load_fails(good, FileNotFoundError, WEIGHTS_NAME, INDEX_NAME, "config.json", "pytorch_model.bin")


def test_missing_shard(tmp_path):
    folder = save_pretrained(tiny_model(), tmp_path / "sharded", max_shard_bytes=8 * 1024)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    _load_fails(folder, FileNotFoundError, shard.name, INDEX_NAME)


def _rewrite(folder: Path, edit) -> None:
    sd = load_file(folder / WEIGHTS_NAME)
    edit(sd)
    save_file(sd, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def test_wrong_shape_names_tensor_and_both_shapes(good):
    key = "model.layers.1.mlp.up_proj.weight"  # (40, 32)
    _rewrite(good, lambda sd: sd.__setitem__(key, torch.zeros(41, 32)))
    _load_fails(good, ValueError, key, "(41, 32)", "(40, 32)")


def test_missing_tensor_is_named(good):
    key = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(good, lambda sd: sd.pop(key))
    _load_fails(good, ValueError, key, "lacks")


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.rogue.weight", "model.layers.7.mlp.up_proj.weight",
                                 "model.layers.0.self_attn.q_proj.bias"])
def test_unexpected_tensor_is_named(good, key):
    # an unknown name, a layer the config does not have, a bias the config does not have
    _rewrite(good, lambda sd: sd.__setitem__(key, torch.zeros(4)))
    _load_fails(good, ValueError, key, "does not use")


def test_rotary_inv_freq_buffer_is_ignored(good):
    _rewrite(good, lambda sd: sd.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(4)))
    load_pretrained(good)


# ------------------------------------------------------------------------------ atomic save
def test_failed_save_leaves_existing_folder_untouched(good, tmp_path, monkeypatch):
    before = snapshot(good)

    def half_write(sd, folder, max_shard_bytes):
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "_write_weights", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny_model(seed=9), good)
    assert snapshot(good) == before
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny_model(seed=9), tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"], "temporary folder left behind"


def test_failed_swap_restores_existing_folder(good, tmp_path, monkeypatch):
    """The final rename itself fails: the old folder must come back, not stay parked under a hidden name."""
    before = snapshot(good)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == good and Path(src).name.endswith(".tmp"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(hf_io.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained(tiny_model(seed=9), good)
    monkeypatch.undo()
    assert snapshot(good) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]
