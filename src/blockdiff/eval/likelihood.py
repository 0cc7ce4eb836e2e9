"""Log-likelihood of a continuation given a context: exact for AR checkpoints, a Monte Carlo ELBO for
block-diffusion ones (docs/evaluation.md explains the estimator and what we chose for block diffusion).

AR (`ar_loglikelihood`): one causal forward over context + continuation; the sum of the continuation tokens'
next-token log-probabilities, and whether greedy decoding would produce the continuation (every token the argmax).

Block diffusion (`elbo_loglikelihood`): the checkpoint's own training bound, read with its own alignment and block
layout, estimated from `samples` noisings of the continuation (the context is never masked):
- blocks are placed as the decoder places them: from the context's end with a causal clean stream (the whole
  context is prefilled causally), from position 0 with a block-causal one (LLaDA2);
- one forward of [x_t ; x0] gives every continuation block's term conditioned on the clean earlier blocks (BDLM);
- in each block b holding n_b continuation tokens, sample j masks k_j of them, uniformly chosen, with stratified
  counts k_j = ((u_b + j) mod n_b) + 1 (u_b uniform per block): the counts of `samples` draws cover 1..n_b evenly,
  LLaDA's evaluation trick for lowering the variance; a masked token's log-probability is weighted n_b / k_j;
- with shifted labels a block's first token is read from the clean stream (the decoder's AR step): its prediction
  does not depend on the noise, so its exact log-probability is added with weight 1 (the expectation of its
  weighted term, with no variance). At block size 1 the estimate is therefore the exact AR log-likelihood.
- the noise of a request comes from a generator seeded by (seed, context tokens): the estimate of a request does not
  depend on the batch, the order or the other requests, and options sharing a context get the same draws
  (common random numbers: option differences are less noisy than the options themselves).
Returns the mean over samples and its standard error (sample standard deviation / sqrt(samples)).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.config import effective_block_size
from ..model.masks import dense_mask
from ..objectives.diffusion import bdlm_forward, token_ce

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclass
class LogLikelihood:
    logprob: float  # nats: exact (AR) or the ELBO estimate (a lower bound in expectation)
    is_greedy: bool  # AR: greedy decoding would produce the continuation; ELBO: always False (not defined)
    stderr: float = 0.0  # standard error of the estimate (0 for exact)
    samples: int = 0  # Monte Carlo samples (0 for exact)


def _check(requests: Sequence[Request], vocab: int) -> None:
    for i, (ctx, cont) in enumerate(requests):
        if not ctx:
            raise ValueError(f"request {i}: empty context (give at least one token, e.g. BOS or EOS)")
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        bad = [t for t in (*ctx, *cont) if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"request {i}: token id {bad[0]} outside the vocabulary [0, {vocab})")


def _truncate(ctx: Sequence[int], cont: Sequence[int], max_len: int | None) -> list[int]:
    """Context cut from the left so context + continuation fits max_len (at least one context token kept)."""
    ctx = list(ctx)
    if max_len and len(ctx) + len(cont) > max_len:
        if len(cont) >= max_len:
            raise ValueError(f"continuation of {len(cont)} tokens does not fit the model's {max_len} positions")
        ctx = ctx[len(ctx) + len(cont) - max_len:]
    return ctx


@torch.no_grad()
def ar_loglikelihood(model, requests: Sequence[Request], *, batch_size: int = 16) -> list[LogLikelihood]:
    """Exact log p(continuation | context) under next-token prediction, batched (right padding: a causal mask
    never lets a real token see the padding after it)."""
    _check(requests, model.cfg.vocab_size)
    device = next(model.parameters()).device
    max_len = getattr(model.cfg, "max_position_embeddings", None)
    out: list[LogLikelihood | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        seqs = [(_truncate(requests[i][0], requests[i][1], max_len), list(requests[i][1])) for i in idx]
        L = max(len(c) + len(t) for c, t in seqs)
        x = torch.zeros(len(idx), L, dtype=torch.long, device=device)
        for r, (c, t) in enumerate(seqs):
            x[r, :len(c) + len(t)] = torch.tensor(c + t, device=device)
        logits = model(x, positions=torch.arange(L, device=device)[None].expand(len(idx), L),
                       mask=dense_mask("causal", seq_len=L, device=device))
        logp = F.log_softmax(logits.float(), -1)
        for r, (c, t) in enumerate(seqs):
            lp = logp[r, len(c) - 1:len(c) + len(t) - 1]  # [n, V]: position i predicts token i + 1
            tgt = torch.tensor(t, device=device)
            out[idx[r]] = LogLikelihood(float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
    return out  # type: ignore[return-value]


def _request_generator(seed: int, ctx: Sequence[int]) -> torch.Generator:
    h = hashlib.sha256(f"blockdiff-elbo:{seed}:".encode() + ",".join(map(str, ctx)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "big") & ((1 << 63) - 1))


def noise_plan(n_ctx: int, n_cont: int, block_size: int, *, causal_clean: bool, shift: bool, samples: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(masked [samples, n_cont] bool, weight [samples, n_cont] float, block offset) for one request: which
    continuation tokens each sample masks and the weight of each token's log-probability (see the module
    docstring). Blocks of the sequence are `(position + offset) // block_size`."""
    B = block_size
    off = (-n_ctx) % B if causal_clean else 0
    pos = torch.arange(n_ctx, n_ctx + n_cont) + off  # block positions of the continuation
    block = pos // B
    masked = torch.zeros(samples, n_cont, dtype=torch.bool)
    weight = torch.zeros(samples, n_cont)
    for b in block.unique().tolist():
        slots = (block == b).nonzero().flatten()
        n_b = len(slots)
        u = int(torch.randint(0, n_b, (1,), generator=generator))
        k = (u + torch.arange(samples)) % n_b + 1  # [samples] stratified mask counts in 1..n_b
        rank = torch.rand(samples, n_b, generator=generator).argsort(-1).argsort(-1)  # a random order per sample
        m = rank < k[:, None]
        masked[:, slots] = m
        weight[:, slots] = m.float() * (n_b / k.float())[:, None]
    if shift:
        first = (pos % B == 0)  # read from the clean stream: exact, weight 1 whatever the mask
        weight[:, first] = 1.0
    return masked, weight, off


@torch.no_grad()
def elbo_loglikelihood(model, requests: Sequence[Request], *, samples: int = 32, seed: int = 0,
                       batch_size: int = 32, block_size: int | None = None) -> list[LogLikelihood]:
    """Monte Carlo ELBO of log p(continuation | context) for a block-diffusion checkpoint (module docstring).
    `samples` noisings per request, `batch_size` rows (request x sample) per forward; deterministic in `seed`."""
    info = model.cfg.diffusion
    if info is None:
        raise ValueError("elbo_loglikelihood needs a block-diffusion checkpoint (config.json has no blockdiff section)")
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples}, {batch_size}")
    _check(requests, model.cfg.vocab_size)
    B = block_size or effective_block_size(info=info)
    device = next(model.parameters()).device
    max_len = getattr(model.cfg, "max_position_embeddings", None)
    mask_id = info.mask_token_id
    rows = []  # (request, x0, x_t, weight, offset)
    for i, (ctx, cont) in enumerate(requests):
        ctx = _truncate(ctx, cont, max_len)
        masked, weight, off = noise_plan(len(ctx), len(cont), B, causal_clean=info.causal_clean, shift=info.shift,
                                         samples=samples, generator=_request_generator(seed, ctx))
        x0 = torch.tensor([*ctx, *cont])
        for j in range(samples):
            x_t = x0.clone()
            x_t[len(ctx):][masked[j]] = mask_id
            w = torch.zeros(len(x0))
            w[len(ctx):] = weight[j]
            rows.append((i, x0, x_t, w, off))
    est = torch.zeros(len(requests), samples, dtype=torch.float64)
    seen = [0] * len(requests)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
    for s in range(0, len(order), batch_size):
        chunk = [rows[r] for r in order[s:s + batch_size]]
        n = max(len(r[1]) for r in chunk)
        L = B * max(2, math.ceil(n / B))  # a whole number of blocks, and more than one: the [x_t ; x0] layout
        x0 = torch.zeros(len(chunk), L, dtype=torch.long)
        x_t = torch.zeros(len(chunk), L, dtype=torch.long)
        w = torch.zeros(len(chunk), L)
        doc = torch.ones(len(chunk), L, dtype=torch.long)  # the padding is a document of its own
        pos = torch.zeros(len(chunk), L, dtype=torch.long)
        bpos = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, (_, a, b, ww, off) in enumerate(chunk):
            m = len(a)
            x0[r, :m], x_t[r, :m], w[r, :m], doc[r, :m] = a, b, ww, 0
            pos[r, :m] = torch.arange(m)
            pos[r, m:] = torch.arange(L - m)
            bpos[r, :m] = torch.arange(m) + off
            bpos[r, m:] = torch.arange(L - m)
        fw = bdlm_forward(model, x_t.to(device), x0.to(device), block_size=B, doc_ids=doc.to(device),
                          positions=pos.to(device), shift=info.shift, clean_causal=info.causal_clean,
                          block_positions=bpos.to(device))
        logp = -token_ce(fw.logits, x0.to(device)).double().cpu()  # [b, L]
        vals = (logp * w.double()).sum(-1)
        for r, (i, *_) in enumerate(chunk):
            est[i, seen[i]] = vals[r]
            seen[i] += 1
    out = []
    for i in range(len(requests)):
        e = est[i]
        se = float(e.std(unbiased=True) / math.sqrt(samples)) if samples > 1 else float("nan")
        out.append(LogLikelihood(float(e.mean()), False, se, samples))
    return out


def loglikelihood(model, requests: Sequence[Request], *, samples: int = 32, seed: int = 0,
                  batch_size: int = 32) -> list[LogLikelihood]:
    """Exact for AR checkpoints, the ELBO estimate for block-diffusion ones."""
    if model.cfg.diffusion is None:
        return ar_loglikelihood(model, requests, batch_size=batch_size)
    return elbo_loglikelihood(model, requests, samples=samples, seed=seed, batch_size=batch_size)


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[Request]:
    """Disjoint windows covering every token of `tokens` for a rolling (perplexity) log-likelihood: each window
    predicts up to max_len - 1 tokens from the tokens before it (the first from `prefix`, e.g. EOS)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    seq = [prefix, *tokens]
    out = []
    step = max_len - 1
    for start in range(1, len(seq), step):
        end = min(start + step, len(seq))
        out.append((seq[max(0, end - max_len):start], seq[start:end]))
    return out
