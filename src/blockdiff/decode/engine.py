"""The decoding engine: token ids in, token ids out. Batched block decoding with an exact KV cache for
block-diffusion models (docs/design.md 6.1-6.4), and greedy AR decoding of the parent model through the same cache.
Used by the CLI, the benchmark, the evaluation and RL rollouts.

Block decoding, per row r (prompts of different lengths share a batch; each row keeps its own blocks):
  canvas_r = prompt_r + max_new_tokens slots, rounded up to whole blocks; blocks start at position 0 (with a causal
  clean stream: the first block starts right after the prompt, see "Label alignment" below).
  prefill: every complete block before the one holding the prompt's end, block-causal mask, into the cache.
  then, block by block: the block's prompt tokens are fixed, the rest start as [MASK]; each step forwards only
  the block's B tokens against the row's cached prefix (bidirectional inside the block), picks a token and a
  confidence per position and applies the decoding rule:
    - threshold family (LLaDA2.0 threshold, dInfer, Fast-dLLM factor, dInfer credit): unmask only; when no mask
      is left, one more forward writes the block's clean K/V, which the cache then commits;
    - joint (LLaDA2.1 M2T + T2T, S/Q modes): unmask and edit in the same step; once the block has no mask, up
      to `max_post_steps` edit-only passes; the block is final at the first step that writes nothing (that
      step's forward saw exactly the final tokens, so its K/V are already clean: no extra forward) or when the
      edit budget is spent.
  A row stops after the block holding EOS (unless `ignore_eos`), at `max_new_tokens`, or when a stop string
  appears in its final text; a finished row leaves the batch (its cache rows are compacted away).
  Early exit in unmask-only rules: once every slot before the first committed EOS (or the budget) is committed
  the output is final (committed tokens never change), so the rest of the block is never decoded.
Every step is one forward of all active rows: rows writing clean K/V and rows denoising share it.
Label alignment (the checkpoint's `blockdiff.labels`, docs/alignment.md): with "same" slot j of the block is read
from logit j of the forward (LLaDA2); with "shift" from logit j-1, and slot 0 from the last logit of the forward
that encoded the finished previous block (the prefill or its cache-writing forward): an ordinary AR step. With
`clean_stream = "causal"` the prefill and every cache-writing forward are token-causal (the AR parent's K/V), so
joint (S/Q) blocks also end with one cache-writing forward.
Counting (docs/decoding.md): a row's forwards exclude the prefill and include its cache-writing forwards; generated
tokens count up to and including EOS.

Streaming: `stream(...)` yields a `StepUpdate` per row per step (tokens written, M2T or T2T, with confidence);
`generate(..., on_step=f)` calls f with each update. `decode/trace.py` writes them as JSONL.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..fields import runtime
from ..model.config import effective_block_size
from ..model.masks import dense_mask
from .cache import KVCache
from .rules import (
    choose_tokens,
    repeat_penalty_,
    credit_adjust,
    credit_update,
    dinfer_threshold_rule,
    factor_rule,
    joint_rule,
    threshold_rule,
)

# mode -> (rule, default M2T threshold, default T2T threshold)
MODES: dict[str, tuple[str, float, float | None]] = {
    "threshold": ("threshold", 0.95, None),  # LLaDA2.0 [code]
    "S": ("joint", 0.5, 0.0),  # LLaDA2.1 speed mode [paper + code]
    "Q": ("joint", 0.7, 0.5),  # LLaDA2.1 quality mode [paper + code]
    "joint": ("joint", 0.7, 0.5),  # LLaDA2.1 with user thresholds (Q defaults)
    "dinfer": ("dinfer", 0.9, None),  # dInfer threshold
    "factor": ("factor", 0.0, None),  # Fast-dLLM factor rule (uses `factor`)
    "credit": ("credit", 0.9, None),  # dInfer credit decoding + dInfer threshold
}


@dataclass
class DecodeConfig:
    """One decoding setting; also the recipe sections [rollout.decode] (RL rollouts). Thresholds are probabilities."""

    mode: str = "threshold"  # one of MODES
    block_size: int | None = runtime()  # B, tokens per block; None = the checkpoint's (model.config.effective_block_size)
    steps: int = 32  # denoising steps per block, capped at max_new_tokens; fallback quota per step: see quota_at
    threshold: float | None = None  # M2T confidence threshold in [0, 1]; None = the mode's default
    edit_threshold: float | None = None  # T2T threshold in [0, 1] (joint modes); None = the mode's default
    max_post_steps: int = 16  # edit-only passes after a block fills (joint modes)
    factor: float = 1.0  # Fast-dLLM factor f (mode "factor")
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = argmax
    top_k: int = 0  # sample among the k most likely tokens (0 = all); temperature > 0 only
    top_p: float = 1.0  # nucleus mass (1 = all); temperature > 0 only
    ignore_eos: bool = False  # keep decoding past EOS until max_new_tokens (benchmarks)
    repeat_penalty: float = 0.0  # logit penalty for repeating the left neighbour inside a block (anti-stutter)
    eos_fill: bool = False  # once a generated slot of the block holds EOS, fill the masked slots after it with EOS
    #                         in the same step (the output ends at the first EOS; off = the official algorithms)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"decoding mode {self.mode!r} is not known; allowed: {', '.join(MODES)}")
        for name in ("block_size", "steps", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("threshold", "edit_threshold"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.max_post_steps < 0:
            raise ValueError(f"max_post_steps must be >= 0, got {self.max_post_steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, top_p={self.top_p}")
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.repeat_penalty < 0:
            raise ValueError(f"repeat_penalty must be >= 0, got {self.repeat_penalty}")

    def for_model(self, model) -> "DecodeConfig":
        """This setting with its block size resolved against the checkpoint (the one rule: effective_block_size)."""
        if self.block_size is not None:
            return self
        return dataclasses.replace(self, block_size=effective_block_size(info=model.cfg.diffusion))

    @property
    def rule(self) -> str:
        return MODES[self.mode][0]

    @property
    def tau_mask(self) -> float:
        return MODES[self.mode][1] if self.threshold is None else self.threshold

    @property
    def tau_edit(self) -> float | None:
        if self.rule != "joint":
            return None
        return MODES[self.mode][2] if self.edit_threshold is None else self.edit_threshold

    @property
    def edits(self) -> bool:
        return self.rule == "joint"

    @property
    def effective_steps(self) -> int:
        """Denoising steps per block as the official LLaDA2 `generate()` uses them: min(steps, max_new_tokens //
        minimal_topk) with minimal_topk = 1."""
        return min(self.steps, self.max_new_tokens)

    def quota_at(self, step: int) -> int:
        """Fallback commits at denoising step `step` (0-based) of a block, the official `_get_num_transfer_tokens`
        schedule: floor(B / s) per step plus one more on the first B % s steps (B 16, s 5: 4, 3, 3, 3, 3), s the
        effective steps. Those s steps fill any block; a later step (never reached by unmask-only rules) gets
        max(1, floor(B / s)) so progress is guaranteed whatever the rule."""
        s = self.effective_steps
        base, rem = divmod(self.block_size, s)
        if step < s:
            return base + (1 if step < rem else 0)
        return max(1, base)


BlockDecodeConfig = DecodeConfig  # the foundation's name, kept for callers of block_generate


@dataclass
class Generation:
    tokens: list[int]  # generated ids, trimmed after the first EOS (EOS excluded) or after a stop string
    n_generated: int  # tokens counted for TPF/TPS: up to and including EOS
    forwards: int  # model forwards this row took part in, after prefill
    seconds: float  # wall time from the start of the batch until this row finished
    finished: bool  # hit EOS
    steps_per_block: list[int] = field(default_factory=list)
    stop_reason: str = "length"  # "eos", "stop" (a stop string) or "length"
    edits: int = 0  # T2T rewrites applied

    @property
    def tpf(self) -> float:
        return self.n_generated / max(self.forwards, 1)


@dataclass
class TokenEvent:
    pos: int  # absolute position in the row's canvas
    token: int
    kind: str  # "m2t" (unmasked) or "t2t" (edited)
    conf: float  # probability of `token` when it was written
    prev: int | None = None  # token replaced by a T2T edit


@dataclass
class StepUpdate:
    row: int  # index of the prompt in the call
    step: int  # this row's forward count so far
    block: int  # block index (position // B) the step worked on
    events: list[TokenEvent]
    tokens: list[int]  # generated slots so far up to the end of the current block ([MASK] id where masked)
    n_final: int  # leading entries of `tokens` that can no longer change
    done: bool = False


def _check_prompts(prompts: list[list[int]], vocab_size: int | None = None, mask_id: int | None = None) -> None:
    """Clear errors for what would otherwise fail deep inside torch (an embedding index error) or silently decode
    a prompt slot (a [MASK] id inside the prompt would be treated as a slot to fill)."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: a prompt must hold at least one token")
        if vocab_size is not None:
            bad = [(k, t) for k, t in enumerate(p) if not 0 <= int(t) < vocab_size]
            if bad:
                k, t = bad[0]
                raise ValueError(f"prompt {i}: token id {t} at position {k} is outside the vocabulary [0, {vocab_size})")
        if mask_id is not None and mask_id in p:
            raise ValueError(f"prompt {i}: holds the [MASK] id {mask_id} at position {list(p).index(mask_id)}; "
                             "prompts must be clean text")


def _first_stop(tokens: list[int], eos: set[int]) -> int | None:
    for i, t in enumerate(tokens):
        if t in eos:
            return i
    return None


def _output_final(row: list[int], mask_id: int, eos: set[int]) -> bool:
    """True when no slot before the first EOS in `row` (the visible output region) is masked."""
    for t in row:
        if t == mask_id:
            return False
        if t in eos:
            return True
    return True


def fill_after_eos(block: torch.Tensor, generated: torch.Tensor, mask_id: int, eos: set[int]) -> torch.Tensor:
    """`DecodeConfig.eos_fill`: in each row of `block` [a, B], the [MASK] slots after the first generated EOS become
    that EOS id (nothing after it reaches the output). Rows without a generated EOS are unchanged."""
    is_eos = torch.zeros_like(block, dtype=torch.bool)
    for e in eos:
        is_eos |= block == e
    is_eos &= generated
    seen = is_eos.long().cumsum(-1)
    after = (seen - is_eos.long()) > 0  # strictly after the first EOS
    first_id = block.gather(-1, is_eos.long().argmax(-1, keepdim=True))  # the first EOS's own id
    return torch.where(after & (block == mask_id), first_id.expand_as(block), block)


def find_stop(text: str, stops) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _trim_stop(tokens: list[int], stops, decode) -> list[int] | None:
    """Shortest token prefix whose text contains a stop string (None if no stop string occurs)."""
    if find_stop(decode(tokens), stops) is None:
        return None
    lo, hi = 1, len(tokens)
    while lo < hi:  # text of a prefix grows with the prefix, so containment is monotone
        mid = (lo + hi) // 2
        if find_stop(decode(tokens[:mid]), stops) is None:
            lo = mid + 1
        else:
            hi = mid
    return tokens[:lo]


def alignment(model) -> tuple[bool, bool]:
    """(shift, causal clean stream) of a block-diffusion model, read from its config (LLaDA2's when absent)."""
    info = getattr(model.cfg, "diffusion", None)
    if info is None:
        return False, False
    return info.shift, info.causal_clean


@torch.no_grad()
def stream(model, prompts: list[list[int]], cfg: DecodeConfig, *, mask_id: int, eos_ids, generator=None,
           stop: list[str] | tuple[str, ...] = (), decode: Callable[[list[int]], str] | None = None,
           events: bool = True) -> Iterator[StepUpdate | list[Generation]]:
    """Decode `prompts` as one batch; yields a StepUpdate per row per step and, last, the list of Generation
    (one per prompt, in order). `stop` strings need `decode` (token ids -> text)."""
    _check_prompts(prompts, model.cfg.vocab_size, mask_id)
    cfg = cfg.for_model(model)
    if stop and decode is None:
        raise ValueError("stop strings need a decode function (token ids -> text)")
    eos = set() if cfg.ignore_eos else set(eos_ids)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    N, B, budget = len(prompts), cfg.block_size, cfg.max_new_tokens
    P = [len(p) for p in prompts]
    shift, causal_clean = alignment(model)
    # Block layout: blocks start at position 0 (LLaDA2), except with a causal clean stream, where any prefix can be
    # encoded exactly as the parent does: the whole prompt is prefilled and the first block starts right after it.
    base = [p % B if causal_clean else 0 for p in P]  # row r's blocks are [base_r + kB, base_r + (k+1)B)
    n_blocks = [math.ceil((p + budget - o) / B) for p, o in zip(P, base)]
    L = max(o + n * B for o, n in zip(base, n_blocks))
    max_pos = getattr(model.cfg, "max_position_embeddings", None)
    if max_pos and L > max_pos:
        warnings.warn(f"decoding canvas of {L} positions (longest prompt {max(P)} + {budget} new tokens, rounded up "
                      f"to B={B}) exceeds the model's max_position_embeddings {max_pos}; quality may degrade",
                      stacklevel=2)
    canvas = torch.full((N, L), mask_id, dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        canvas[r, :len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    P_t = torch.tensor(P, device=device)
    cache = KVCache(model.cfg, N, L, device=device, dtype=dtype)
    # shift: per row, the logit that predicts its current block's first slot (last position of the clean prefix)
    carry = torch.zeros(N, model.cfg.vocab_size, device=device) if shift else None
    t0 = time.perf_counter()

    # prefill the complete prompt blocks of every row (right-padded to the longest; padding sees only itself)
    first = [p // B for p in P]
    n_pre = [o + f * B for o, f in zip(base, first)]
    if max(n_pre) > 0:
        T = max(n_pre)
        mask = dense_mask("causal" if causal_clean else "block_causal", seq_len=T, block_size=B, device=device)
        if len(set(n_pre)) > 1:
            key_ok = torch.arange(T, device=device)[None, :] < torch.tensor(n_pre, device=device)[:, None]
            mask = (mask & key_ok[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
        pre = model(canvas[:, :T], positions=torch.arange(T, device=device)[None].expand(N, T), mask=mask, cache=cache)
        if carry is not None:
            for r in range(N):
                if n_pre[r] > 0:
                    carry[r] = pre[r, n_pre[r] - 1].float()
        cache.commit(n_pre)

    rule = cfg.rule
    ar_B = torch.arange(B, device=device)
    lo_t = torch.tensor(n_pre, device=device)  # start of each row's current block
    block = list(first)
    active = list(range(N))  # original row ids, in cache-row order
    writing = [False] * N  # the row's block is final: this forward writes its clean K/V
    forwards = [0] * N
    steps = [0] * N
    post = [0] * N
    edits = [0] * N
    steps_per_block: list[list[int]] = [[] for _ in range(N)]
    results: list[Generation | None] = [None] * N
    credit = None
    if rule == "credit":
        credit = torch.zeros(N, B, model.cfg.vocab_size, device=device)

    def finish(r: int) -> None:
        gen = canvas[r, P[r]:].tolist()[:budget]
        cut = _first_stop(gen, eos)
        reason = "length"
        if cut is not None:
            tokens, n_gen, reason = gen[:cut], cut + 1, "eos"
        else:
            tokens, n_gen = gen, len(gen)
        if stop:
            trimmed = _trim_stop(tokens, stop, decode)
            if trimmed is not None:
                tokens, n_gen, reason = trimmed, len(trimmed), "stop"
        results[r] = Generation(tokens, n_gen, forwards[r], time.perf_counter() - t0, reason == "eos",
                                steps_per_block[r], reason, edits[r])

    def block_done(r: int) -> bool:
        """After row r's current block is final: does the row stop here?"""
        hi = base[r] + (block[r] + 1) * B
        gen = canvas[r, P[r]:hi].tolist()
        if _first_stop(gen, eos) is not None or hi - P[r] >= budget or block[r] == n_blocks[r] - 1:
            return True
        if stop and find_stop(decode(gen), stop) is not None:
            return True
        return False

    want_events = events
    while active:
        a = len(active)
        rows = torch.tensor(active, device=device)
        idx = lo_t[rows][:, None] + ar_B  # [a, B] absolute positions of the current blocks
        x = canvas[rows].gather(1, idx)  # [a, B]
        wrt = torch.tensor([writing[r] for r in active], device=device)  # rows writing their clean K/V
        mask = cache.attn_mask(B, causal_rows=wrt if causal_clean else None)
        logits = model(x, positions=idx, mask=mask, cache=cache)  # [a, B, V]
        for r in active:
            forwards[r] += 1
        if carry is not None:  # slot j from logit j - 1, slot 0 from the clean prefix's last logit
            last = logits[:, -1].float()
            logits = torch.cat([carry[rows].to(logits.dtype)[:, None], logits[:, :-1]], 1)
        logits[..., mask_id] = float("-inf")  # never write the mask token itself
        if cfg.repeat_penalty:
            repeat_penalty_(logits, x, cfg.repeat_penalty)
        if credit is not None:
            c = credit[rows]
            credit_update(c, logits)
            credit[rows] = c
            logits = credit_adjust(logits, c)
        tok, conf = choose_tokens(logits, cfg.temperature, generator, top_k=cfg.top_k, top_p=cfg.top_p)
        masked = x == mask_id
        editable = idx >= P_t[rows][:, None]  # generated slots (prompt tokens are never edited)
        tau = cfg.tau_mask
        quota = torch.tensor([cfg.quota_at(steps[r]) for r in active], device=device)[:, None]  # [a, 1]
        if rule == "threshold":
            m2t, t2t = threshold_rule(conf, masked, tau, quota), None
        elif rule in ("dinfer", "credit"):
            m2t, t2t = dinfer_threshold_rule(conf, masked, tau), None
        elif rule == "factor":
            m2t, t2t = factor_rule(conf, masked, cfg.factor), None
        else:
            m2t, t2t = joint_rule(conf, masked, tok != x, editable, tau, cfg.tau_edit, quota)
        m2t = m2t & ~wrt[:, None]  # a cache-writing forward never writes tokens
        if t2t is not None:
            t2t = t2t & ~wrt[:, None]
        has_mask = masked.any(-1).tolist()
        if t2t is not None:
            # post-edit budget: a full block gets at most max_post_steps edit-only passes [code]
            over = torch.tensor([not has_mask[i] and post[r] + 1 > cfg.max_post_steps
                                 for i, r in enumerate(active)], device=device)[:, None]
            t2t = t2t & ~over
            write = m2t | t2t
        else:
            write = m2t
        new_x = torch.where(write, tok, x)
        if cfg.eos_fill and eos:
            new_x = fill_after_eos(new_x, editable, mask_id, eos)
        canvas[rows] = canvas[rows].scatter(1, idx, new_x)
        wrote = write.any(-1).tolist()
        n_edit = t2t.sum(-1).tolist() if t2t is not None else [0] * a
        ev_m2t = m2t.nonzero().tolist() if want_events else []
        ev_t2t = t2t.nonzero().tolist() if (want_events and t2t is not None) else []

        commit_n = [0] * a
        leaving: set[int] = set()
        still_masked = (new_x == mask_id).any(-1).tolist()

        def next_block(i: int, r: int) -> None:
            """This forward wrote row r's finished block's clean K/V: commit them and move to the next block."""
            commit_n[i] = B
            if carry is not None:
                carry[r] = last[i]
            block[r] += 1
            lo_t[r] = base[r] + block[r] * B
            steps[r] = post[r] = 0

        for i, r in enumerate(active):
            lo = base[r] + block[r] * B
            if writing[r]:  # this forward wrote the final block's clean K/V
                writing[r] = False
                next_block(i, r)
                if credit is not None:
                    credit[r].zero_()
                continue
            steps[r] += 1
            edits[r] += int(n_edit[i])
            if not has_mask[i]:
                post[r] += 1
            if cfg.edits:
                # final at a pass that writes nothing (also once the edit budget is spent): this forward saw
                # exactly the final tokens, so its K/V are the clean ones
                final = not wrote[i]
            else:
                final = not still_masked[i]
            if not cfg.edits and still_masked[i]:
                # unmask-only rules: committed tokens never change, so stop once the visible output is final
                hi = lo + B
                region = canvas[r, max(lo, P[r]):min(hi, P[r] + budget)].tolist()
                if _output_final(region, mask_id, eos) and (
                        _first_stop(region, eos) is not None or hi - P[r] >= budget):
                    steps_per_block[r].append(steps[r])
                    leaving.add(r)
                    continue
            if final:
                steps_per_block[r].append(steps[r])
                if block_done(r):
                    leaving.add(r)
                elif cfg.edits and not causal_clean:  # clean K/V already written by this forward
                    next_block(i, r)
                else:
                    writing[r] = True  # next forward writes the clean K/V
        if want_events:
            per_row: dict[int, list[TokenEvent]] = {}
            for i, j in ev_m2t:
                per_row.setdefault(i, []).append(TokenEvent(int(idx[i, j]), int(tok[i, j]), "m2t", float(conf[i, j])))
            for i, j in ev_t2t:
                per_row.setdefault(i, []).append(
                    TokenEvent(int(idx[i, j]), int(tok[i, j]), "t2t", float(conf[i, j]), int(x[i, j])))
        cache.commit(commit_n)
        for r in leaving:
            finish(r)
        if want_events:
            for i, r in enumerate(active):
                gen_now = canvas[r, P[r]:min(base[r] + (block[r] + 1) * B, P[r] + budget)].tolist()
                n_final = len(gen_now) if r in leaving else max(0, min(base[r] + block[r] * B - P[r], budget))
                yield StepUpdate(r, forwards[r], (int(idx[i, 0]) - base[r]) // B, per_row.get(i, []), gen_now,
                                 n_final,
                                 r in leaving)
        if leaving:
            keep = [i for i, r in enumerate(active) if r not in leaving]
            cache.keep(keep)
            active = [active[i] for i in keep]
    yield [g for g in results]  # type: ignore[misc]


def generate(model, prompts: list[list[int]], cfg: DecodeConfig, *, mask_id: int, eos_ids, generator=None,
             stop: list[str] | tuple[str, ...] = (), decode: Callable[[list[int]], str] | None = None,
             on_step: Callable[[StepUpdate], None] | None = None) -> list[Generation]:
    """Decode a batch of prompts (token id lists, any lengths); returns one Generation per prompt, in order.
    At temperature 0 a row's output equals that row decoded alone."""
    out = None
    for item in stream(model, prompts, cfg, mask_id=mask_id, eos_ids=eos_ids, generator=generator, stop=stop,
                       decode=decode, events=on_step is not None):
        if isinstance(item, list):
            out = item
        elif on_step is not None:
            on_step(item)
    assert out is not None
    return out


def block_generate(model, prompt: list[int], cfg: DecodeConfig, *, mask_id: int, eos_ids, generator=None) -> Generation:
    """One prompt (the foundation's entry point)."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    return generate(model, [prompt], cfg, mask_id=mask_id, eos_ids=eos_ids, generator=generator)[0]


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
    gen = out[:max_new_tokens]
    cut = _first_stop(gen, eos)
    tokens, n_gen = (gen[:cut], cut + 1) if cut is not None else (gen, len(gen))
    # The first token comes from the prefill forward; count it so TPF of AR is exactly 1.
    return Generation(tokens, n_gen, forwards + 1, seconds, cut is not None, [], "eos" if cut is not None else "length")
