"""Decoding rules: which positions of the current block to write at this step. Each rule is a small function,
vectorised over the rows of the batch, that takes the per-position confidence and masks of the block and its own
parameters, and returns bool [b, B] masks of the positions to write:

    threshold_rule(conf, masked, threshold, quota)                        -> m2t
    dinfer_threshold_rule(conf, masked, threshold)                        -> m2t
    factor_rule(conf, masked, factor)                                     -> m2t
    joint_rule(conf, masked, changed, editable, tau_mask, tau_edit, quota) -> (m2t, t2t)

- `conf` [b, B]: probability of the chosen token per position (float32, docs/design.md 6.1);
- `masked` [b, B]: the position still holds [MASK];
- `changed` [b, B]: the chosen token differs from the token the position holds now (joint only);
- `editable` [b, B]: a generated position (never a prompt token): the only place T2T may write (joint only);
- `quota`: fallback commits at this step, an int or a per-row [b, 1] tensor (`DecodeConfig.quota_at`);
- m2t: the positions to unmask (Mask-to-Token); t2t: the positions to re-write (Token-to-Token edit).
Only the joint rule edits; the others unmask only. Each mode of `DecodeConfig` (config.MODES) names one `Rule`
class below; `DecodeConfig.decode_rule` builds the rule object with its parameters, and the scheduler calls every
rule through the same interface (`select`, plus `new_state` / `adjust` for rules that keep per-row state, dInfer
credit). The scheduler itself withholds writes from rows whose forward writes clean K/V and applies the edit-only
pass budget (`max_post_steps`).

Token choice (`choose_tokens`) is separate from the rule: argmax at temperature 0, else a sample after
temperature / top-k / top-p. Logit transforms applied before the choice: dInfer's credit (`credit_update`,
then `credit_adjust`) and the anti-stutter `repeat_penalty_`.

Sources: LLaDA2.0 code (threshold + quota fallback), LLaDA2.1 paper + code (joint threshold, S/Q presets),
dInfer (threshold >= min(tau, c_max - 1e-5), credit), Fast-dLLM (factor rule). docs/design.md 6.2-6.4.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------- token choice
def choose_tokens(logits: Tensor, temperature: float = 0.0, generator: torch.Generator | None = None, *,
                  top_k: int = 0, top_p: float = 1.0) -> tuple[Tensor, Tensor]:
    """logits [b, B, V] -> (token [b, B], confidence [b, B]).

    Temperature 0 = argmax (the official LLaDA2 HF code samples even at temperature 0; we follow the fix later
    adopted by other engines). With temperature > 0 the token is drawn from softmax(logits / T) restricted to the
    top-k tokens and the smallest top-p nucleus. Confidence is always the probability of the chosen token under
    the untempered distribution, so thresholds mean the same thing at every temperature."""
    probs = torch.softmax(logits.float(), dim=-1)
    if temperature <= 0:
        conf, tok = probs.max(dim=-1)
        return tok, conf
    p = sampling_probs(logits, temperature, top_k=top_k, top_p=top_p)
    tok = torch.multinomial(p.view(-1, p.shape[-1]), 1, generator=generator).view(p.shape[:-1])
    return tok, torch.gather(probs, -1, tok[..., None])[..., 0]


def sampling_probs(logits: Tensor, temperature: float, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The distribution a temperature > 0 draw samples from, normalised (float32, same shape as logits):
    softmax(logits / T) restricted to the top-k tokens and the smallest top-p nucleus. `choose_tokens` samples
    from it; speculative sampling (`decode/spec.py`) needs it explicitly for p(x) / q(x)."""
    scaled = logits.float() / temperature
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    p = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sp, idx = p.sort(dim=-1, descending=True)
        # keep a token if the mass before it is < top_p (the most likely token is always kept)
        drop = (sp.cumsum(-1) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter_(-1, idx, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def repeat_penalty_(logits: Tensor, block: Tensor, penalty: float) -> None:
    """Subtract `penalty` from the logit of each position's left neighbour token inside the block, in place
    (logits [b, B, V], block [b, B]). Low M2T thresholds make neighbours copy each other ("stuttering", LLaDA2.1
    report); sglang's joint-threshold decoder offers the same penalty. A masked neighbour penalises [MASK], which is
    never chosen anyway."""
    prev = block[:, :-1, None]  # [b, B-1, 1]
    logits[:, 1:].scatter_add_(-1, prev, torch.full(prev.shape, -penalty, dtype=logits.dtype, device=logits.device))


def credit_adjust(logits: Tensor, credit: Tensor, weight: float = 0.7) -> Tensor:
    """dInfer credit decoding: decide on logits + weight * log(1 + C), C [b, B, V] the per-position credit."""
    return logits + weight * torch.log1p(credit)


def credit_update(credit: Tensor, logits: Tensor, decay: float = 0.8, power: float = 0.2) -> None:
    """C <- decay * C + p_top1 ** power at each position's argmax token (dInfer), in place."""
    probs = torch.softmax(logits.float(), dim=-1)
    p1, t1 = probs.max(dim=-1)
    credit.mul_(decay)
    credit.scatter_add_(-1, t1[..., None], (p1 ** power)[..., None])


# ----------------------------------------------------------------------------------------------- helpers
def _rank(conf: Tensor) -> Tensor:
    """Rank of each entry in its row by descending confidence (ties: lower index first)."""
    order = conf.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return rank


def _masked_conf(conf: Tensor, masked: Tensor) -> Tensor:
    return torch.where(masked, conf, torch.full_like(conf, -1.0))


# ----------------------------------------------------------------------------------------------- rules
def threshold_rule(conf: Tensor, masked: Tensor, threshold: float, quota) -> Tensor:
    """LLaDA2.0 threshold decoding with fallback [code]: commit every masked position with confidence >
    threshold; if fewer than `quota` pass, commit the `quota` most confident masked positions instead
    (guaranteed progress). `quota` is an int or a per-row [b, 1] tensor: the official per-step schedule
    (`DecodeConfig.quota_at`: floor(B / steps), one more on the first B % steps steps; 1 at B = 32, steps = 32)."""
    conf = _masked_conf(conf, masked)
    passing = masked & (conf > threshold)
    k = torch.where(passing.sum(-1, keepdim=True) < quota, quota, 0)  # [b, 1]
    return passing | ((_rank(conf) < k) & masked)


def joint_rule(conf: Tensor, masked: Tensor, changed: Tensor, editable: Tensor, tau_mask: float,
               tau_edit: float, quota=1) -> tuple[Tensor, Tensor]:
    """LLaDA2.1 joint threshold decoding [paper + code], one step:
    M2T: masked positions with p(v_i) > tau_mask are unmasked (fallback: the `quota` most confident, 1 by default);
    T2T: unmasked generated positions whose token differs from v_i with p(v_i) > tau_edit are replaced by v_i, in
    the same step. tau_edit = 0 edits whenever the argmax differs. Prompt tokens are never editable."""
    m2t = threshold_rule(conf, masked, tau_mask, quota)
    t2t = editable & ~masked & changed & (conf > tau_edit)
    return m2t, t2t


def dinfer_threshold_rule(conf: Tensor, masked: Tensor, threshold: float) -> Tensor:
    """dInfer threshold: commit masked positions with confidence >= min(tau, c_max - 1e-5), c_max the row's best
    masked confidence, so the top-1 always commits (no separate fallback needed)."""
    conf = _masked_conf(conf, masked)
    cmax = conf.max(dim=-1, keepdim=True).values
    return masked & (conf >= torch.clamp(cmax - 1e-5, max=threshold))


def factor_rule(conf: Tensor, masked: Tensor, factor: float) -> Tensor:
    """Fast-dLLM factor rule: sort masked confidences c(1) >= c(2) >= ...; commit the longest prefix with
    (n + 1)(1 - c(n)) < f (n = 1-based rank); rank 1 always commits."""
    conf = _masked_conf(conf, masked)
    sorted_c, order = conf.sort(dim=-1, descending=True, stable=True)
    n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=sorted_c.dtype)
    ok = ((n + 1) * (1 - sorted_c) < factor) & (sorted_c >= 0)
    ok[..., 0] = sorted_c[..., 0] >= 0  # rank 1 always (when anything is masked)
    prefix = ok.long().cumprod(dim=-1).bool()  # longest prefix where the condition holds
    commit = torch.zeros_like(masked)
    commit.scatter_(-1, order, prefix)
    return commit & masked


# ----------------------------------------------------------------------------------------------- rule objects
@dataclass(frozen=True)
class Rule(ABC):
    """A decoding rule with its parameters. Frozen: rows whose rules are equal share one vectorised call.
    `select(conf, masked, changed, editable, quota)` returns (m2t, t2t) bool [b, B] (t2t None for unmask-only
    rules); `adjust(logits, state)` transforms the logits before the token choice with per-row state [b, B, V]
    from `new_state` (None for rules without state)."""

    name: ClassVar[str]
    edits: ClassVar[bool] = False  # writes T2T edits (and then finishes a block at a pass that writes nothing)

    @classmethod
    @abstractmethod
    def from_config(cls, cfg) -> "Rule":
        """The rule with the parameters of a DecodeConfig."""

    @abstractmethod
    def select(self, conf: Tensor, masked: Tensor, changed: Tensor, editable: Tensor,
               quota) -> tuple[Tensor, Tensor | None]:
        """Positions to write at this step: (m2t, t2t)."""

    def new_state(self, block_size: int, vocab_size: int, device) -> Tensor | None:
        return None

    def adjust(self, logits: Tensor, state: Tensor | None) -> Tensor:
        return logits


@dataclass(frozen=True)
class ThresholdRule(Rule):
    tau: float
    name: ClassVar[str] = "threshold"

    @classmethod
    def from_config(cls, cfg) -> "ThresholdRule":
        return cls(cfg.tau_mask)

    def select(self, conf, masked, changed, editable, quota):
        return threshold_rule(conf, masked, self.tau, quota), None


@dataclass(frozen=True)
class JointRule(Rule):
    tau: float
    tau_edit: float
    name: ClassVar[str] = "joint"
    edits: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg) -> "JointRule":
        return cls(cfg.tau_mask, cfg.tau_edit)

    def select(self, conf, masked, changed, editable, quota):
        return joint_rule(conf, masked, changed, editable, self.tau, self.tau_edit, quota)


@dataclass(frozen=True)
class DInferRule(ThresholdRule):
    """dInfer's threshold (threshold >= min(tau, c_max - 1e-5)); the same parameter as LLaDA2.0's, another rule."""

    name: ClassVar[str] = "dinfer"

    def select(self, conf, masked, changed, editable, quota):
        return dinfer_threshold_rule(conf, masked, self.tau), None


@dataclass(frozen=True)
class CreditRule(DInferRule):
    """dInfer credit decoding: the dInfer threshold on logits + 0.7 log(1 + C), C accumulated per block."""

    name: ClassVar[str] = "credit"

    def new_state(self, block_size, vocab_size, device):
        return torch.zeros(block_size, vocab_size, device=device)

    def adjust(self, logits, state):
        credit_update(state, logits)
        return credit_adjust(logits, state)


@dataclass(frozen=True)
class FactorRule(Rule):
    factor: float
    name: ClassVar[str] = "factor"

    @classmethod
    def from_config(cls, cfg) -> "FactorRule":
        return cls(cfg.factor)

    def select(self, conf, masked, changed, editable, quota):
        return factor_rule(conf, masked, self.factor), None


@dataclass(frozen=True)
class SpecRule:
    """Mode "spec" (decode/spec.py): not a block rule but the self-speculation's parameters, what
    `DecodeConfig.decode_rule` returns for it. Rows with this rule verify drafts with the causal stream instead of
    unmasking a block."""

    draft_len: int  # drafted tokens per forward (k = draft_len + 1 [MASK] slots)
    tau: float  # drafts are cut at the first one whose probability is below tau
    name: ClassVar[str] = "spec"
    edits: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg) -> "SpecRule":
        return cls(cfg.draft_len, cfg.tau_mask)

    def new_state(self, block_size: int, vocab_size: int, device) -> None:
        return None
