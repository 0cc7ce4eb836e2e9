"""Mode `spec`: lossless self-speculative decoding of a block-diffusion checkpoint with shifted labels and a causal
clean stream (docs/decoding.md, "spec").

Such a checkpoint holds two decoders in one set of weights: its causal clean stream is an AR model (trained with
the AR loss, logit i predicts token i + 1), and its noisy stream drafts a block of [MASK] slots in parallel. One
forward of a spec row carries both (TiDAR, I-DLM; our layout):

    [ pending | d_1 .. d_m | [MASK] x k ]      positions n_c .. n + m + k - 1
      causal: the verification part       one bidirectional block after it: the drafting part

- `pending`: the committed tokens whose K/V are not in the cache yet (the last accepted token, usually one);
- `d_1 .. d_m`: last forward's drafts for positions n .. n + m - 1, under the causal mask, so their logits are
  exactly the AR next-token logits (and their K/V the AR K/V) *if* the drafts are right;
- k = draft_len + 1 [MASK] slots: a block of the noisy stream starting right after the last draft. Under shifted
  labels its slot 0 is predicted by the causal logit before it, slot j >= 1 by the noisy logit j - 1, so k slots
  draft k - 1 tokens for positions n + m + 1 .. n + m + k - 1 (the noisy logit of the last slot predicts past
  the block: never trained, never read).

Acceptance at temperature 0: the longest prefix d_1 .. d_a that equals the causal argmax, then the causal
stream's own next token (the argmax after d_a) -- so every committed token is the AR greedy token given the
committed prefix, and the output is token for token the checkpoint's AR greedy output. The cache keeps exactly
the pending and accepted tokens' K/V (computed causally, as an AR forward would); the rejected drafts' and the
masks' slots are simply not committed (the next forward overwrites them). The new drafts are the masks' argmax
when every draft was accepted (they were drafted after d_m and the causal token after it, which is now committed
at slot 0); after a rejection they were drafted after a wrong token and are dropped: the next forward carries
only the pending token and masks.

At temperature > 0 drafts are sampled from the noisy stream's distribution q (after the row's temperature /
top-k / top-p) and accepted with the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): accept
d_j with probability min(1, p(d_j) / q(d_j)), p the causal stream's distribution after the same transforms; at
the first rejection sample from norm(max(0, p - q)); when all are accepted sample the next token from p. The
output is then distributed exactly as AR sampling from p.

`DecodeConfig.threshold` (default 0) cuts a row's drafts at the first one whose draft probability is below it:
a draft the noisy stream itself doubts costs a verification slot and is rarely accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .config import Generation, StepUpdate, TokenEvent
from .row import Row, find_stop, first_stop
from .rules import sampling_probs


ALPHA_PRIOR = 0.7  # a new row's assumed per-draft acceptance (measured: 0.6-0.8 on task prompts)
ALPHA_EMA = 0.3  # weight of the latest verifying forward in the moving average
PROBE = 8  # AR steps before a batch that stopped drafting drafts again to re-measure alpha (doubles per failed probe)
MAX_GAP = 64


def draft_allowance(spec_rows: list, spec_tokens: int) -> int:
    """New drafts per spec row a forward can afford: the rows share `spec_tokens` query tokens, a row with d drafts
    costing about 2 d + 2 (its pending token, last forward's d drafts, d + 1 masks). On a CPU a forward of a few
    rows x 8 tokens costs little more than one token per row, a full batch x 8 several times more (bench/cost.py),
    so drafts shrink as the batch grows, down to plain AR steps (0): still lossless."""
    if not spec_rows:
        return 0
    return max(0, (spec_tokens // len(spec_rows) - 2) // 2)


@dataclass
class DraftPolicy:
    """How many drafts the batch's spec rows take at each forward: the scheduler's one drafting state.

    One number per forward, not per row: a forward costs what its widest row costs, so a row drafting alone makes
    every row pay. d = the rows' `spec_tokens` allowance (`draft_allowance`), capped by their draft_len, taken when
    the drafts pay: with per-draft acceptance alpha_r a row yields 1 + alpha_r + ... + alpha_r^d tokens per forward
    in expectation, and a drafting forward costs (1 + draft_cost) AR steps (draft_cost: the cost curve at the
    spec_tokens knee, bench/cost.py). Below break-even the batch takes AR steps and probes (drafts anyway) after
    `gap` of them to re-measure alpha; a probe that does not pay doubles the gap (up to MAX_GAP). `alpha` is the
    moving average over every verified draft of this scheduler: a new row's prior, so a server whose requests
    draft badly learns it once, not once per request."""

    alpha: float = ALPHA_PRIOR
    gap: int = PROBE
    since: int = 0  # AR-step forwards since the batch last drafted

    def drafts(self, spec_rows: list) -> int:
        if not spec_rows:
            return 0
        d = min(draft_allowance(spec_rows, min(r.cfg.spec_tokens for r in spec_rows)),
                max(r.rule.draft_len for r in spec_rows))
        if d == 0:
            return 0
        cost = min(r.cfg.draft_cost for r in spec_rows)
        gain = sum(sum(r.alpha ** i for i in range(d + 1)) for r in spec_rows)
        if cost <= 0 or gain >= len(spec_rows) * (1 + cost):
            self.since, self.gap = 0, PROBE
            return d
        self.since += 1
        if self.since >= self.gap:  # probe
            self.since, self.gap = 0, min(2 * self.gap, MAX_GAP)
            return d
        return 0

    def observe(self, accepted: int, drafted: int) -> None:
        """A verifying forward's result (accepted of drafted drafts), for the prior of new rows."""
        if drafted:
            self.alpha = (1 - ALPHA_EMA) * self.alpha + ALPHA_EMA * accepted / drafted


def check_spec_model(model) -> None:
    """Spec needs a causal AR stream to verify with: shifted labels and a causal clean stream."""
    info = getattr(model.cfg, "diffusion", None)
    if info is None or not (info.shift and info.causal_clean):
        have = "no blockdiff section (an AR checkpoint)" if info is None else (
            f'labels "{info.labels}", clean_stream "{info.clean_stream}"')
        raise ValueError(f'mode "spec" needs a checkpoint with labels "shift" and clean_stream "causal" (this one has '
                         f'{have}); use mode S or Q for LLaDA2-style checkpoints, or plain AR decoding for AR ones')


@dataclass(eq=False)
class SpecRow(Row):
    """A row decoded by self-speculation. The canvas holds the prompt and max_new_tokens slots (no block rounding);
    `n` tokens of it are committed, the first `cache length` of them have their K/V in the cache."""

    n: int = 0  # committed tokens (prompt + accepted)
    drafts: list[int] = field(default_factory=list)  # drafts for positions n .. n + len - 1
    q: Tensor | None = None  # [len(drafts), V] the distributions the drafts were sampled from (temperature > 0)
    drafted: int = 0  # drafts proposed for verification
    accepted: int = 0  # drafts accepted
    k: int = 0  # [MASK] slots of the coming forward
    alpha: float = ALPHA_PRIOR  # measured per-draft acceptance (moving average over verifying forwards)
    spec: ClassVar[bool] = True
    segmented: ClassVar[bool] = True

    def plan(self, n_cached: int, max_draft: int | None = None) -> tuple[list[int], int]:
        """This forward's tokens (pending, drafts, masks) and how many of them are causal; at most `max_draft`
        new drafts (`DraftPolicy.drafts`)."""
        left = self.P + self.budget - self.n  # tokens still to generate (>= 1 while the row runs)
        m = len(self.drafts)
        d = self.rule.draft_len if max_draft is None else min(self.rule.draft_len, max_draft)
        # masks draft positions n + m + 1 ..; none past the budget, and a single mask drafts nothing
        k = min(d + 1, left - m)
        self.k = k if k >= 2 else 0
        causal = self.canvas[n_cached:self.n].tolist() + self.drafts
        return causal + [self.mask_id] * self.k, len(causal)

    def after_forward(self, logits: Tensor, n_cached: int, argmax: list[int] | None,
                      events: bool) -> tuple[int, bool, StepUpdate | None]:
        """Verify the drafts with this forward's causal logits [T, V], commit, draft anew. Returns (cache slots to
        commit, the row is finished, the step's update)."""
        c, m, k = self.n - n_cached, len(self.drafts), self.k
        cfg = self.cfg
        if cfg.temperature <= 0:
            a = 0
            while a < m and argmax[c - 1 + a] == self.drafts[a]:
                a += 1
            new = self.drafts[:a] + [argmax[c - 1 + a]]
            drafts = argmax[c + m:c + m + k - 1] if a == m and k else []
            q = None
        else:
            new, drafts, q = self._sample(logits, c, m, k)
            a = len(new) - 1
        self.drafted += m
        self.accepted += a
        if m:
            self.alpha = (1 - ALPHA_EMA) * self.alpha + ALPHA_EMA * a / m
        self.forwards += 1
        conf = None
        if events or self.rule.tau > 0:  # row i of the slice predicts new[i]; drafts exist only when a == m, so
            # their rows (the masks', m + 1 ..) follow the new tokens' rows directly
            probs = torch.softmax(logits[c - 1:c + m + max(k - 1, 0)].float(), dim=-1)  # [m + 1 + k - 1, V]
            conf = probs.gather(-1, torch.tensor(new + drafts, device=logits.device)[:, None])[:, 0].tolist()
        if drafts and self.rule.tau > 0:  # cut at the first draft the noisy stream itself doubts
            keep = next((i for i, p in enumerate(conf[len(new):]) if p < self.rule.tau), len(drafts))
            drafts = drafts[:keep]
            q = None if q is None else q[:keep]
        # write the new tokens; stop at EOS, the budget, a stop string
        start = self.n
        room = self.P + self.budget - start
        new = new[:room]
        self.canvas[start:start + len(new)] = torch.tensor(new, device=self.canvas.device)
        self.n = start + len(new)
        gen = self.canvas[self.P:self.n].tolist() if (events or self.stop) else None
        done = (first_stop(new, self.eos) is not None or self.n - self.P >= self.budget
                or (bool(self.stop) and find_stop(self.decode(gen), self.stop) is not None))
        self.drafts, self.q = ([], None) if done else (drafts, q)
        update = None
        if events:
            kinds = ["draft"] * (len(new) - 1) + ["ar"]
            ev = [TokenEvent(start + i, t, kinds[i], conf[i]) for i, t in enumerate(new)]
            update = StepUpdate(self.rid, self.forwards, (start - self.P) // self.B, ev, gen, len(gen), done)
        return c + a, done, update

    def _sample(self, logits: Tensor, c: int, m: int, k: int) -> tuple[list[int], list[int], Tensor | None]:
        """Speculative sampling: (accepted drafts + the corrected or bonus token, new drafts, their q)."""
        cfg, g = self.cfg, self.generator
        dev = logits.device
        p = sampling_probs(logits[c - 1:c + m + max(k - 1, 0)], cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        u = torch.rand(m, generator=g, device=dev).tolist() if m else []
        new: list[int] = []
        for j, d in enumerate(self.drafts):
            pj, qj = p[j], self.q[j]
            if u[j] * float(qj[d]) < float(pj[d]):  # accept with probability min(1, p(d) / q(d))
                new.append(d)
                continue
            resid = (pj - qj).clamp_min(0)
            total = float(resid.sum())
            dist = resid / total if total > 0 else pj
            new.append(int(torch.multinomial(dist, 1, generator=g)))
            return new, [], None
        new.append(int(torch.multinomial(p[m], 1, generator=g)))  # every draft accepted: the bonus token
        if k < 2:
            return new, [], None
        q = p[m + 1:m + k]  # [k - 1, V] the masks' distributions (after the row's temperature / top-k / top-p)
        drafts = torch.multinomial(q, 1, generator=g)[:, 0].tolist()
        return new, drafts, q

    def n_final(self, done: bool) -> int:
        return self.n - self.P

    def generation(self) -> Generation:
        g = super().generation()
        g.drafted, g.accepted = self.drafted, self.accepted
        return g
