"""Decoding: block decoding with an exact KV cache for block-diffusion models (LLaDA2.0 threshold rule with
fallback, SYSTEM.md 6.1-6.2), and greedy AR decoding of the parent model through the same cache.

Block decoding, per prompt:
  canvas = prompt + max_new_tokens slots, rounded up to a multiple of B; blocks start at position 0.
  prefill: every complete block before the one holding the prompt's end, block-causal mask, written to cache.
  for each block from there: the block's prompt tokens are fixed, the rest start as [MASK]; each step forwards
  only the block's B tokens against the cache (bidirectional inside the block), picks a token and confidence
  per masked slot and commits per the rule; when no mask is left, one more forward writes the block's clean
  K/V and the cache commits it. Stop after the block that holds EOS or once max_new_tokens are generated.
  Early exit inside the last block: once every slot before the first committed EOS (or before the token
  budget) is committed, the remaining masked slots are never decoded -- the output is already final.
Counting (SYSTEM.md 6.5): forwards exclude the prefill and include the cache-writing forward of each
finished block (except the last); generated tokens count up to and including EOS.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..model.masks import dense_mask
from .cache import KVCache
from .rules import choose_tokens, threshold_rule


@dataclass
class BlockDecodeConfig:
    block_size: int = 32  # B, tokens per block
    steps: int = 32  # denoising steps budgeted per block (quota = ceil(B / steps) commits per step at least)
    threshold: float = 0.95  # confidence above which a masked slot is committed
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = argmax

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.steps < 1 or self.max_new_tokens < 1:
            raise ValueError("block_size, steps and max_new_tokens must be >= 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @property
    def quota(self) -> int:
        return math.ceil(self.block_size / self.steps)


@dataclass
class Generation:
    tokens: list[int]  # generated ids, trimmed after the first EOS (EOS excluded)
    n_generated: int  # tokens counted for TPF/TPS: up to and including EOS
    forwards: int  # model forwards after prefill
    seconds: float
    finished: bool  # hit EOS
    steps_per_block: list[int] = field(default_factory=list)

    @property
    def tpf(self) -> float:
        return self.n_generated / max(self.forwards, 1)


def _output_final(row, mask_id: int, eos: set[int], *, lo: int, end: int) -> bool:
    """True when the visible output in row[lo:end] can no longer change: every slot before the first committed
    EOS (or before `end`, the token budget) is committed. Slots after that EOS, or past the budget, would be
    trimmed anyway, so denoising them is wasted forwards (committed tokens never change under this rule)."""
    region = row[lo:end].tolist()
    for t in region:
        if t == mask_id:
            return False
        if t in eos:
            return True
    return True


def _trim(gen: list[int], eos_ids: set[int], limit: int) -> tuple[list[int], int, bool]:
    gen = gen[:limit]
    for i, t in enumerate(gen):
        if t in eos_ids:
            return gen[:i], i + 1, True
    return gen, len(gen), False


@torch.no_grad()
def block_generate(model, prompt: list[int], cfg: BlockDecodeConfig, *, mask_id: int, eos_ids, generator=None) -> Generation:
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    eos = set(eos_ids)
    device = next(model.parameters()).device
    B, P = cfg.block_size, len(prompt)
    n_blocks = math.ceil((P + cfg.max_new_tokens) / B)
    canvas = torch.full((1, n_blocks * B), mask_id, dtype=torch.long, device=device)
    canvas[0, :P] = torch.tensor(prompt, device=device)
    cache = KVCache(model.cfg, 1, n_blocks * B, device=device, dtype=next(model.parameters()).dtype)
    t0 = time.perf_counter()
    first = P // B
    if first > 0:  # prefill complete prompt blocks
        n = first * B
        mask = dense_mask("block_causal", seq_len=n, block_size=B, device=device)
        model(canvas[:, :n], positions=torch.arange(n, device=device)[None], mask=mask, cache=cache)
        cache.commit(n)
    forwards, steps_per_block = 0, []
    for b in range(first, n_blocks):
        lo, hi = b * B, (b + 1) * B
        pos = torch.arange(lo, hi, device=device)[None]
        steps = 0
        while not _output_final(canvas[0], mask_id, eos, lo=max(lo, P), end=min(hi, P + cfg.max_new_tokens)):
            masked = canvas[:, lo:hi] == mask_id
            logits = model(canvas[:, lo:hi], positions=pos, mask=None, cache=cache)  # [1, B, V]
            forwards += 1
            steps += 1
            logits[..., mask_id] = float("-inf")  # never commit the mask token itself
            tok, conf = choose_tokens(logits, cfg.temperature, generator)
            commit = threshold_rule(conf, masked, cfg.threshold, cfg.quota)
            canvas[:, lo:hi] = torch.where(commit, tok, canvas[:, lo:hi])
        steps_per_block.append(steps)
        generated = canvas[0, P:hi].tolist()
        done = any(t in eos for t in generated) or hi - P >= cfg.max_new_tokens or b == n_blocks - 1
        if done:
            break
        model(canvas[:, lo:hi], positions=pos, mask=None, cache=cache)  # write the final block's clean K/V
        forwards += 1
        cache.commit(B)
    seconds = time.perf_counter() - t0
    tokens, n_gen, finished = _trim(canvas[0, P:].tolist(), eos, cfg.max_new_tokens)
    return Generation(tokens, n_gen, forwards, seconds, finished, steps_per_block)


@torch.no_grad()
def ar_generate(model, prompt: list[int], *, max_new_tokens: int, eos_ids, temperature: float = 0.0, generator=None) -> Generation:
    """Greedy (temperature 0) next-token decoding with a KV cache: the AR parent's baseline."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    eos = set(eos_ids)
    device = next(model.parameters()).device
    P = len(prompt)
    cache = KVCache(model.cfg, 1, P + max_new_tokens, device=device, dtype=next(model.parameters()).dtype)
    t0 = time.perf_counter()
    ids = torch.tensor([prompt], device=device)
    logits = model(ids, positions=torch.arange(P, device=device)[None],
                   mask=dense_mask("causal", seq_len=P, device=device), cache=cache)
    cache.commit(P)
    out: list[int] = []
    forwards = 0
    while True:
        tok, _ = choose_tokens(logits[:, -1:], temperature, generator)
        t = int(tok)
        out.append(t)
        if t in eos or len(out) >= max_new_tokens:
            break
        logits = model(tok.view(1, 1), positions=torch.tensor([[P + len(out) - 1]], device=device), mask=None, cache=cache)
        cache.commit(1)
        forwards += 1
    seconds = time.perf_counter() - t0
    tokens, n_gen, finished = _trim(out, eos, max_new_tokens)
    # The first token comes from the prefill forward; count it so TPF of AR is exactly 1.
    return Generation(tokens, n_gen, forwards + 1, seconds, finished)
