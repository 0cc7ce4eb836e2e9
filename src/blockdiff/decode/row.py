"""One row of the scheduler: a prompt being decoded, its canvas and counters, and what its final text is.

A `Row` is the per-row state the scheduler advances (as nanochat's engine keeps one state object per row): the
canvas (prompt + generated slots, [MASK] where not yet written), the block it is working on, whether its next
forward writes that block's clean K/V, its step / edit counters, the carry logit of a shifted checkpoint and the
rule's own state. The scheduler owns the batch (forward, token choice, rule); the row owns its bookkeeping after
each forward (`after_forward`) and its result (`generation`).

Block layout (docs/decoding.md): blocks start at position 0 (LLaDA2), except with a causal clean stream, where the
whole prompt is prefilled and the first block starts right after it (`base = P % B`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor

from .config import DecodeConfig, Generation
from .rules import Rule


def first_stop(tokens: list[int], eos) -> int | None:
    """Index of the first EOS id in `tokens`, or None."""
    for i, t in enumerate(tokens):
        if t in eos:
            return i
    return None


def output_final(region: list[int], mask_id: int, eos) -> bool:
    """True when no slot before the first EOS in `region` (the visible output region) is masked."""
    for t in region:
        if t == mask_id:
            return False
        if t in eos:
            return True
    return True


def find_stop(text: str, stops) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def trim_stop(tokens: list[int], stops, decode) -> list[int] | None:
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


def canvas_length(n_prompt: int, max_new_tokens: int, block_size: int, causal_clean: bool) -> int:
    """Positions a row's canvas spans: prompt + budget rounded up to whole blocks (from the row's block base)."""
    base = n_prompt % block_size if causal_clean else 0
    return base + math.ceil((n_prompt + max_new_tokens - base) / block_size) * block_size


@dataclass(eq=False)
class Row:
    rid: int  # the caller's id (the prompt's index in generate / the request in the server)
    prompt: list[int]
    cfg: DecodeConfig  # block size resolved
    rule: Rule
    eos: frozenset[int]  # empty with ignore_eos
    mask_id: int
    canvas: Tensor  # [L_r] prompt, then [MASK] / generated ids
    base: int  # blocks are [base + kB, base + (k+1)B)
    generator: torch.Generator | None = None
    stop: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None
    block: int = 0  # current block index
    writing: bool = False  # the block is final: the next forward writes its clean K/V
    forwards: int = 0
    steps: int = 0  # denoising steps in the current block
    post: int = 0  # edit-only passes in the current block
    edits: int = 0
    steps_per_block: list[int] = field(default_factory=list)
    carry: Tensor | None = None  # [V] shifted labels: the logit that predicts the current block's slot 0
    state: Tensor | None = None  # the rule's per-row state (dInfer credit) [B, V]
    t0: float = field(default_factory=time.perf_counter)
    spec: ClassVar[bool] = False  # a self-speculating row (decode/spec.py's SpecRow)
    segmented: ClassVar[bool] = False  # fed as [causal tokens | one block] by `plan` (SpecRow, window.WindowRow)

    @property
    def P(self) -> int:
        return len(self.prompt)

    @property
    def B(self) -> int:
        return self.cfg.block_size

    @property
    def budget(self) -> int:
        return self.cfg.max_new_tokens

    @property
    def lo(self) -> int:
        """Start of the current block."""
        return self.base + self.block * self.B

    @property
    def n_blocks(self) -> int:
        return (self.canvas.numel() - self.base) // self.B

    def generated(self, hi: int | None = None) -> list[int]:
        """Generated slots up to position `hi` (default: the budget)."""
        end = self.P + self.budget if hi is None else min(hi, self.P + self.budget)
        return self.canvas[self.P:end].tolist()

    def stops_after_block(self) -> bool:
        """After the current block is final: does the row stop here (EOS, budget, last block, stop string)?"""
        hi = self.lo + self.B
        gen = self.canvas[self.P:hi].tolist()
        if first_stop(gen, self.eos) is not None or hi - self.P >= self.budget or self.block == self.n_blocks - 1:
            return True
        return bool(self.stop) and find_stop(self.decode(gen), self.stop) is not None

    def early_exit(self) -> bool:
        """Unmask-only rules: committed tokens never change, so the row is done once the visible output is final
        (every slot before the first committed EOS, or up to the budget, is written)."""
        hi = self.lo + self.B
        region = self.canvas[max(self.lo, self.P):min(hi, self.P + self.budget)].tolist()
        return output_final(region, self.mask_id, self.eos) and (
            first_stop(region, self.eos) is not None or hi - self.P >= self.budget)

    def next_block(self, last: Tensor | None) -> None:
        """The forward just wrote the finished block's clean K/V (the caller commits them): move on."""
        if self.carry is not None and last is not None:
            self.carry = last
        self.block += 1
        self.steps = self.post = 0

    def after_forward(self, *, wrote: bool, had_mask: bool, still_masked: bool, n_edit: int, last: Tensor | None,
                      causal_clean: bool) -> tuple[int, bool]:
        """Bookkeeping after one forward: returns (cache slots to commit, the row is finished)."""
        if self.writing:  # this forward wrote the final block's clean K/V
            self.writing = False
            self.next_block(last)
            if self.state is not None:
                self.state.zero_()
            return self.B, False
        self.steps += 1
        self.edits += n_edit
        if not had_mask:
            self.post += 1
        if not self.rule.edits and still_masked:
            if self.early_exit():
                self.steps_per_block.append(self.steps)
                return 0, True
            return 0, False
        # final: unmask-only rules once nothing is masked; editing rules at a pass that writes nothing (also once
        # the edit budget is spent): that forward saw exactly the final tokens, so its K/V are the clean ones
        if self.rule.edits and wrote:
            return 0, False
        self.steps_per_block.append(self.steps)
        if self.stops_after_block():
            return 0, True
        if self.rule.edits and not causal_clean:  # clean K/V already written by this forward
            self.next_block(last)
            return self.B, False
        self.writing = True  # next forward writes the clean K/V
        return 0, False

    def n_final(self, done: bool) -> int:
        """Leading generated slots that can no longer change: all of them when the row is done; else the finished
        blocks (the current one too once it is final), and with an unmask-only rule also the current block's
        slots before its first [MASK] (committed tokens never change)."""
        gen = self.generated(self.lo + self.B)
        if done:
            return len(gen)
        if self.writing:  # the current block is final too
            return len(gen)
        n = max(0, min(self.lo - self.P, self.budget))
        if not self.rule.edits:
            while n < len(gen) and gen[n] != self.mask_id:
                n += 1
        return n

    def generation(self) -> Generation:
        """The finished row: tokens trimmed at the first EOS (counted) or a stop string."""
        gen = self.generated()
        cut = first_stop(gen, self.eos)
        reason = "length"
        if cut is not None:
            tokens, n_gen, reason = gen[:cut], cut + 1, "eos"
        else:
            tokens, n_gen = gen, len(gen)
        if self.stop:
            trimmed = trim_stop(tokens, self.stop, self.decode)
            if trimmed is not None:
                tokens, n_gen, reason = trimmed, len(trimmed), "stop"
        return Generation(tokens, n_gen, self.forwards, time.perf_counter() - self.t0, reason == "eos",
                          self.steps_per_block, reason, self.edits)
