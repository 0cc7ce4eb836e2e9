"""Cost-aware windows for the block rules (threshold, S/Q/joint, dInfer, credit, factor): `DecodeConfig.window` = W > 0
(docs/decoding.md, "Windows").

Block decoding feeds all B slots of the current block to every forward, although a rule commits about one token per
step and the slots far from the decoded frontier are rarely ready. On a CPU each extra query token costs
(bench/cost.py), so a forward of B = 32 slots costs several times a forward of 8. A window row feeds only:

    [ decided-but-uncached prefix | W slots from the frontier ]      causal | one bidirectional block

- the frontier f is the end of the row's contiguous decided text (prompt + generated tokens with no [MASK] before
  them); tokens decided since the last forward up to f are fed causally, so their K/V are the causal clean stream's
  (exactly what a finished block's cache-writing forward writes for a causal-clean checkpoint) and are committed
  at once: no separate cache-writing forward;
- the W slots [f, f + W) are a noisy block: [MASK]s and tokens decided out of order; the row's rule runs on them
  as on a block (the same `Rule.select`, quota 1 per step, T2T edits only inside the window).
Under shifted labels slot 0 of the window is read from the causal logit before it (an AR step, as a block's first
slot), slot j from the noisy logit j - 1.

What differs from the official block algorithm: the block is a window that slides with the frontier instead of a
fixed block of B, so a slot is decided seeing at most W - 1 noisy neighbours, and a decided token leaves the
window (and the reach of T2T edits) once everything before it is decided. Needs labels "shift" and clean_stream
"causal" (the cached prefix must be encodable at any token, not only at block ends). Measured beside the block
algorithm in bench/decode.py; a default only where accuracy is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .config import StepUpdate, TokenEvent
from .row import Row, find_stop, first_stop
from .rules import choose_tokens, repeat_penalty_


def check_window_model(model) -> None:
    info = getattr(model.cfg, "diffusion", None)
    if info is None or not (info.shift and info.causal_clean):
        have = "an AR checkpoint" if info is None else f'labels "{info.labels}", clean_stream "{info.clean_stream}"'
        raise ValueError(f'window > 0 needs a checkpoint with labels "shift" and clean_stream "causal" (this one has '
                         f'{have}); use window = 0 (whole blocks)')


@dataclass(eq=False)
class WindowRow(Row):
    f: int = 0  # frontier: canvas[:f] is decided (prompt + contiguous generated tokens)
    segmented: ClassVar[bool] = True

    @property
    def lo(self) -> int:
        """The admission prefill encodes the whole prompt (the frontier then)."""
        return self.f

    @property
    def window_end(self) -> int:
        """End of the window: W slots from the frontier, never past the budget."""
        return min(self.f + self.cfg.window, self.P + self.budget)

    def plan(self, n_cached: int, max_draft: int | None = None) -> tuple[list[int], int]:
        """This forward's tokens: the decided prefix not yet cached (causal), then the window."""
        causal = self.canvas[n_cached:self.f].tolist()
        return causal + self.canvas[self.f:self.window_end].tolist(), len(causal)

    def after_forward(self, logits: Tensor, n_cached: int, argmax: list[int] | None,
                      events: bool) -> tuple[int, bool, StepUpdate | None]:
        c = self.f - n_cached
        w = self.window_end - self.f
        if c > 0:
            self.carry = logits[c - 1].float()  # the causal logit that predicts the frontier
        x = self.canvas[self.f:self.f + w][None]  # [1, w]
        wl = torch.cat([self.carry[None].to(logits.dtype), logits[c:c + w - 1]])[None]  # [1, w, V], a new tensor
        wl[..., self.mask_id] = float("-inf")
        if self.cfg.repeat_penalty:
            repeat_penalty_(wl, x, self.cfg.repeat_penalty)
        if self.state is not None:
            wl = self.rule.adjust(wl, self.state[:w][None])
        tok, conf = choose_tokens(wl, self.cfg.temperature, self.generator, top_k=self.cfg.top_k, top_p=self.cfg.top_p)
        masked = x == self.mask_id
        editable = torch.ones_like(masked)
        m2t, t2t = self.rule.select(conf.float(), masked, tok != x, editable, 1)
        if self.cfg.window_ar:  # the frontier slot is read from the causal logit: an AR step, always taken
            m2t[0, 0] |= bool(masked[0, 0])
        write = m2t if t2t is None else m2t | t2t
        new = torch.where(write, tok, x)[0]
        self.canvas[self.f:self.f + w] = new
        self.forwards += 1
        self.steps += 1
        if t2t is not None:
            self.edits += int(t2t.sum())
        # the frontier moves over the decided slots at the front of the window
        # an unmask-only rule never changes a decided token, so the decided front leaves at once; with T2T edits a
        # token leaves once it survived a pass unedited (decided before this forward), the AR frontier token at once
        settled = new != self.mask_id
        if self.rule.edits:
            settled = settled & (x[0] != self.mask_id) & ~write[0]
            if self.cfg.window_ar:
                settled[0] = bool(m2t[0, 0]) or bool(settled[0])
        fixed = settled.tolist()
        lead = next((i for i, ok in enumerate(fixed) if not ok), w)
        start, self.f = self.f, self.f + lead
        if self.state is not None and lead:  # the credit state slides with the window
            self.state = torch.roll(self.state, -lead, 0)
            self.state[-lead:] = 0
        gen = self.canvas[self.P:self.f].tolist()
        done = (first_stop(gen, self.eos) is not None or self.f - self.P >= self.budget
                or (bool(self.stop) and find_stop(self.decode(gen), self.stop) is not None))
        update = None
        if events:
            ev = []
            pos, tk, cf, old = range(start, start + w), tok[0].tolist(), conf[0].tolist(), x[0].tolist()
            for j in m2t[0].nonzero()[:, 0].tolist():
                ev.append(TokenEvent(pos[j], tk[j], "m2t", cf[j]))
            if t2t is not None:
                for j in t2t[0].nonzero()[:, 0].tolist():
                    ev.append(TokenEvent(pos[j], tk[j], "t2t", cf[j], old[j]))
            shown = self.canvas[self.P:start + w].tolist()
            update = StepUpdate(self.rid, self.forwards, (start - self.P) // self.B, ev, shown,
                                self.f - self.P, done)
        if done:
            self.steps_per_block.append(self.steps)
        return c, done, update

    def n_final(self, done: bool) -> int:
        return self.f - self.P
