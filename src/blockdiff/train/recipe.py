"""Recipes: a training run as data (a TOML file), parsed into typed dataclasses and validated up front.

A recipe names the starting model, the data, the optimiser settings, the objective and the list of phases.
The Warmup-Stable-Decay block schedule of LLaDA2.0 (docs/design.md 3) is simply a list of phases, each
with its block size, budget and learning rate -- data, not code. Every error names the file, the field and
the allowed range, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OBJECTIVES = ("diffusion", "ar", "sft", "dpo", "rl")  # CPT, AR pretraining, post-training


class RecipeError(ValueError):
    pass


@dataclass
class ModelSection:
    path: str = ""  # HF-format folder of the starting checkpoint (config.json, *.safetensors, tokenizer files)
    mask_token: str = "<|mask|>"  # token added when the tokenizer has no mask token


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # .txt / .jsonl files or folders
    valid: list[str] = field(default_factory=list)  # held-out files for ELBO perplexity (may be empty)
    text_field: str = "text"  # jsonl field holding the document text
    seq_len: int = 256  # L, tokens per packed row
    eos_pad_multiple: int = 0  # pad every document with EOS to a multiple of this many tokens (0 = off)
    cache_dir: str = ""  # tokenised-data cache (default: <run>/../.cache/tokens)
    valid_rows: int = 64  # at most this many held-out rows per evaluation
    # Post-training (sft: chat jsonl with messages; dpo: prompt/chosen/rejected; rl: prompt/answer or ["tasks"])
    pack: bool = False  # sft: pack several conversations per row with document masks
    over_length: str = "drop"  # sft/dpo: conversations longer than seq_len are "drop"ped (counted warning) or an "error"
    system: str = ""  # dpo/rl: system message put before string prompts ("" = none)


@dataclass
class TrainSection:
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    seed: int = 0
    warmup_steps: int = 20  # linear lr warm-up at the start of the run (optimiser steps)
    decay_steps: int = 0  # linear lr decay to min_lr_ratio over the last N steps of the run (0 = none)
    min_lr_ratio: float = 0.1  # lr at the end of decay, as a fraction of the phase lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay (2-D weights only)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    eval_every: int = 50  # evaluate validation ELBO every N steps (and at every phase end)
    save_every: int = 50  # checkpoint every N steps (and at every phase end)
    keep_last: int = 0  # keep only the newest N step checkpoints plus phase-end ones (0 = keep all)
    dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 autocast on CUDA), "float32", "bfloat16"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    threads: int = 0  # torch CPU threads (0 = torch default)


@dataclass
class ObjectiveSection:
    kind: str = "diffusion"  # "diffusion" (BDLM/MDLM on [x_t ; x0]) or "ar" (next-token, for base models)
    weighting: str = "elbo"  # "elbo" (1/t) or "token_mean"
    t_lo: float = 0.001  # mask-ratio bandwidth, lower end
    t_hi: float = 1.0  # mask-ratio bandwidth, upper end
    t_per: str = "sample"  # "sample" or "block"
    complementary: bool = False
    embed_noise: bool = True  # Gaussian noise on masked embeddings early in conversion
    embed_noise_std: float = 0.0  # 0 = derive from the embedding table (see objectives/noise.py)
    embed_noise_frac: float = 0.05  # anneal the noise to zero over this fraction of all steps
    # LLaDA2.1 editing stream (T2T), diffusion and sft: see objectives/noise.py edit_corruption
    t2t_ratio: float = 0.0  # fraction of rows that carry token corruption (0 = off)
    t2t_max_rate: float = 0.25  # per-row corruption rate ~ U(0, this) of the unmasked response tokens
    t2t_weight: float = 1.0  # weight of the T2T loss added to the masked loss
    t2t_keep_weight: float = 1.0  # weight of the keep term (intact visible tokens of edit rows); 0 = corrupted only
    cap: bool = False  # sft: add the CAP entropy term (objectives/cap.py)
    cap_lambda: float = 2.0  # CAP weight lambda
    beta: float = 0.1  # dpo: inverse temperature of the implicit reward
    dpo_sft_weight: float = 0.0  # dpo: weight of an NLL term on the chosen answer (per token; 0 = plain DPO)
    dpo_samples: int = 1  # dpo: Monte Carlo ELBO draws per pair, averaged (variance reduction; K x the compute)
    dpo_answer_only: bool = False  # dpo: ELBO over the answer up to its first EOS, not the EOS padding after it
    # Label alignment and AR-preserving aids (docs/alignment.md). `labels` / `clean_stream` become properties of
    # the checkpoint (config.json `blockdiff`); "" = keep the starting checkpoint's (an AR parent: "same" /
    # "block_causal", LLaDA2's convention). Post-training a converted checkpoint always uses its own.
    labels: str = ""  # "same" (logit i predicts token i, LLaDA2) or "shift" (logit i predicts token i + 1, as AR)
    clean_stream: str = ""  # "block_causal" (LLaDA2) or "causal" (finished blocks encoded as the AR parent does)
    ar_weight: float = 0.0  # weight of the AR next-token loss on the clean stream beside the diffusion loss (0 = off)
    mask_slope: float = 0.0  # position-dependent masking in [0, 1]: later slots of a block masked more (0 = off)
    mask_suffix: float = 0.0  # fraction of blocks masked as a suffix after a random cut, the prefix clean (0 = off)


@dataclass
class RLSection:
    """EBPO (objectives/policy.py) and its rollouts (train/rollout.py); used when [objective] kind = "rl"."""
    prompts_per_step: int = 4  # prompts per rollout
    group_size: int = 4  # G samples per prompt (group-relative advantage)
    temperature: float = 0.8  # rollout sampling temperature (> 0)
    threshold: float = 0.95  # rollout decoder commit threshold
    steps: int = 32  # rollout denoising steps per block
    max_new_tokens: int = 32  # rollout length budget (tokens)
    reward: str = "exact"  # "exact" or "contains" (answer vs the reference)
    minibatches: int = 1  # optimiser steps per rollout
    n_timesteps: int = 2  # N noise levels in the log-ratio
    t_lo: float = 0.1  # stratified range of t_n
    t_hi: float = 1.0
    eps_low: float = 0.2  # clip rho below at 1 - eps_low
    eps_high: float = 0.28  # clip rho above at 1 + eps_high
    tasks: int = 2000  # prompts drawn from the synthetic tasks when data.train = ["tasks"]


@dataclass
class Phase:
    block_size: int  # B for this phase (>= seq_len means MDLM, clean half dropped)
    lr: float  # peak learning rate during this phase
    steps: int = 0  # optimiser steps (give steps or tokens)
    tokens: int = 0  # token budget (rows * seq_len); converted to steps
    name: str = ""


@dataclass
class MergeSection:
    top_k: int = 0  # average the k best checkpoints of the last phase by validation ELBO (0 = off)


@dataclass
class EvalSection:
    tasks: int = 0  # held-out synthetic-task prompts for the report (0 = skip; bundled model only)
    max_new_tokens: int = 32
    threshold: float = 0.95  # LLaDA2.0 threshold for the converted model
    steps: int = 32  # denoising steps per block (quota = B / steps)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    phases: list[Phase] = field(default_factory=list)
    merge: MergeSection = field(default_factory=MergeSection)
    eval: EvalSection = field(default_factory=EvalSection)
    rl: RLSection = field(default_factory=RLSection)
    source: str = "<recipe>"  # file the recipe came from (for messages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.data.seq_len

    def phase_steps(self) -> list[int]:
        return [p.steps if p.steps else math.ceil(p.tokens / self.tokens_per_step) for p in self.phases]

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps())


_SECTIONS = {"model": ModelSection, "data": DataSection, "train": TrainSection, "objective": ObjectiveSection,
             "merge": MergeSection, "eval": EvalSection, "rl": RLSection}


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        kind = fields[name].type  # a string under `from __future__ import annotations`
        if kind in ("int", "float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or (kind == "int" and not float(value).is_integer()):
                raise RecipeError(f"{where}.{name}: expected {kind}, got {value!r}")
            value = int(value) if kind == "int" else float(value)
        elif kind == "bool" and not isinstance(value, bool):
            raise RecipeError(f"{where}.{name}: expected true/false, got {value!r}")
        elif kind == "str" and not isinstance(value, str):
            raise RecipeError(f"{where}.{name}: expected a string, got {value!r}")
        elif kind == "list[str]" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise RecipeError(f"{where}.{name}: expected a list of strings, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required field
        raise RecipeError(f"{where}: {e}") from None


def parse_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    unknown = sorted(set(raw) - set(_SECTIONS) - {"phases"})
    if unknown:
        raise RecipeError(f"{source}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join([*_SECTIONS, 'phases'])}")
    kw = {name: _build(cls, raw.get(name, {}), f"{source}: [{name}]") for name, cls in _SECTIONS.items()}
    phases_raw = raw.get("phases", [])
    if not isinstance(phases_raw, list):
        raise RecipeError(f"{source}: 'phases' must be an array of tables ([[phases]])")
    phases = [_build(Phase, p, f"{source}: [[phases]] #{i + 1}") for i, p in enumerate(phases_raw)]
    recipe = Recipe(**kw, phases=phases, source=source)
    if recipe.objective.kind == "sft" and "complementary" not in raw.get("objective", {}):
        recipe.objective.complementary = True  # LLaDA2.0 SFT default
    validate(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a TOML recipe; `overrides` maps "section.field" to a value (CLI --set), applied before validation.
    Relative paths in [model] and [data] are resolved against the recipe file's folder."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: invalid TOML: {e}") from None
    for name in _SECTIONS:  # checked here: overrides and path resolution below index into these tables
        if name in raw and not isinstance(raw[name], dict):
            raise RecipeError(f"{path}: [{name}]: expected a table, got {type(raw[name]).__name__}")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if not name or section not in _SECTIONS:
            raise RecipeError(f"--set {key}: expected section.field with section in {', '.join(_SECTIONS)}")
        raw.setdefault(section, {})[name] = value
    base = path.parent

    def resolve(p: str) -> str:
        return p if not p or Path(p).is_absolute() else str((base / p).resolve())

    if "model" in raw and isinstance(raw["model"].get("path"), str):
        raw["model"]["path"] = resolve(raw["model"]["path"])
    for key in ("train", "valid"):
        if isinstance(raw.get("data", {}).get(key), list):  # "tasks" names the bundled RL prompts, not a file
            raw["data"][key] = [resolve(p) if isinstance(p, str) and p != "tasks" else p for p in raw["data"][key]]
    if isinstance(raw.get("data", {}).get("cache_dir"), str):
        raw["data"]["cache_dir"] = resolve(raw["data"]["cache_dir"])
    return parse_recipe(raw, source=str(path))


def validate(r: Recipe) -> None:
    s = r.source

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise RecipeError(f"{s}: {msg}")

    need(bool(r.model.path), "[model] path is required (an HF-format folder)")
    need(bool(r.data.train), "[data] train needs at least one file or folder")
    need(r.data.seq_len >= 2, f"[data] seq_len must be >= 2, got {r.data.seq_len}")
    need(r.data.eos_pad_multiple >= 0, f"[data] eos_pad_multiple must be >= 0, got {r.data.eos_pad_multiple}")
    need(r.data.valid_rows >= 1, f"[data] valid_rows must be >= 1, got {r.data.valid_rows}")
    t = r.train
    need(t.batch_size >= 1, f"[train] batch_size must be >= 1, got {t.batch_size}")
    need(t.grad_accum >= 1, f"[train] grad_accum must be >= 1, got {t.grad_accum}")
    need(t.warmup_steps >= 0 and t.decay_steps >= 0, "[train] warmup_steps and decay_steps must be >= 0")
    need(0.0 <= t.min_lr_ratio <= 1.0, f"[train] min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    need(t.weight_decay >= 0, f"[train] weight_decay must be >= 0, got {t.weight_decay}")
    need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "[train] beta1 and beta2 must be in [0, 1)")
    need(t.grad_clip >= 0, f"[train] grad_clip must be >= 0, got {t.grad_clip}")
    need(t.eval_every >= 1 and t.save_every >= 1, "[train] eval_every and save_every must be >= 1")
    need(t.keep_last >= 0, f"[train] keep_last must be >= 0, got {t.keep_last}")
    need(t.dtype in ("auto", "float32", "bfloat16"), f"[train] dtype must be auto, float32 or bfloat16, got {t.dtype!r}")
    o = r.objective
    need(o.kind in OBJECTIVES, f"[objective] kind must be one of {', '.join(OBJECTIVES)}, got {o.kind!r}")
    need(o.weighting in ("elbo", "token_mean"), f"[objective] weighting must be elbo or token_mean, got {o.weighting!r}")
    need(0.0 <= o.t_lo <= o.t_hi <= 1.0, f"[objective] need 0 <= t_lo <= t_hi <= 1, got [{o.t_lo}, {o.t_hi}]")
    need(o.t_per in ("sample", "block"), f"[objective] t_per must be sample or block, got {o.t_per!r}")
    need(o.embed_noise_std >= 0, f"[objective] embed_noise_std must be >= 0, got {o.embed_noise_std}")
    need(0.0 <= o.embed_noise_frac <= 1.0, f"[objective] embed_noise_frac must be in [0, 1], got {o.embed_noise_frac}")
    need(0.0 <= o.t2t_ratio <= 1.0 and 0.0 <= o.t2t_max_rate <= 1.0,
         f"[objective] t2t_ratio and t2t_max_rate must be in [0, 1], got {o.t2t_ratio}, {o.t2t_max_rate}")
    need(o.labels in ("", "same", "shift"), f"[objective] labels must be same or shift, got {o.labels!r}")
    need(o.clean_stream in ("", "block_causal", "causal"),
         f"[objective] clean_stream must be block_causal or causal, got {o.clean_stream!r}")
    need(o.ar_weight >= 0, f"[objective] ar_weight must be >= 0, got {o.ar_weight}")
    need(0.0 <= o.mask_slope <= 1.0, f"[objective] mask_slope must be in [0, 1], got {o.mask_slope}")
    need(0.0 <= o.mask_suffix <= 1.0, f"[objective] mask_suffix must be in [0, 1], got {o.mask_suffix}")
    need(o.ar_weight == 0 and o.mask_slope == 0 and o.mask_suffix == 0 or o.kind in ("diffusion", "sft"),
         "[objective] ar_weight, mask_slope and mask_suffix apply to kind diffusion or sft")
    need(o.dpo_sft_weight >= 0, f"[objective] dpo_sft_weight must be >= 0, got {o.dpo_sft_weight}")
    need(o.dpo_samples >= 1, f"[objective] dpo_samples must be >= 1, got {o.dpo_samples}")
    need(o.t2t_weight >= 0 and o.t2t_keep_weight >= 0 and o.cap_lambda >= 0 and o.beta > 0,
         "[objective] t2t_weight, t2t_keep_weight and cap_lambda must be >= 0 and beta > 0")
    need(o.t2t_ratio == 0 or o.kind in ("diffusion", "sft"), "[objective] t2t_ratio applies to kind diffusion or sft")
    need(not o.cap or o.kind == "sft", "[objective] cap = true needs kind = \"sft\"")
    need(r.data.over_length in ("drop", "error"), f"[data] over_length must be drop or error, got {r.data.over_length!r}")
    q = r.rl
    need(min(q.prompts_per_step, q.group_size, q.steps, q.max_new_tokens, q.minibatches, q.n_timesteps, q.tasks) >= 1,
         "[rl] prompts_per_step, group_size, steps, max_new_tokens, minibatches, n_timesteps, tasks must be >= 1")
    need(q.group_size >= 2 or o.kind != "rl", "[rl] group_size must be >= 2 (group-relative advantages)")
    need(q.temperature > 0 or o.kind != "rl", "[rl] temperature must be > 0 (a group of greedy samples is identical)")
    need(q.reward in ("exact", "contains"), f"[rl] reward must be exact or contains, got {q.reward!r}")
    need(0 < q.t_lo <= q.t_hi <= 1, f"[rl] need 0 < t_lo <= t_hi <= 1, got [{q.t_lo}, {q.t_hi}]")
    need(0 <= q.eps_low < 1 and q.eps_high >= 0, "[rl] need 0 <= eps_low < 1 and eps_high >= 0")
    need(len(r.phases) >= 1, "at least one [[phases]] table is required")
    L = r.data.seq_len
    for i, p in enumerate(r.phases):
        where = f"[[phases]] #{i + 1}{' (' + p.name + ')' if p.name else ''}"
        need(p.lr > 0, f"{where}: lr must be > 0, got {p.lr}")
        need((p.steps > 0) != (p.tokens > 0), f"{where}: give exactly one of steps or tokens, and it must be > 0 "
                                             f"(got steps={p.steps}, tokens={p.tokens})")
        need(p.block_size >= 1, f"{where}: block_size must be >= 1, got {p.block_size}")
        need(p.block_size >= L or L % p.block_size == 0,
             f"{where}: block_size {p.block_size} does not divide seq_len {L}; use a divisor of {L} "
             f"(e.g. {', '.join(str(d) for d in _divisors(L)[:8])}) or >= {L} for MDLM")
        if o.kind == "ar":
            need(p.block_size == 1, f"{where}: the ar objective needs block_size = 1, got {p.block_size}")
    need(r.merge.top_k >= 0, f"[merge] top_k must be >= 0, got {r.merge.top_k}")
    need(r.eval.tasks >= 0 and r.eval.max_new_tokens >= 1, "[eval] tasks must be >= 0 and max_new_tokens >= 1")
    need(0.0 <= r.eval.threshold <= 1.0, f"[eval] threshold must be in [0, 1], got {r.eval.threshold}")
    need(r.eval.steps >= 1, f"[eval] steps must be >= 1, got {r.eval.steps}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
