"""The step-able decoder: rows join and leave a running batch between any two steps (continuous batching).

    sched = Scheduler(model, mask_id=..., block_size=B, max_rows=16, max_len=2048)
    sched.add(rid, prompt_ids, cfg, eos_ids=...)   # queued; prefilled when the next step admits it
    out = sched.step()                               # one forward of every active row
    out.updates (StepUpdate per row), out.finished ([(rid, Generation)]); sched.cancel(rid) frees a row at once

One `step()` = admit the queued rows (their own prefill forward: the complete prompt blocks, block-causal or
token-causal with a causal clean stream; then their K/V are copied into the shared cache after the running rows),
then one forward of every active row's current block [a, B] against its cached prefix, the token choice, the rule
of each row (`Row.rule`, a `decode/rules.py` object: rows with equal rules share one vectorised call), the writes,
and each row's bookkeeping (`Row.after_forward`). Finished rows leave at the end of the step (their cache rows are
compacted away), cancelled rows at once. Rows may carry different decoding settings (mode, thresholds, sampling,
budget, stop strings) but share the scheduler's block size: the forward is [a, B]. The algorithm per row is the
one of docs/decoding.md; `engine.stream` / `engine.generate` are this scheduler with every row added up front.

`ARScheduler` is the same loop for an AR checkpoint (the parent baseline of the server): each step picks every
row's next token from the logit of its previous forward and forwards that one token [a, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..model.masks import dense_mask
from .cache import KVCache
from .config import MAX_DRAFT_LEN, DecodeConfig, Generation, StepUpdate, TokenEvent
from .row import Row, canvas_length, find_stop, first_stop
from .rules import choose_tokens, repeat_penalty_
from .spec import DraftPolicy, SpecRow, check_spec_model
from .window import WindowRow, check_window_model


def alignment(model) -> tuple[bool, bool]:
    """(shift, causal clean stream) of a block-diffusion model, read from its config (LLaDA2's when absent)."""
    info = getattr(model.cfg, "diffusion", None)
    if info is None:
        return False, False
    return info.shift, info.causal_clean


def check_prompts(prompts: list[list[int]], vocab_size: int | None = None, mask_id: int | None = None) -> None:
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


def context_needed(model, n_prompt: int, cfg: DecodeConfig, *, ar: bool = False) -> int:
    """Positions a decode of `n_prompt` + `cfg.max_new_tokens` tokens spans (rounded up to whole blocks; spec and
    AR decoding need no rounding)."""
    if ar or cfg.mode == "spec" or cfg.window:
        return n_prompt + cfg.max_new_tokens
    return canvas_length(n_prompt, cfg.max_new_tokens, cfg.block_size, alignment(model)[1])


def check_context(model, n_prompt: int, cfg: DecodeConfig, *, ar: bool = False,
                  limit: tuple[int, str] | None = None) -> int:
    """The one context-length check (engine, CLI, server): the prompt plus max_new_tokens, rounded up to whole
    blocks, must fit the model's max_position_embeddings, and `limit` = (positions, what they are) when given (the
    server's max model len). Returns the positions needed."""
    need = context_needed(model, n_prompt, cfg, ar=ar)
    context = getattr(model.cfg, "max_position_embeddings", None)
    limits = [(context, f"the model's context of {context} (max_position_embeddings)")] if context else []
    for most, what in limits + ([limit] if limit is not None else []):
        if need > most:
            unrounded = ar or cfg.mode == "spec" or cfg.window
            rounding = "" if unrounded else f", rounded up to whole blocks of {cfg.block_size},"
            raise ValueError(f"prompt of {n_prompt} tokens + max_new_tokens {cfg.max_new_tokens}{rounding} needs "
                             f"{need} positions, more than {what}")
    return need


def cache_slack(block_size: int) -> int:
    """KV slots a scheduler's cache rows hold past the longest decode (`max_len`): a forward writes up to max(B, a
    spec row's width) slots past a row's committed prefix (rows of one forward are padded to its widest row)."""
    return max(block_size, 2 * MAX_DRAFT_LEN + 2) + 1


@dataclass
class StepResult:
    updates: list[StepUpdate] = field(default_factory=list)  # one per row that took part (when events are on)
    finished: list[tuple[int, Generation]] = field(default_factory=list)  # (rid, result) of rows that left


def _groups(rows: list[Row], key: Callable[[Row], object]) -> list[list[int]]:
    """Indices of `rows` grouped by key, in first-seen order."""
    out: dict[object, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(key(r), []).append(i)
    return list(out.values())


def _sub(t: Tensor, gi: list[int], a: int) -> Tensor:
    """Rows `gi` of `t` (the tensor itself when the group is the whole batch: no copy)."""
    return t if len(gi) == a else t[torch.tensor(gi, device=t.device)]


def _put(t: Tensor, gi: list[int], value: Tensor) -> Tensor:
    """`t` with rows `gi` replaced by `value` (`value` itself when the group is the whole batch)."""
    if len(gi) == t.shape[0]:
        return value
    t[torch.tensor(gi, device=t.device)] = value.to(t.dtype)
    return t


class Scheduler:
    def __init__(self, model, *, mask_id: int, block_size: int, max_rows: int, max_len: int, events: bool = True):
        self.model, self.mask_id, self.B, self.events = model, mask_id, block_size, events
        self.pad_id = mask_id  # what fills a shorter prompt's slots in a joint prefill (seen by nothing else)
        self.shift, self.causal_clean = alignment(model)
        p = next(model.parameters())
        self.device, self.vocab = p.device, model.cfg.vocab_size
        self.max_len = max_len
        self.drafting = DraftPolicy()  # how many drafts the spec rows take per forward (decode/spec.py)
        self.cache = KVCache(model.cfg, max_rows, max_len + cache_slack(block_size), device=p.device, dtype=p.dtype)
        self.cache.keep([])  # start empty: rows join with `append`
        self.rows: list[Row] = []  # active rows, in cache-row order
        self.pending: list[Row] = []  # added, not yet prefilled

    # ----------------------------------------------------------------------------------- rows in and out
    @property
    def idle(self) -> bool:
        return not self.rows and not self.pending

    @property
    def free_rows(self) -> int:
        """Cache rows not held by an active row."""
        return self.cache.capacity - self.cache.batch

    def make_row(self, rid: int, prompt: list[int], cfg: DecodeConfig, *, eos_ids, generator=None, stop=(),
                 decode=None) -> Row:
        """Check one request and build its row (raises ValueError with the reason)."""
        check_prompts([prompt], self.vocab, self.mask_id)
        cfg = cfg.for_model(self.model)
        if cfg.block_size != self.B:
            raise ValueError(f"block size {cfg.block_size} differs from the scheduler's {self.B}")
        if stop and decode is None:
            raise ValueError("stop strings need a decode function (token ids -> text)")
        L = check_context(self.model, len(prompt), cfg)
        if L > self.max_len:
            raise ValueError(f"a decode of {L} positions does not fit the KV cache of {self.max_len}")
        if cfg.mode == "spec":
            return self._spec_row(rid, prompt, cfg, L, eos_ids=eos_ids, generator=generator, stop=stop, decode=decode)
        if cfg.window:
            return self._window_row(rid, prompt, cfg, L, eos_ids=eos_ids, generator=generator, stop=stop,
                                    decode=decode)
        canvas = self._canvas(prompt, L)
        rule = cfg.decode_rule
        row = Row(rid, list(prompt), cfg, rule, frozenset() if cfg.ignore_eos else frozenset(eos_ids), self.mask_id,
                  canvas, len(prompt) % self.B if self.causal_clean else 0, generator, tuple(stop), decode)
        row.block = len(prompt) // self.B
        row.state = rule.new_state(self.B, self.vocab, self.device)
        if self.shift:
            row.carry = torch.zeros(self.vocab, device=self.device)
        return row

    def _canvas(self, prompt: list[int], L: int) -> Tensor:
        """A row's [L] canvas: the prompt, then [MASK] slots."""
        canvas = torch.full((L,), self.mask_id, dtype=torch.long, device=self.device)
        canvas[:len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        return canvas

    def _spec_row(self, rid, prompt, cfg, L, *, eos_ids, generator, stop, decode) -> SpecRow:
        check_spec_model(self.model)
        canvas = self._canvas(prompt, L)
        return SpecRow(rid, list(prompt), cfg, cfg.decode_rule, frozenset() if cfg.ignore_eos else frozenset(eos_ids),
                       self.mask_id, canvas, 0, generator, tuple(stop), decode, n=len(prompt),
                       alpha=self.drafting.alpha)

    def _window_row(self, rid, prompt, cfg, L, *, eos_ids, generator, stop, decode) -> WindowRow:
        check_window_model(self.model)
        canvas = self._canvas(prompt, L)
        rule = cfg.decode_rule
        row = WindowRow(rid, list(prompt), cfg, rule, frozenset() if cfg.ignore_eos else frozenset(eos_ids),
                        self.mask_id, canvas, 0, generator, tuple(stop), decode, f=len(prompt))
        row.state = rule.new_state(cfg.window, self.vocab, self.device)
        row.carry = torch.zeros(self.vocab, device=self.device)
        return row

    def add(self, rid: int, prompt: list[int], cfg: DecodeConfig, *, eos_ids, generator=None, stop=(),
            decode=None) -> Row:
        """Queue a request; it joins the batch at the next step (prefill included) when a cache row is free."""
        row = self.make_row(rid, prompt, cfg, eos_ids=eos_ids, generator=generator, stop=stop, decode=decode)
        self.pending.append(row)
        return row

    def cancel(self, rid: int) -> bool:
        """Drop a queued or running row now (its cache row is freed at once). False if it is not here."""
        for i, r in enumerate(self.rows):
            if r.rid == rid:
                self._remove([i])
                return True
        n = len(self.pending)
        self.pending = [r for r in self.pending if r.rid != rid]
        return len(self.pending) < n

    def _remove(self, leaving: list[int]) -> None:
        gone = set(leaving)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.cache.keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def _admit(self) -> StepResult:
        """Prefill the queued rows that fit (one forward for all of them) and add them to the batch. A spec row's
        prefill is its first speculative forward (it yields a token and drafts), so it may finish there."""
        n = min(len(self.pending), self.free_rows)
        if n == 0:
            return StepResult()
        new, self.pending = self.pending[:n], self.pending[n:]
        tmp, outcome = self._prefill(new)
        out = StepResult(updates=[u for o in outcome if o is not None and o[2] is not None for u in [o[2]]])
        done = [k for k, o in enumerate(outcome) if o is not None and o[1]]
        if done:
            out.finished = [(new[k].rid, new[k].generation()) for k in done]
            keep = [k for k in range(len(new)) if k not in set(done)]
            tmp.keep(keep)
            new = [new[k] for k in keep]
        self.cache.append(tmp)
        self.rows.extend(new)
        return out

    def _prefill(self, new: list[Row]) -> tuple[KVCache, list]:
        """The complete prompt blocks of each new row (right-padded to the longest; padding sees only itself). A row
        whose prompt lies inside its first block needs none: it joins the step's forward directly. A spec row
        prefills its whole prompt with its first [MASK] slots after it (`SpecRow.plan`): the prompt's last logit is
        the first generated token, the masks its first drafts. Returns the rows' cache and, per row, the spec
        outcome (None for block rows)."""
        B, dev = self.B, self.device
        spec_rows = [r for r in new if r.spec] + [r for r in self.rows if r.spec]  # the batch it joins
        allow = self.drafting.drafts(spec_rows) if any(r.spec for r in new) else 0
        plans = {k: r.plan(0, allow) for k, r in enumerate(new) if r.spec}
        n_pre = [plans[k][1] if k in plans else r.lo for k, r in enumerate(new)]
        width = [len(plans[k][0]) if k in plans else n_pre[k] for k in range(len(new))]
        T = max(width)
        tmp = KVCache(self.model.cfg, len(new), max(T, 1), device=dev, dtype=self.cache.k[0].dtype)
        outcome: list = [None] * len(new)
        if T > 0:
            x = torch.full((len(new), T), self.pad_id, dtype=torch.long, device=dev)
            for k, r in enumerate(new):
                if k in plans:
                    x[k, :width[k]] = torch.tensor(plans[k][0], device=dev)
                else:
                    m = min(T, r.canvas.numel())
                    x[k, :m] = r.canvas[:m]
            if plans:  # spec implies a causal clean stream: prompts causal, each spec row's masks one block
                mask = tmp.segment_mask(T, torch.tensor(n_pre), torch.tensor([w - c for w, c in zip(width, n_pre)]))
            else:
                mask = dense_mask("causal" if self.causal_clean else "block_causal", seq_len=T, block_size=B,
                                  device=dev)
                if len(set(n_pre)) > 1:
                    key_ok = torch.arange(T, device=dev)[None, :] < torch.tensor(n_pre, device=dev)[:, None]
                    mask = (mask & key_ok[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)
            pre = self.model(x, positions=torch.arange(T, device=dev)[None].expand(len(new), T), mask=mask, cache=tmp)
            for k, r in enumerate(new):
                if r.carry is not None and n_pre[k] > 0:
                    r.carry = pre[k, n_pre[k] - 1].float()
            if plans:
                outcome = self._segment_outcome(new, list(plans), pre, [0] * len(new), outcome)
            tmp.commit([outcome[k][0] if k in plans else n_pre[k] for k in range(len(new))])
        return tmp, outcome

    # ----------------------------------------------------------------------------------- one step
    @torch.no_grad()
    def step(self) -> StepResult:
        """Admit queued rows, then one forward of every active row and its rule; finished rows leave."""
        out = self._admit()
        rows = self.rows
        if rows:
            res = self._step(rows)
            out.updates += res.updates
            out.finished += res.finished
        return out

    def _segment_outcome(self, rows: list[Row], si: list[int], logits: Tensor, n_cached: list[int], outcome: list):
        """Segmented rows `si` of `rows` (spec, window) after their forward (`after_forward`; the argmax once for
        all of them)."""
        # the block rows took their copy already: mark in place; [MASK] is never written
        logits[..., self.mask_id] = float("-inf")
        greedy = logits.argmax(-1).tolist()  # [a][T]
        for i in si:
            r = rows[i]
            before = (r.accepted, r.drafted) if r.spec else None
            outcome[i] = r.after_forward(logits[i], n_cached[i], greedy[i], self.events)
            if before is not None:
                self.drafting.observe(r.accepted - before[0], r.drafted - before[1])
        return outcome

    def _step(self, rows: list[Row]) -> StepResult:
        if not any(r.segmented for r in rows):  # every row decodes a block: one [a, B] forward
            x, idx, wrt = self._block_inputs(rows)
            mask = self.cache.attn_mask(self.B, causal_rows=wrt if self.causal_clean else None)
            logits = self.model(x, positions=idx, mask=mask, cache=self.cache)  # [a, B, V]
            return self._finish(rows, self._block_outcome(rows, logits, x, idx, wrt))
        return self._mixed_step(rows)

    def _block_inputs(self, rows: list[Row]) -> tuple[Tensor, Tensor, Tensor]:
        """The current block of each row: tokens [a, B], positions [a, B], rows whose forward writes clean K/V [a]."""
        dev, B = self.device, self.B
        idx = torch.tensor([r.lo for r in rows], device=dev)[:, None] + torch.arange(B, device=dev)  # [a, B]
        x = torch.stack([r.canvas[r.lo:r.lo + B] for r in rows])  # [a, B]
        wrt = torch.tensor([r.writing for r in rows], device=dev, dtype=torch.bool)
        return x, idx, wrt

    def _mixed_step(self, rows: list[Row]) -> StepResult:
        """One forward of rows of both kinds: each row's tokens (a block, or a spec row's pending + drafts + masks),
        right-padded to the widest, under `KVCache.segment_mask`."""
        dev, a = self.device, len(rows)
        bi = [i for i, r in enumerate(rows) if not r.segmented]
        si = [i for i, r in enumerate(rows) if r.segmented]
        lens = self.cache.lengths
        spec = [i for i in si if rows[i].spec]
        allow = self.drafting.drafts([rows[i] for i in spec])
        plans = {i: rows[i].plan(lens[i], allow) for i in si}
        T = max([self.B] * bool(bi) + [len(plans[i][0]) for i in si])
        ids = [plans[i][0] + [self.mask_id] * (T - len(plans[i][0])) if i in plans else [self.mask_id] * T
               for i in range(a)]
        x = torch.tensor(ids, dtype=torch.long, device=dev)  # [a, T], right-padded
        pos = torch.tensor(lens, device=dev)[:, None] + torch.arange(T, device=dev)  # [a, T] (spec rows, padding)
        n_causal, n_block = [0] * a, [0] * a
        if bi:
            xb, idx, wrt = self._block_inputs([rows[i] for i in bi])
            x[bi, :self.B], pos[bi, :self.B] = xb, idx
            for k, i in enumerate(bi):
                causal = bool(wrt[k]) and self.causal_clean
                n_causal[i], n_block[i] = (self.B, 0) if causal else (0, self.B)
        for i in si:
            toks, c = plans[i]
            n_causal[i], n_block[i] = c, len(toks) - c
        if T == 1 and self.cache.uniform:  # one token per row at the same length: it sees everything (an AR step)
            mask = None
        else:
            mask = self.cache.segment_mask(T, torch.tensor(n_causal), torch.tensor(n_block))
        logits = self.model(x, positions=pos, mask=mask, cache=self.cache)  # [a, T, V]
        outcome: list = [None] * a
        if bi:
            sub = self._block_outcome([rows[i] for i in bi], logits[bi, :self.B], xb, idx, wrt)
            for k, i in enumerate(bi):
                outcome[i] = sub[k]
        return self._finish(rows, self._segment_outcome(rows, si, logits, lens, outcome))

    def _block_outcome(self, rows: list[Row], logits: Tensor, x: Tensor, idx: Tensor,
                       wrt: Tensor) -> list[tuple[int, bool, StepUpdate | None]]:
        """The block rows' token choice, rule and writes after their forward; per row (cache slots to commit, the
        row is finished, its update)."""
        dev = self.device
        for r in rows:
            r.forwards += 1
        last = None
        if self.shift:  # slot j from logit j - 1, slot 0 from the clean prefix's last logit
            last = logits[:, -1].float()
            carry = torch.stack([r.carry for r in rows]).to(logits.dtype)
            logits = torch.cat([carry[:, None], logits[:, :-1]], 1)
        logits[..., self.mask_id] = float("-inf")  # never write the mask token itself
        tok, conf = self._choose(logits, x, rows)
        masked = x == self.mask_id
        editable = idx >= torch.tensor([r.P for r in rows], device=dev)[:, None]  # generated slots only
        m2t, t2t = self._select(tok, conf, x, masked, editable, wrt, rows)
        write = m2t if t2t is None else m2t | t2t
        new_x = self._write(torch.where(write, tok, x), editable, rows)
        counts = dict(wrote=write.any(-1).tolist(), had_mask=masked.any(-1).tolist(),
                      still=(new_x == self.mask_id).any(-1).tolist(),
                      n_edit=t2t.sum(-1).tolist() if t2t is not None else [0] * len(rows))
        events = self._events(idx, tok, conf, x, m2t, t2t) if self.events else None
        return self._advance(rows, idx, last, counts, events)

    def _choose(self, logits: Tensor, x: Tensor, rows: list[Row]) -> tuple[Tensor, Tensor]:
        """Logit transforms (repeat penalty, the rule's own state), then the token choice, by groups of rows."""
        a = len(rows)
        for gi in _groups(rows, lambda r: r.cfg.repeat_penalty):
            pen = rows[gi[0]].cfg.repeat_penalty
            if pen:
                sub = _sub(logits, gi, a)  # a copy unless the group is the whole batch
                repeat_penalty_(sub, _sub(x, gi, a), pen)
                logits = _put(logits, gi, sub)
        for gi in _groups(rows, lambda r: r.rule if r.state is not None else None):
            rule = rows[gi[0]].rule
            if rows[gi[0]].state is None:
                continue
            state = torch.stack([rows[i].state for i in gi])  # [g, B, V]
            sub = rule.adjust(_sub(logits, gi, a), state)
            for k, i in enumerate(gi):
                rows[i].state.copy_(state[k])
            logits = _put(logits, gi, sub)
        tok = torch.empty(logits.shape[:2], dtype=torch.long, device=logits.device)
        conf = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)

        def sampling(r: Row):
            c = r.cfg
            return (0.0,) if c.temperature <= 0 else (c.temperature, c.top_k, c.top_p, id(r.generator))

        for gi in _groups(rows, sampling):
            c, g = rows[gi[0]].cfg, rows[gi[0]].generator
            t, p = choose_tokens(_sub(logits, gi, a), c.temperature, g, top_k=c.top_k, top_p=c.top_p)
            tok, conf = _put(tok, gi, t), _put(conf, gi, p.float())
        return tok, conf

    def _select(self, tok, conf, x, masked, editable, wrt, rows: list[Row]) -> tuple[Tensor, Tensor | None]:
        """Each row's rule decides what to write (m2t, t2t [a, B]); clean-K/V forwards write nothing and a full
        block gets at most max_post_steps edit-only passes [code]."""
        a, dev = len(rows), self.device
        quota = torch.tensor([r.cfg.quota_at(r.steps) for r in rows], device=dev)[:, None]  # [a, 1]
        changed = tok != x
        m2t, t2t = torch.zeros_like(masked), None
        for gi in _groups(rows, lambda r: r.rule):
            m, t = rows[gi[0]].rule.select(_sub(conf, gi, a), _sub(masked, gi, a), _sub(changed, gi, a),
                                           _sub(editable, gi, a), _sub(quota, gi, a))
            m2t = _put(m2t, gi, m)
            if t is not None:
                t2t = _put(torch.zeros_like(masked) if t2t is None else t2t, gi, t)
        m2t = m2t & ~wrt[:, None]
        if t2t is not None:
            has_mask = masked.any(-1).tolist()
            over = torch.tensor([not has_mask[i] and r.post + 1 > r.cfg.max_post_steps
                                 for i, r in enumerate(rows)], device=dev)[:, None]
            t2t = t2t & ~wrt[:, None] & ~over
        return m2t, t2t

    def _write(self, new_x: Tensor, editable: Tensor, rows: list[Row]) -> Tensor:
        """Optional EOS fill (DecodeConfig.eos_fill), then each row's block back into its canvas."""
        a = len(rows)
        for gi in _groups(rows, lambda r: r.eos if r.cfg.eos_fill and r.eos else None):
            r0 = rows[gi[0]]
            if r0.cfg.eos_fill and r0.eos:
                filled = fill_after_eos(_sub(new_x, gi, a), _sub(editable, gi, a), self.mask_id, set(r0.eos))
                new_x = _put(new_x, gi, filled)
        for i, r in enumerate(rows):
            r.canvas[r.lo:r.lo + self.B] = new_x[i]
        return new_x

    def _events(self, idx, tok, conf, x, m2t, t2t) -> dict[int, list[TokenEvent]]:
        pos, tk, cf, old = idx.tolist(), tok.tolist(), conf.tolist(), x.tolist()
        per_row: dict[int, list[TokenEvent]] = {}
        for i, j in m2t.nonzero().tolist():
            per_row.setdefault(i, []).append(TokenEvent(pos[i][j], tk[i][j], "m2t", cf[i][j]))
        if t2t is not None:
            for i, j in t2t.nonzero().tolist():
                per_row.setdefault(i, []).append(TokenEvent(pos[i][j], tk[i][j], "t2t", cf[i][j], old[i][j]))
        return per_row

    def _advance(self, rows: list[Row], idx: Tensor, last: Tensor | None, counts: dict,
                 events: dict[int, list[TokenEvent]] | None) -> list[tuple[int, bool, StepUpdate | None]]:
        """Each block row's bookkeeping: (cache slots to commit, finished, the step's update)."""
        out = []
        worked = idx[:, 0].tolist()
        for i, r in enumerate(rows):
            n, done = r.after_forward(wrote=counts["wrote"][i], had_mask=counts["had_mask"][i],
                                      still_masked=counts["still"][i], n_edit=int(counts["n_edit"][i]),
                                      last=last[i] if last is not None else None, causal_clean=self.causal_clean)
            update = None
            if events is not None:
                update = StepUpdate(r.rid, r.forwards, (worked[i] - r.base) // self.B, events.get(i, []),
                                    r.generated(r.lo + self.B), r.n_final(done), done)
            out.append((n, done, update))
        return out

    def _finish(self, rows: list[Row], outcome: list[tuple[int, bool, StepUpdate | None]]) -> StepResult:
        """Commit every row's cache slots; the finished rows leave."""
        self.cache.commit([n for n, _, _ in outcome])
        leaving = [i for i, (_, done, _) in enumerate(outcome) if done]
        out = StepResult(finished=[(rows[i].rid, rows[i].generation()) for i in leaving])
        if self.events:
            out.updates = [u for _, _, u in outcome if u is not None]
        if leaving:
            self._remove(leaving)
        return out


def fill_after_eos(block: Tensor, generated: Tensor, mask_id: int, eos: set[int]) -> Tensor:
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


class ARScheduler(Scheduler):
    """Continuous batching of an AR checkpoint (the parent baseline): a row's prompt is prefilled causally, then
    each step picks every row's next token from its last logit and forwards that token [a, 1]. Counting as
    `engine.ar_generate`: the prefill's forward yields the first token, so TPF is exactly 1."""

    def __init__(self, model, *, max_rows: int, max_len: int, events: bool = True):
        super().__init__(model, mask_id=-1, block_size=1, max_rows=max_rows, max_len=max_len, events=events)
        self.shift, self.causal_clean = True, True  # the prefill is token-causal and yields the next token's logit
        self.pad_id = 0

    def make_row(self, rid, prompt, cfg, *, eos_ids, generator=None, stop=(), decode=None) -> Row:
        check_prompts([prompt], self.vocab)
        if stop and decode is None:
            raise ValueError("stop strings need a decode function (token ids -> text)")
        cfg = dataclasses.replace(cfg, block_size=1)  # one token per step
        L = check_context(self.model, len(prompt), cfg, ar=True)
        canvas = torch.full((L,), self.pad_id, dtype=torch.long, device=self.device)  # unwritten: never read
        canvas[:len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        row = Row(rid, list(prompt), cfg, cfg.decode_rule, frozenset() if cfg.ignore_eos else frozenset(eos_ids),
                  -1, canvas, 0, generator, tuple(stop), decode)
        row.block = len(prompt)  # the next position to write (the base prefill covers the whole prompt)
        row.forwards = 1  # the prefill forward counts (it yields the first token)
        row.carry = torch.zeros(self.vocab, device=self.device)
        return row

    def _step(self, rows: list[Row]) -> StepResult:
        logits = torch.stack([r.carry for r in rows])[:, None]  # [a, 1, V]
        tok, conf = self._choose(logits, torch.zeros_like(logits[..., 0], dtype=torch.long), rows)
        out, leaving, pos = StepResult(), [], [r.block for r in rows]
        for i, r in enumerate(rows):
            t = int(tok[i, 0])
            r.canvas[r.block] = t
            r.block += 1
            gen = r.generated(r.block)
            done = (t in r.eos or len(gen) >= r.budget
                    or (bool(r.stop) and find_stop(r.decode(gen), r.stop) is not None))
            if self.events:
                ev = [TokenEvent(pos[i], t, "m2t", float(conf[i, 0]))]
                out.updates.append(StepUpdate(r.rid, r.forwards, pos[i], ev, gen, len(gen), done))
            if done:
                leaving.append(i)
                out.finished.append((r.rid, r.generation()))
        if leaving:
            self._remove(leaving)
        rows = self.rows
        if rows:  # forward the new tokens: their K/V, and the logit of each row's next token
            x = torch.stack([r.canvas[r.block - 1:r.block] for r in rows])  # [a, 1]
            positions = torch.tensor([[r.block - 1] for r in rows], device=self.device)
            logits = self.model(x, positions=positions, mask=self.cache.attn_mask(1), cache=self.cache)
            self.cache.commit(1)
            for i, r in enumerate(rows):
                r.carry = logits[i, -1].float()
                r.forwards += 1
        return out


__all__ = ["ARScheduler", "Scheduler", "StepResult", "alignment", "cache_slack", "check_context", "check_prompts",
           "context_needed", "first_stop", "fill_after_eos"]
