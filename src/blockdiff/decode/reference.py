"""Reference block decoder: a deliberately plain, no-cache implementation of the official algorithms
(docs/design.md 6.1-6.3), kept for the equivalence tests and as the benchmark baseline.

Like the official HF `generate()` of LLaDA2.0/2.1, every step recomputes the whole canvas prefix up to the end of
the current block with the block-causal mask and reads the current block's logits; there is no KV cache and, by
default, no early exit (the whole block is decoded). `early_exit=True` stops a threshold-rule block as soon as
every slot before the first EOS (within the budget) is committed, the engine's rule, so the tests can also compare
steps and forwards one for one. Decisions are made per position in Python, independently of the vectorised rules
in `rules.py`.
One prompt at a time (rows of a batch are decoded one after the other).

  LLaDA2.0 threshold: while the block holds [MASK]: commit masked positions with confidence > tau; if fewer than
    quota pass, the quota most confident instead (the official schedule: floor(B / s) per step, one more on the
    first B % s steps, s = min(steps, max_new_tokens); DecodeConfig.quota_at).
  LLaDA2.1 joint threshold: each step, M2T as above with tau_mask (fallback 1) and T2T on generated, unmasked
    positions whose argmax differs with p > tau_edit; once the block is full, at most max_post_steps edit-only
    passes; the block ends at a step that writes nothing or when that budget is spent.
Label alignment (the checkpoint's, docs/alignment.md): "same" reads slot j from logit lo + j, "shift" from logit
lo + j - 1 (slot 0 from the last position of the finished prefix). With a "causal" clean stream the finished
prefix is encoded token-causally (the current block still sees itself bidirectionally) and blocks start right
after the prompt.
Temperature 0 only (argmax); the mask token is never chosen.
"""

from __future__ import annotations

import math
import time

import torch

from ..model.masks import dense_mask
from .engine import DecodeConfig, Generation, alignment


def _pick(conf: list[float], cand: list[int], tau: float, quota: int) -> list[int]:
    passing = [i for i in cand if conf[i] > tau]
    if len(passing) >= quota:
        return passing
    return sorted(cand, key=lambda i: (-conf[i], i))[:quota]


def _output_final(canvas: list[int], lo: int, end: int, mask_id: int, eos: set[int]) -> bool:
    """Every slot of canvas[lo:end] before the first EOS is committed: the visible output can no longer change."""
    for t in canvas[lo:end]:
        if t == mask_id:
            return False
        if t in eos:
            return True
    return True


def _fill_after_eos(canvas: list[int], lo: int, hi: int, P: int, mask_id: int, eos: set[int], on: bool) -> None:
    """eos_fill: the [MASK] slots after the block's first generated EOS become that EOS."""
    if not on:
        return
    first = next((i for i in range(max(lo, P), hi) if canvas[i] in eos), None)
    if first is not None:
        for i in range(first + 1, hi):
            if canvas[i] == mask_id:
                canvas[i] = canvas[first]


@torch.no_grad()
def reference_generate(model, prompt: list[int], cfg: DecodeConfig, *, mask_id: int, eos_ids,
                       early_exit: bool = False) -> Generation:
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if cfg.rule not in ("threshold", "joint"):
        raise ValueError(f"the reference decoder implements the threshold and joint (S/Q) rules, not {cfg.mode!r}")
    if early_exit and cfg.rule != "threshold":
        raise ValueError("early_exit applies to the threshold rule only (joint rules may still edit a final output)")
    if cfg.temperature != 0:
        raise ValueError("the reference decoder is temperature 0 (argmax) only")
    device = next(model.parameters()).device
    eos = set() if cfg.ignore_eos else set(eos_ids)
    cfg = cfg.for_model(model)
    B, P, budget = cfg.block_size, len(prompt), cfg.max_new_tokens
    shift, causal_clean = alignment(model)
    base = P % B if causal_clean else 0  # causal clean stream: the first block starts right after the prompt
    n_blocks = math.ceil((P + budget - base) / B)
    canvas = list(prompt) + [mask_id] * (base + n_blocks * B - P)
    forwards, steps_per_block, n_edits = 0, [], 0
    t0 = time.perf_counter()
    for b in range(P // B, n_blocks):
        lo, hi = base + b * B, base + (b + 1) * B
        if causal_clean:  # finished prefix token-causal, the current block bidirectional
            k = torch.arange(hi, device=device)
            inside = (k >= lo)[:, None] & (k >= lo)[None, :]
            mask = (dense_mask("causal", seq_len=hi, device=device)[0, 0] | inside)[None, None]
        else:
            mask = dense_mask("block_causal", seq_len=hi, block_size=B, device=device)
        steps = post = 0
        while True:
            cand = [i for i in range(B) if canvas[lo + i] == mask_id]
            if cfg.rule == "threshold" and not cand:
                break
            if early_exit and _output_final(canvas, max(lo, P), min(hi, P + budget), mask_id, eos):
                break
            ids = torch.tensor([canvas[:hi]], device=device)
            full = model(ids, positions=torch.arange(hi, device=device)[None], mask=mask)[0]
            if shift:  # slot j from logit j - 1 (slot 0 of the first block is a prompt token: never read)
                first = full[lo - 1:lo] if lo > 0 else torch.zeros_like(full[:1])
                logits = torch.cat([first, full[lo:hi - 1]])
            else:
                logits = full[lo:hi].clone()
            forwards += 1
            steps += 1
            logits[:, mask_id] = float("-inf")
            for i in range(1, B):  # anti-stutter penalty on the left neighbour's token (0 = off)
                logits[i, canvas[lo + i - 1]] -= cfg.repeat_penalty
            conf_t, tok_t = torch.softmax(logits.float(), -1).max(-1)
            conf, tok = conf_t.tolist(), tok_t.tolist()
            if cfg.rule == "threshold":
                for i in _pick(conf, cand, cfg.tau_mask, cfg.quota_at(steps - 1)):
                    canvas[lo + i] = tok[i]
                _fill_after_eos(canvas, lo, hi, P, mask_id, eos, cfg.eos_fill)
                continue
            if not cand:
                post += 1
                if post > cfg.max_post_steps:
                    break
            m2t = _pick(conf, cand, cfg.tau_mask, cfg.quota_at(steps - 1)) if cand else []
            t2t = [i for i in range(B) if lo + i >= P and canvas[lo + i] != mask_id and tok[i] != canvas[lo + i]
                   and conf[i] > cfg.tau_edit]
            if not m2t and not t2t:
                break
            for i in m2t + t2t:
                canvas[lo + i] = tok[i]
            _fill_after_eos(canvas, lo, hi, P, mask_id, eos, cfg.eos_fill)
            n_edits += len(t2t)
        steps_per_block.append(steps)
        if any(t in eos for t in canvas[P:hi]) or hi - P >= budget:
            break
    gen = canvas[P:P + budget]
    seconds = time.perf_counter() - t0
    for i, t in enumerate(gen):
        if t in eos:
            return Generation(gen[:i], i + 1, forwards, seconds, True, steps_per_block, "eos", n_edits)
    return Generation(gen, len(gen), forwards, seconds, False, steps_per_block, "length", n_edits)
