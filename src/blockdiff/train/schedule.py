"""The block-size / learning-rate schedule over optimiser steps, derived from a recipe's phases.

LLaDA2.0's Warmup-Stable-Decay (WSD) block schedule is a phase list, e.g. B = 1 -> 4 -> 32 -> L (warm-up),
L (stable, MDLM), then back down to 32 (decay). The learning rate is each phase's `lr`, multiplied by a
linear warm-up over the first `warmup_steps` of the run and a linear decay to `min_lr_ratio` over the last
`decay_steps` (the usual warmup-stable-decay lr shape; the report does not publish its lr curve).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..model.config import effective_block_size
from .recipe import Recipe


@dataclass(frozen=True)
class PhaseInfo:
    index: int  # 0-based phase number
    name: str
    block_size: int  # effective B (model.config.effective_block_size: the recipe's B capped at seq_len)
    lr: float
    start: int  # first global step of the phase
    end: int  # one past its last step


class Schedule:
    def __init__(self, recipe: Recipe):
        self.phases: list[PhaseInfo] = []
        start = 0
        for i, (p, n) in enumerate(zip(recipe.phases, recipe.phase_steps())):
            name = p.name or f"phase{i + 1}-B{p.block_size}"
            B = effective_block_size(p.block_size, seq_len=recipe.data.seq_len)
            self.phases.append(PhaseInfo(i, name, B, p.lr, start, start + n))
            start += n
        self.total_steps = start
        self.warmup_steps = recipe.train.warmup_steps
        self.decay_steps = min(recipe.train.decay_steps, self.total_steps)
        self.min_lr_ratio = recipe.train.min_lr_ratio
        self._starts = [p.start for p in self.phases]

    def phase_at(self, step: int) -> PhaseInfo:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the schedule [0, {self.total_steps})")
        return self.phases[bisect.bisect_right(self._starts, step) - 1]

    def lr_at(self, step: int) -> float:
        lr = self.phase_at(step).lr
        if self.warmup_steps and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        decay_start = self.total_steps - self.decay_steps
        if self.decay_steps and step >= decay_start:
            frac = (step - decay_start + 1) / self.decay_steps
            lr *= 1.0 - (1.0 - self.min_lr_ratio) * frac
        return lr

    def is_phase_end(self, step: int) -> bool:
        return step + 1 == self.phase_at(step).end
