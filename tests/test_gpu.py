"""CUDA-only checks (skipped without a GPU): FlexAttention training on the x_t+x0 layout equals the dense SDPA
path, forward and backward, and the block decoder runs on the device."""

from __future__ import annotations

import pytest
import torch

from blockdiff.model.hf_io import load_pretrained
from blockdiff.objectives.diffusion import DiffusionLossConfig, diffusion_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_flex_training_matches_dense(tiny_bd_dir, monkeypatch):
    import blockdiff.objectives.diffusion as diff

    model = load_pretrained(tiny_bd_dir, device="cuda")
    mask_id = model.cfg.diffusion.mask_token_id
    x0 = torch.randint(0, mask_id, (2, 128), device="cuda")
    doc = torch.zeros_like(x0)
    doc[:, 70:] = 1
    batch = {"input_ids": x0, "doc_ids": doc}
    cfg = DiffusionLossConfig(mask_token_id=mask_id, block_size=8)
    loss_flex, _ = diffusion_loss(model, batch, cfg, generator=torch.Generator().manual_seed(0))
    loss_flex.backward()
    g_flex = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    dense = diff.dense_mask
    monkeypatch.setattr(diff, "build_mask", lambda mode, **kw: dense(mode, **kw))
    loss_dense, _ = diffusion_loss(model, batch, cfg, generator=torch.Generator().manual_seed(0))
    loss_dense.backward()
    assert torch.allclose(loss_flex, loss_dense, atol=1e-4)
    for n, p in model.named_parameters():
        assert torch.allclose(g_flex[n], p.grad, atol=1e-4, rtol=1e-3), n


def test_block_decoding_on_cuda(tiny_bd_dir):
    from blockdiff.data.tokenizer import load_tokenizer
    from blockdiff.decode.engine import BlockDecodeConfig, block_generate

    tok = load_tokenizer(tiny_bd_dir)
    cpu = load_pretrained(tiny_bd_dir).eval()
    gpu = load_pretrained(tiny_bd_dir, device="cuda").eval()
    cfg = BlockDecodeConfig(block_size=8, max_new_tokens=16, threshold=0.9)
    info = cpu.cfg.diffusion
    ids = tok.encode("add 1+2=")
    a = block_generate(cpu, ids, cfg, mask_id=info.mask_token_id, eos_ids=tok.eos_ids)
    b = block_generate(gpu, ids, cfg, mask_id=info.mask_token_id, eos_ids=tok.eos_ids)
    assert b.n_generated >= 1 and len(a.tokens) <= 16 and len(b.tokens) <= 16
