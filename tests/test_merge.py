"""Top-k checkpoint merge: the average is the exact float64 mean cast back, top-k ranks by validation NLL among
checkpoints evaluated at the final block size only, and every misuse fails with a message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockdiff.data.tokenizer import load_tokenizer
from blockdiff.model.config import DiffusionInfo, ModelConfig
from blockdiff.model.hf_io import load_pretrained
from blockdiff.model.transformer import Transformer
from blockdiff.train.checkpoint import save_checkpoint
from blockdiff.train.merge import average_checkpoints, merge_top_k, select_top_k


def random_model(vocab: int, seed: int, **kw) -> Transformer:
    base = dict(family="llama", vocab_size=vocab, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                num_kv_heads=1, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    model = Transformer(ModelConfig(**(base | kw)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))  # norms too, so a dropped tensor shows
    model.cfg.diffusion = DiffusionInfo(mask_token_id=vocab - 1, block_size=4)
    return model


def save(run_dir: Path, step: int, model: Transformer, tok, *, block_size: int, val_nll: float | None) -> Path:
    state = {"step": step, "phase": f"B{block_size}", "block_size": block_size, "phase_end": False,
             "data": {}, "evals": [], "val_nll": val_nll}
    return save_checkpoint(run_dir, step, model=model, tokenizer=tok, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           generator=torch.Generator(), trainer_state=state, recipe={})


@pytest.fixture(scope="module")
def tok(tiny_bd_dir):
    return load_tokenizer(tiny_bd_dir)


@pytest.fixture(scope="module")
def run(tok, tmp_path_factory):
    """A run folder: (step, block size, val NLL) with the best score at a non-final block size and one
    checkpoint without a score."""
    run_dir = tmp_path_factory.mktemp("merge") / "run"
    table = [(2, 1, 0.5), (4, 4, 2.0), (6, 4, 1.0), (8, 4, None), (10, 4, 1.5)]
    models = {}
    for step, b, v in table:
        models[step] = random_model(tok.vocab_size, seed=step)
        save(run_dir, step, models[step], tok, block_size=b, val_nll=v)
    return run_dir, models


def expected_mean(models: list[Transformer]) -> dict[str, torch.Tensor]:
    return {n: (sum(dict(m.named_parameters())[n].detach().double() for m in models) / len(models)).float()
            for n, _ in models[0].named_parameters()}


def test_average_is_exact_float64_mean(run, tmp_path):
    run_dir, models = run
    paths = [run_dir / f"checkpoints/step_{s:06d}" for s in (4, 6, 10)]
    out = average_checkpoints(paths, tmp_path / "avg")
    merged = load_pretrained(out)
    want = expected_mean([models[4], models[6], models[10]])
    got = dict(merged.named_parameters())
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n
    assert not torch.equal(got["norm.weight"], dict(models[4].named_parameters())["norm.weight"])
    assert merged.cfg.diffusion == models[4].cfg.diffusion
    assert load_tokenizer(out).mask_id == load_tokenizer(paths[0]).mask_id


def test_top_k_uses_final_block_size_and_lowest_nll(run):
    run_dir, _ = run
    chosen, b = select_top_k(run_dir, 2)
    assert b == 4  # the last checkpoint's block size; step 2 (B=1) scores best but is not comparable
    assert [(c.name, v) for c, v in chosen] == [("step_000006", 1.0), ("step_000010", 1.5)]
    chosen, _ = select_top_k(run_dir, 10)  # k beyond the scored checkpoints: all of them, best first
    assert [c.name for c, _ in chosen] == ["step_000006", "step_000010", "step_000004"]
    chosen, b = select_top_k(run_dir, 3, block_size=1)
    assert b == 1 and [c.name for c, _ in chosen] == ["step_000002"]


def test_merge_top_k_averages_the_chosen(run, tmp_path):
    run_dir, models = run
    res = merge_top_k(run_dir, 2, tmp_path / "merged")
    assert res.out == tmp_path / "merged" and res.block_size == 4 and len(res.chosen) == 2
    got = dict(load_pretrained(res.out).named_parameters())
    want = expected_mean([models[6], models[10]])
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_errors(run, tok, tmp_path):
    run_dir, _ = run
    with pytest.raises(ValueError, match="k must be >= 1"):
        select_top_k(run_dir, 0)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        merge_top_k(tmp_path / "empty", 2, tmp_path / "out")
    with pytest.raises(ValueError, match="nothing to average"):
        average_checkpoints([], tmp_path / "out")

    unscored = tmp_path / "unscored"
    save(unscored, 1, random_model(tok.vocab_size, 1), tok, block_size=4, val_nll=None)
    with pytest.raises(ValueError, match="no checkpoint with a validation score at block size 4"):
        merge_top_k(unscored, 1, tmp_path / "out")
    with pytest.raises(ValueError, match="no checkpoint with a validation score at block size 8"):
        select_top_k(run_dir, 1, block_size=8)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [dict(intermediate_size=32), dict(num_layers=3), dict(num_layers=1),
                                    dict(tie_word_embeddings=False)])
def test_architecture_mismatch_is_refused(run, tok, tmp_path, change):
    run_dir, _ = run
    other = save(tmp_path / "other", 6, random_model(tok.vocab_size, 6, **change), tok, block_size=4, val_nll=1.0)
    with pytest.raises(ValueError, match="other/checkpoints/step_000006"):
        average_checkpoints([run_dir / "checkpoints/step_000004", other], tmp_path / "out")
    assert not (tmp_path / "out").exists()
