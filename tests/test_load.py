"""The one checkpoint loader (load.py) and the one block-size rule (model.config.effective_block_size)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from blockdiff.decode.engine import DecodeConfig, ar_generate, generate
from blockdiff.load import load_checkpoint
from blockdiff.model.config import DEFAULT_BLOCK_SIZE, DiffusionInfo, effective_block_size
from blockdiff.train.recipe import parse_recipe
from blockdiff.train.schedule import Schedule


def test_effective_block_size_rule():
    info = DiffusionInfo(mask_token_id=5, block_size=8)
    assert effective_block_size(4, info=info) == 4  # requested wins
    assert effective_block_size(None, info=info) == 8 == effective_block_size(0, info=info)  # else the checkpoint's
    assert effective_block_size() == DEFAULT_BLOCK_SIZE  # else LLaDA2's
    assert effective_block_size(128, seq_len=64) == 64 and effective_block_size(16, seq_len=64) == 16
    with pytest.raises(ValueError, match="block size must be >= 1, got -1"):
        effective_block_size(-1)


def test_schedule_phases_and_saved_checkpoint_use_the_effective_block_size(tiny_ar_dir, tiny_data, tmp_path):
    from blockdiff.train.loop import train
    from blockdiff.train.merge import select_top_k

    raw = {"model": {"path": str(tiny_ar_dir)},
           "data": {"train": [str(tiny_data["train"])], "valid": [str(tiny_data["valid"])], "seq_len": 16,
                    "valid_rows": 2},
           "train": {"batch_size": 2, "eval_every": 1, "save_every": 1, "threads": 1, "device": "cpu"},
           "noise": {"enabled": False},
           "phases": [{"block_size": 4, "steps": 1, "lr": 1e-3}, {"block_size": 64, "steps": 1, "lr": 1e-3}]}
    recipe = parse_recipe(raw, source="t")
    assert [p.block_size for p in Schedule(recipe).phases] == [4, 16]
    res = train(recipe, tmp_path / "run", progress=False)
    loaded = load_checkpoint(res.final_dir)
    assert loaded.info.block_size == 16  # the checkpoint, the trainer state, the metrics and the eval agree
    from blockdiff.train.checkpoint import checkpoint_dir, load_trainer_state

    state = load_trainer_state(checkpoint_dir(tmp_path / "run", 2))
    assert state["block_size"] == 16 and res.evals[-1]["block_size"] == 16
    assert select_top_k(tmp_path / "run", 1)[1] == 16
    assert loaded.decode_config().block_size == 16 and loaded.decode_config(block_size=4).block_size == 4


def test_loader_returns_model_tokenizer_and_info_together(tiny_bd_dir, tiny_ar_dir):
    bd = load_checkpoint(tiny_bd_dir)
    assert bd.is_diffusion and bd.info.mask_token_id == bd.tokenizer.mask_id and not bd.model.training
    assert bd.info.block_size == 8 and bd.decode_config(mode="S").block_size == 8
    ar = load_checkpoint(tiny_ar_dir, train=True)
    assert not ar.is_diffusion and ar.model.training


def test_loader_generate_is_the_engine_or_ar(tiny_bd_dir, tiny_ar_dir):
    """Loaded.generate dispatches: the batched engine for a diffusion checkpoint, AR decoding otherwise or with ar."""
    bd = load_checkpoint(tiny_bd_dir)
    prompts = [bd.tokenizer.encode("add 1+2="), bd.tokenizer.encode("reverse abc=")]
    cfg = DecodeConfig(mode="threshold", block_size=8, max_new_tokens=8, threshold=0.5)
    got = bd.generate(prompts, cfg)
    want = generate(bd.model, prompts, cfg, mask_id=bd.info.mask_token_id, eos_ids=bd.tokenizer.eos_ids)
    assert [g.tokens for g in got] == [g.tokens for g in want]
    ar = load_checkpoint(tiny_ar_dir)
    ids = ar.tokenizer.encode("def f(")
    for loaded in (ar, bd):
        g = loaded.generate([ids], ar=True, max_new_tokens=6)[0]
        w = ar_generate(loaded.model, ids, max_new_tokens=6, eos_ids=loaded.tokenizer.eos_ids)
        assert g.tokens == w.tokens and g.forwards == w.forwards


def test_loader_refuses_disagreeing_mask_ids(tiny_bd_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_bd_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    tok_id = cfg["blockdiff"]["mask_token_id"]
    cfg["blockdiff"]["mask_token_id"] = tok_id - 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{folder}: config.json blockdiff.mask_token_id is {tok_id - 1} but the "
                                         rf"tokenizer's mask token '.*' has id {tok_id}"):
        load_checkpoint(folder)
    cfg["blockdiff"]["mask_token_id"] = 10**6
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"blockdiff.mask_token_id = 1000000 is outside the vocabulary"):
        load_checkpoint(folder)


def test_decode_config_block_size_defaults_to_the_checkpoint(tiny_bd_dir):
    bd = load_checkpoint(tiny_bd_dir)
    ids = bd.tokenizer.encode("sort cab=")
    implicit = generate(bd.model, [ids], DecodeConfig(max_new_tokens=8), mask_id=bd.info.mask_token_id,
                        eos_ids=bd.tokenizer.eos_ids)
    explicit = generate(bd.model, [ids], DecodeConfig(max_new_tokens=8, block_size=8), mask_id=bd.info.mask_token_id,
                        eos_ids=bd.tokenizer.eos_ids)
    assert implicit[0].tokens == explicit[0].tokens and implicit[0].forwards == explicit[0].forwards
    assert DecodeConfig().for_model(bd.model).block_size == 8
    with torch.no_grad():
        assert DecodeConfig(block_size=4).for_model(bd.model).block_size == 4
