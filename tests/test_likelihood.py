"""eval/likelihood.py on the bundled models: the exact AR log-likelihood and the block-diffusion ELBO estimate.

Equivalences: the batched AR log-likelihood equals a per-token reference; at block size 1 the shifted ELBO is the
exact AR log-likelihood of the same model (every token an AR step read from the clean stream); the ELBO is the
same whatever the batching, order or company of a request; its standard error falls like 1/sqrt(samples).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockdiff.data.tasks import generate_examples
from blockdiff.eval.likelihood import (ar_loglikelihood, elbo_loglikelihood, loglikelihood, noise_plan,
                                       rolling_windows)
from blockdiff.load import load_checkpoint
from blockdiff.model.masks import dense_mask

pytestmark = pytest.mark.usefixtures("no_grad")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bd():
    return load_checkpoint(REPO / "assets/tiny-bd")


@pytest.fixture(scope="module")
def ar():
    return load_checkpoint(REPO / "assets/tiny-ar")


def requests(tok, n=6):
    out = []
    for ex in generate_examples("heldout", n, seed=123):
        whole, ctx = tok.encode(ex.prompt + ex.answer), tok.encode(ex.prompt)
        out.append((whole[:len(ctx)], whole[len(ctx):]))
    return out


def test_ar_loglikelihood_equals_token_by_token_reference(ar):
    reqs = requests(ar.tokenizer)
    got = ar_loglikelihood(ar.model, reqs, batch_size=4)  # batched, right-padded
    for (ctx, cont), g in zip(reqs, got):  # reference: one request alone, one log-probability per token
        seq = torch.tensor([ctx + cont])
        L = seq.shape[1]
        logp = torch.log_softmax(ar.model(seq, positions=torch.arange(L)[None],
                                          mask=dense_mask("causal", seq_len=L)).float(), -1)[0]
        ref, greedy = 0.0, True
        for j, t in enumerate(cont):
            row = logp[len(ctx) - 1 + j]
            ref += float(row[t])
            greedy &= int(row.argmax()) == t
        assert g.logprob == pytest.approx(ref, abs=1e-4) and g.is_greedy == greedy and g.stderr == 0.0


def test_shifted_elbo_at_block_size_1_is_the_exact_ar_loglikelihood(bd):
    reqs = requests(bd.tokenizer)
    exact = ar_loglikelihood(bd.model, reqs)
    elbo = elbo_loglikelihood(bd.model, reqs, samples=3, block_size=1)
    for e, x in zip(elbo, exact):
        assert e.logprob == pytest.approx(x.logprob, abs=1e-4)
        assert e.stderr == pytest.approx(0.0, abs=1e-6)


def test_elbo_is_deterministic_and_independent_of_batching(bd):
    reqs = requests(bd.tokenizer)
    a = elbo_loglikelihood(bd.model, reqs, samples=8, seed=3, batch_size=48)
    b = elbo_loglikelihood(bd.model, list(reversed(reqs[2:])), samples=8, seed=3, batch_size=5)[::-1]
    for x, y in zip(a[2:], b):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4) and x.stderr == pytest.approx(y.stderr, abs=1e-4)
    c = elbo_loglikelihood(bd.model, reqs, samples=8, seed=4, batch_size=48)
    assert any(abs(x.logprob - z.logprob) > 1e-3 for x, z in zip(a, c))  # another seed, other noise
    assert loglikelihood(bd.model, reqs, samples=8, seed=3, batch_size=48)[0].logprob == a[0].logprob


def test_elbo_standard_error_falls_with_samples(bd):
    reqs = requests(bd.tokenizer, 4)
    few = elbo_loglikelihood(bd.model, reqs, samples=4)
    many = elbo_loglikelihood(bd.model, reqs, samples=64)
    se_few = sum(x.stderr for x in few)
    se_many = sum(x.stderr for x in many)
    assert se_many < 0.6 * se_few  # 1/sqrt(16) = 0.25 in expectation
    assert all(x.logprob <= 0 for x in many)


def test_noise_plan_stratifies_counts_per_block():
    g = torch.Generator().manual_seed(0)
    # causal clean stream, context 5, B 4: blocks start at the context's end: continuation blocks of 4, 4, 2
    masked, weight, off = noise_plan(5, 10, 4, causal_clean=True, shift=False, samples=8, generator=g)
    assert off == 3
    counts = masked[:, :4].sum(-1).tolist()
    assert sorted(counts) == [1, 1, 2, 2, 3, 3, 4, 4]  # 8 samples cover 1..4 twice each
    assert sorted(masked[:, 8:].sum(-1).tolist()) == [1] * 4 + [2] * 4
    k = masked[:, :4].sum(-1, keepdim=True).float()
    assert torch.equal(weight[:, :4], masked[:, :4].float() * 4 / k)  # a masked token weighs n_b / k
    assert (weight[~masked] == 0).all()
    _, w_shift, _ = noise_plan(5, 10, 4, causal_clean=True, shift=True, samples=8, generator=g)
    assert (w_shift[:, [0, 4, 8]] == 1.0).all()  # block-first tokens: exact, weight 1


def test_rolling_windows_cover_every_token_once():
    toks = list(range(10, 33))
    wins = rolling_windows(toks, 0, 8)
    assert [t for _, c in wins for t in c] == toks
    assert all(len(c) + len(x) <= 8 and x for x, c in wins)


def test_bad_requests_are_named(bd, ar):
    with pytest.raises(ValueError, match="request 0: empty context"):
        ar_loglikelihood(ar.model, [([], [5])])
    with pytest.raises(ValueError, match="request 1: empty continuation"):
        elbo_loglikelihood(bd.model, [([5], [6]), ([5], [])])
    with pytest.raises(ValueError, match="needs a block-diffusion checkpoint"):
        elbo_loglikelihood(ar.model, [([5], [6])])


def test_same_label_block_causal_elbo_of_one_token_is_the_masked_conditional(tiny_bd_dir):
    """LLaDA2 layout (same-position labels, block-causal clean stream, blocks from position 0): a one-token
    continuation is always masked (k = 1, weight 1), so its ELBO is exactly log p(x_P | context, slot P masked) under
    the decoding mask: the context's earlier blocks block-causal, its last partial block clean beside the slot."""
    loaded = load_checkpoint(tiny_bd_dir)
    model, info = loaded.model, loaded.info
    assert (info.labels, info.clean_stream, info.block_size) == ("same", "block_causal", 8)
    g = torch.Generator().manual_seed(0)
    reqs = [(torch.randint(0, 300, (P,), generator=g).tolist(), [int(torch.randint(0, 300, (1,), generator=g))])
            for P in (5, 8, 13)]
    got = elbo_loglikelihood(model, reqs, samples=3)
    for (ctx, cont), e in zip(reqs, got):
        x = torch.tensor([ctx + [info.mask_token_id]])
        L = x.shape[1]
        logits = model(x, positions=torch.arange(L)[None], mask=_block_causal(L, 8))
        ref = float(torch.log_softmax(logits[0, -1].float(), -1)[cont[0]])
        assert e.logprob == pytest.approx(ref, abs=1e-4) and e.stderr == pytest.approx(0.0, abs=1e-6)


def _block_causal(L: int, B: int) -> torch.Tensor:
    """Block-causal mask [1, 1, L, L] for any length (masks.dense_mask wants a multiple of B; the decoder's last
    block may be partial)."""
    blk = torch.arange(L) // B
    return (blk[None, :] <= blk[:, None])[None, None]
