"""What a decode asks for and what it returns: `DecodeConfig` (one decoding setting, its mode naming a rule of
`decode/rules.py`), `Generation` (one finished row), and the streaming records `StepUpdate` / `TokenEvent`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..fields import runtime
from ..model.config import effective_block_size
from .rules import CreditRule, DInferRule, FactorRule, JointRule, Rule, SpecRule, ThresholdRule

# mode -> (rule class, default M2T threshold, default T2T threshold); spec's "threshold" cuts its drafts
MODES: dict[str, tuple[type[Rule] | type[SpecRule], float, float | None]] = {
    "threshold": (ThresholdRule, 0.95, None),  # LLaDA2.0 [code]
    "S": (JointRule, 0.5, 0.0),  # LLaDA2.1 speed mode [paper + code]
    "Q": (JointRule, 0.7, 0.5),  # LLaDA2.1 quality mode [paper + code]
    "joint": (JointRule, 0.7, 0.5),  # LLaDA2.1 with user thresholds (Q defaults)
    "dinfer": (DInferRule, 0.9, None),  # dInfer threshold
    "factor": (FactorRule, 0.0, None),  # Fast-dLLM factor rule (uses `factor`)
    "credit": (CreditRule, 0.9, None),  # dInfer credit decoding + dInfer threshold
    "spec": (SpecRule, 0.0, None),  # lossless self-speculation (decode/spec.py): the checkpoint's AR output
}
DEFAULT_DRAFT_LEN = 3  # spec drafts per forward: chosen from bench/cost.py at batch 1 on a CPU (docs/decoding.md)
MAX_DRAFT_LEN = 32
DEFAULT_DRAFT_COST = 0.4  # cost(8) / cost(1) - 1 at batch 1 on this CPU: d = 3 (bench/results/cost-2026-12-06.json)
DEFAULT_SPEC_TOKENS = 32  # on this CPU a forward costs little more up to ~16-32 query tokens in all (bench/cost.py)


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
    window: int = 0  # block modes: slots fed per forward from the decoded frontier (decode/window.py); 0 = the
    #                  whole block (the official algorithms). Needs labels shift + clean_stream causal
    window_ar: bool = True  # window > 0: always commit the frontier slot (the causal stream's own next token)
    draft_len: int = DEFAULT_DRAFT_LEN  # mode "spec": tokens drafted per forward (0 = plain AR steps)
    draft_cost: float = DEFAULT_DRAFT_COST  # mode "spec": extra cost of a drafting forward over a plain AR step
    #                                        (a fraction of it); a row drafts only while its measured acceptance pays
    #                                        for that (0 = always draft)
    spec_tokens: int = DEFAULT_SPEC_TOKENS  # mode "spec": query tokens one forward may spend on the batch's spec rows;
    #                                         drafts shrink to fit (down to plain AR steps), from bench/cost.py's knee
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
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (0 = whole blocks), got {self.window}")
        if self.draft_cost < 0:
            raise ValueError(f"draft_cost must be >= 0, got {self.draft_cost}")
        if self.spec_tokens < 1:
            raise ValueError(f"spec_tokens must be >= 1, got {self.spec_tokens}")
        if not 0 <= self.draft_len <= MAX_DRAFT_LEN:
            raise ValueError(f"draft_len must be in [0, {MAX_DRAFT_LEN}], got {self.draft_len}")
        if self.repeat_penalty < 0:
            raise ValueError(f"repeat_penalty must be >= 0, got {self.repeat_penalty}")

    def for_model(self, model) -> "DecodeConfig":
        """This setting with its block size resolved against the checkpoint (the one rule: effective_block_size)."""
        if self.block_size is not None:
            return self
        return dataclasses.replace(self, block_size=effective_block_size(info=model.cfg.diffusion))

    @property
    def rule(self) -> str:
        """The rule's name (threshold, joint, dinfer, credit, factor)."""
        return MODES[self.mode][0].name

    @property
    def decode_rule(self) -> Rule | SpecRule:
        """The mode's rule object with this setting's parameters (what the scheduler calls)."""
        return MODES[self.mode][0].from_config(self)

    @property
    def tau_mask(self) -> float:
        return MODES[self.mode][1] if self.threshold is None else self.threshold

    @property
    def tau_edit(self) -> float | None:
        if not MODES[self.mode][0].edits:
            return None
        return MODES[self.mode][2] if self.edit_threshold is None else self.edit_threshold

    @property
    def edits(self) -> bool:
        return MODES[self.mode][0].edits

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
    drafted: int = 0  # mode spec: drafts proposed for verification
    accepted: int = 0  # mode spec: drafts accepted (each forward also commits one token of its own)

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
