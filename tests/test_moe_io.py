"""Official-layout LLaDA2-MoE / Ling 2.0 folders: load -> save -> load is exact (torch.equal) with the same
tensor key set and the same unmodelled config keys; per-expert tensors land in the right slice; Ling MTP layers
are skipped with a note; saving is sharded with an index; bad folders fail naming the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from moe_helpers import official_config, official_tensors, write_official_folder
from safetensors import safe_open

from blockdiff.model.hf_io import INDEX_NAME, load_pretrained, save_pretrained


def file_tensors_any(folder) -> dict[str, torch.Tensor]:
    """All tensors of a saved folder, sharded (index) or single-file."""
    if (folder / INDEX_NAME).exists():
        return file_tensors(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def file_tensors(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    out = {}
    for name in sorted(set(index.values())):
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert out.keys() == index.keys()
    return out


@pytest.mark.parametrize("family", ["llada2_moe", "bailing_moe_v2"])
def test_round_trip_exact_and_same_layout(tmp_path, family):
    hf = official_config(family)
    tensors = official_tensors(hf, seed=1)
    src = write_official_folder(tmp_path / "src", hf, tensors)
    model = load_pretrained(src)
    # each official tensor landed where it belongs (expert slices included)
    sd = model.state_dict()
    torch.testing.assert_close(sd["layers.2.feed_forward.experts.w2"][5], tensors["model.layers.2.mlp.experts.5.down_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(sd["layers.1.feed_forward.router.expert_bias"], tensors["model.layers.1.mlp.gate.expert_bias"], rtol=0, atol=0)
    out = save_pretrained(model, tmp_path / "out", max_shard_bytes=200_000)
    saved = file_tensors(out)  # sharded: several files + index
    assert len(set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values())) > 1
    assert saved.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(saved[k], tensors[k]), k
    again = load_pretrained(out)
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd[k]), k
    cfg_out = json.loads((out / "config.json").read_text())
    for k in ("auto_map", "architectures", "model_type", "eos_token_id", "pad_token_id", "router_dtype",
              "output_router_logits", "moe_shared_expert_intermediate_size", "partial_rotary_factor"):
        assert cfg_out[k] == hf[k], k


def test_bf16_save_keeps_expert_bias_fp32(tmp_path):
    hf = official_config()
    src = write_official_folder(tmp_path / "src", hf, official_tensors(hf))
    model = load_pretrained(src)
    out = save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    saved = file_tensors_any(out)
    assert saved["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    assert saved["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_pretrained(out, dtype=torch.bfloat16)
    assert back.layers[1].feed_forward.router.expert_bias.dtype == torch.float32
    assert torch.equal(back.layers[1].feed_forward.router.expert_bias, model.layers[1].feed_forward.router.expert_bias)


def test_ling_mtp_layers_skipped_with_note(tmp_path, capsys):
    hf = official_config("bailing_moe_v2", num_nextn_predict_layers=1)
    tensors = official_tensors(hf, seed=2, mtp_layers=1)
    src = write_official_folder(tmp_path / "ling", hf, tensors)
    model = load_pretrained(src)
    assert "skipped 1 multi-token-prediction layer" in capsys.readouterr().err
    assert model.cfg.num_layers == 3 and model.cfg.hf_extra["num_nextn_predict_layers"] == 0
    out = save_pretrained(model, tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == {k for k in tensors if not k.startswith("model.layers.3.")}
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_missing_expert_and_bad_shape_name_the_tensor(tmp_path):
    hf = official_config()
    tensors = official_tensors(hf)
    del tensors["model.layers.2.mlp.experts.7.up_proj.weight"]
    with pytest.raises(ValueError, match=r"lacks tensors: model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight"):
        load_pretrained(write_official_folder(tmp_path / "missing", hf, tensors))
    tensors = official_tensors(hf)
    tensors["model.layers.1.mlp.experts.3.gate_proj.weight"] = torch.zeros(16, 64)
    with pytest.raises(ValueError, match=r"experts\.3\.gate_proj\.weight has shape \(16, 64\), config.json implies \(32, 64\)"):
        load_pretrained(write_official_folder(tmp_path / "shape", hf, tensors))
    tensors = official_tensors(hf)
    tensors["model.layers.1.mlp.experts.8.gate_proj.weight"] = torch.zeros(32, 64)  # only 8 experts: 0..7
    with pytest.raises(ValueError, match=r"does not use: model\.layers\.1\.mlp\.experts\.8\.gate_proj\.weight"):
        load_pretrained(write_official_folder(tmp_path / "extra", hf, tensors))


def logits_of(folder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_pretrained(folder).eval()(ids)


def test_expert_bias_flag_false_loads_and_routes_with_the_bias(tmp_path):
    """moe_router_enable_expert_bias=false: the official gate still adds the expert_bias buffer (and its
    save_pretrained writes it), so the folder loads, gives the logits of the same weights with the flag true, a
    non-zero bias changes them, and a save writes the flag and the bias back unchanged."""
    hf = official_config(moe_router_enable_expert_bias=False)
    tensors = official_tensors(hf, seed=5)
    for k in tensors:
        if k.endswith("expert_bias"):
            tensors[k] = tensors[k] * 10  # large enough to move several selections of 24 tokens
    ids = torch.randint(2, hf["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(8))
    off = write_official_folder(tmp_path / "off", hf, tensors)
    on = write_official_folder(tmp_path / "on", official_config(moe_router_enable_expert_bias=True), tensors)
    zero = write_official_folder(tmp_path / "zero", hf, {k: torch.zeros_like(v) if k.endswith("expert_bias") else v
                                                         for k, v in tensors.items()})
    got = logits_of(off, ids)
    assert torch.equal(got, logits_of(on, ids))
    assert not torch.allclose(got, logits_of(zero, ids), atol=1e-3), "the bias changed no routing"
    out = save_pretrained(load_pretrained(off), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["moe_router_enable_expert_bias"] is False
    assert torch.equal(file_tensors_any(out)["model.layers.1.mlp.gate.expert_bias"],
                       tensors["model.layers.1.mlp.gate.expert_bias"])
    assert torch.equal(logits_of(out, ids), got)


@pytest.mark.parametrize("shared_tensors", ["absent", "zero-width"])
def test_no_shared_expert_loads_saves_reloads_and_runs(tmp_path, shared_tensors):
    """num_shared_experts=0: the official LLaDA2 code builds no shared expert (no tensors), Ling's builds a
    zero-width one (tensors of shape [0, d] / [d, 0]); both load, as the same model as a shared expert whose
    down_proj is zero, and save -> reload keeps the config value and the logits."""
    hf = official_config(num_shared_experts=0)
    tensors = official_tensors(hf, seed=6)
    assert tensors["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (0, 64)
    if shared_tensors == "absent":
        tensors = {k: v for k, v in tensors.items() if ".shared_experts." not in k}
    src = write_official_folder(tmp_path / "src", hf, tensors)
    model = load_pretrained(src)
    assert all(layer.feed_forward.shared is None for layer in model.layers[1:])
    # reference: the same weights plus a one-expert shared SwiGLU that adds nothing (down_proj zero)
    with_shared = {k: v for k, v in tensors.items() if ".shared_experts." not in k}
    for i in (1, 2):
        p = f"model.layers.{i}.mlp.shared_experts."
        with_shared[p + "gate_proj.weight"] = torch.randn(32, 64)
        with_shared[p + "up_proj.weight"] = torch.randn(32, 64)
        with_shared[p + "down_proj.weight"] = torch.zeros(64, 32)
    ref = write_official_folder(tmp_path / "ref", official_config(num_shared_experts=1), with_shared)
    ids = torch.randint(2, hf["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(9))
    got = logits_of(src, ids)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, logits_of(ref, ids), atol=1e-6, rtol=0)
    out = save_pretrained(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_shared_experts"] == 0
    assert not any(".shared_experts." in k for k in file_tensors_any(out))
    assert torch.equal(logits_of(out, ids), got)


def test_llada2_without_mask_token_loads_without_diffusion_info(tmp_path, capsys):
    hf = official_config()
    model = load_pretrained(write_official_folder(tmp_path / "nomask", hf, official_tensors(hf), mask_token=False))
    assert model.cfg.diffusion is None
    assert "without a mask token" in capsys.readouterr().err
    hf["mask_token_id"] = 7  # a config.json mask_token_id is enough
    model = load_pretrained(write_official_folder(tmp_path / "cfgmask", hf, official_tensors(hf), mask_token=False))
    assert model.cfg.diffusion.mask_token_id == 7 and model.cfg.diffusion.block_size == 32


# ------------------------------------------------------------------------------------------- conversion
def test_convert_ling_folder_to_llada2(tmp_path, tiny_data):
    """`blockdiff convert` on a tiny Ling 2.0 folder (with an MTP layer, tokenizer without a mask token): the
    result loads as llada2_moe with the added mask token, the experts trained, and expert_bias unchanged."""
    from blockdiff.convert import run_conversion
    from blockdiff.data.tokenizer import load_tokenizer
    from blockdiff.train.recipe import parse_recipe

    hf = official_config("bailing_moe_v2", num_nextn_predict_layers=1)
    tensors = official_tensors(hf, seed=4, mtp_layers=1)
    ling = write_official_folder(tmp_path / "ling", hf, tensors, mask_token=False)
    assert load_tokenizer(ling).mask_id is None
    recipe = parse_recipe({
        "model": {"path": str(ling)},
        "data": {"train": [str(tiny_data["train"])], "valid": [str(tiny_data["valid"])], "seq_len": 32, "valid_rows": 4},
        "train": {"batch_size": 2, "eval_every": 2, "save_every": 2, "warmup_steps": 1, "threads": 1, "device": "cpu"},
        "phases": [{"block_size": 4, "steps": 2, "lr": 1e-3}, {"block_size": 8, "steps": 1, "lr": 1e-3}],
    }, source="test-recipe")
    res = run_conversion(recipe, tmp_path / "run", progress=False)
    out = res.model_dir
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llada2_moe" and cfg["architectures"] == ["LLaDA2MoeModelLM"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                               "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"}
    assert "num_nextn_predict_layers" not in cfg
    tok = load_tokenizer(out)
    model = load_pretrained(out)
    assert model.cfg.family == "llada2_moe" and type(model).__name__ == "MoETransformer"
    assert tok.mask_id is not None and model.cfg.diffusion.mask_token_id == tok.mask_id == tok.token_to_id("<|mask|>")
    assert model.cfg.diffusion.block_size == 8
    assert tok.mask_id == 300 and model.cfg.vocab_size == 301  # the Ling vocabulary was full: grown by one row
    saved = file_tensors_any(out)
    assert saved.keys() == {k for k in tensors if not k.startswith("model.layers.3.")}  # MTP layer dropped
    for layer in (1, 2):
        k = f"model.layers.{layer}.mlp.gate.expert_bias"
        assert torch.equal(saved[k], tensors[k]), "expert_bias must stay frozen"
    assert not torch.equal(saved["model.layers.1.mlp.gate.weight"], tensors["model.layers.1.mlp.gate.weight"])
    assert not torch.equal(saved["model.layers.2.mlp.shared_experts.down_proj.weight"],
                           tensors["model.layers.2.mlp.shared_experts.down_proj.weight"])


def test_cli_generate_runs_an_official_llada2_folder(tmp_path, capsys):
    """`blockdiff generate --model <LLaDA2 folder>`: diffusion info derived from the tokenizer's <|mask|>."""
    from blockdiff.cli import main

    hf = official_config()
    folder = write_official_folder(tmp_path / "llada2", hf, official_tensors(hf))
    rc = main(["generate", "--model", str(folder), "--prompt", "the quick", "--max-new-tokens", "6", "--block-size", "4",
               "--steps", "4"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "AR model" not in err and "forwards" in err
