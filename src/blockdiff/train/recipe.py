"""Recipes: a training run as data (a TOML file), parsed into typed dataclasses and validated up front.

A recipe names the starting model, the data, the optimiser settings, the task and its objective's settings, and
the list of phases. Each TOML section *is* the config dataclass of the code that reads it (as torchtitan's job
config is), so every field, its default, its unit and its check are stated once, on that class:

    [model] [data] [train] [objective] [merge] [eval] [[phases]]   this file (the run and the task choice)
    [diffusion]  objectives/diffusion.py DiffusionLossConfig       kinds diffusion, sft
    [noise]      objectives/noise.py EmbedNoiseConfig              kind diffusion
    [cap]        objectives/cap.py CAPConfig                       kind sft (lam > 0 turns CAP on)
    [dpo]        objectives/preference.py DPOConfig                kind dpo
    [rollout]    train/rollout.py RolloutConfig                    kind rl ([rollout.decode]: decode/config.py DecodeConfig)
    [ebpo]       objectives/policy.py EBPOConfig                   kind rl
    [parallel]   train/parallel.py ParallelConfig                  FSDP2, activation checkpointing, compile (torchrun)
    [adapter]    model/mask_adapter.py AdapterConfig               mask-only LoRA over a frozen parent (kinds diffusion, sft, dpo, rl)

Fields the run fills from the checkpoint or the phase (the [MASK] id, the block size, the label alignment) are
marked `fields.runtime` and refused here. A section the chosen kind does not read is refused too (it would be
silently ignored). The Warmup-Stable-Decay block schedule of LLaDA2.0 (docs/design.md 3) is simply the list of
phases, each with its block size, budget and learning rate -- data, not code. Every error names the file, the
section and the field, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.post_data import OVER_LENGTH
from ..fields import is_runtime
from ..model.config import CLEAN_STREAMS, LABELS
from ..model.mask_adapter import AdapterConfig
from ..objectives.cap import CAPConfig
from ..objectives.diffusion import DiffusionLossConfig
from ..objectives.noise import EmbedNoiseConfig
from ..objectives.policy import EBPOConfig
from ..objectives.preference import DPOConfig
from .parallel import ParallelConfig
from .rollout import RolloutConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli (a dependency there only)
    import tomli as tomllib

OBJECTIVES = ("diffusion", "ar", "sft", "dpo", "rl")  # CPT, AR pretraining, post-training
TRAINABLE = ("all", "mask_embedding")  # [train] trainable: which parameters a run updates (train/optim.py)
# The objective sections each kind reads (train/tasks.py builds its objective from exactly these).
KIND_SECTIONS: dict[str, tuple[str, ...]] = {
    "diffusion": ("diffusion", "noise"),
    "ar": (),
    "sft": ("diffusion", "cap"),
    "dpo": ("dpo",),
    "rl": ("rollout", "ebpo"),
}
# Defaults a kind changes: LLaDA2.0 SFT trains complementary masks.
KIND_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {"sft": {"diffusion": {"complementary": True}}}


class RecipeError(ValueError):
    pass


@dataclass
class ModelSection:
    path: str = ""  # HF-format folder of the starting checkpoint (config.json, *.safetensors, tokenizer files)
    mask_token: str = "<|mask|>"  # token string added when the tokenizer has no mask token
    # Block size (tokens) the result records as its own (config.json blockdiff.block_size), the default B of the
    # block decoders (threshold, S, Q, ...); 0 = the block size of the phase just trained. Set it when the last
    # phase trains a block size other than the one to decode with (recipes/tiny_spec_mask_embed.toml trains B = 4
    # spec drafts and keeps B = 32 for the block modes).
    decode_block_size: int = 0

    def __post_init__(self) -> None:
        if self.decode_block_size < 0:
            raise ValueError(f"decode_block_size must be >= 0 (0 = the trained phase's), got {self.decode_block_size}")

    def recorded_block_size(self, trained: int) -> int:
        """The block size a checkpoint of a phase that trains `trained` records."""
        return self.decode_block_size or trained


@dataclass
class DataSection:
    # Files (.txt .jsonl .json .parquet .arrow), folders, globs ("corpus/*.parquet") or datasets saved with
    # `datasets`' save_to_disk (docs/data.md; data/sources.py)
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)  # held-out sources for ELBO perplexity (may be empty)
    text_field: str = "text"  # field (jsonl key, table column) holding the document text
    # Chat messages field: conversion/ar render its rows with the checkpoint's chat template into documents (instead
    # of reading text_field); sft reads its conversations from it ("" = "messages")
    messages_field: str = ""
    split: str = "train"  # the split `train` reads from a saved DatasetDict
    valid_split: str = "validation"  # the split `valid` reads from a saved DatasetDict
    seq_len: int = 256  # L, tokens per packed row
    eos_pad_multiple: int = 0  # pad every document with EOS to a multiple of this many tokens (0 = off)
    cache_dir: str = ""  # tokenised-data cache folder ("" = the user cache, train/tasks.py default_cache_dir)
    valid_rows: int = 64  # at most this many held-out rows per evaluation
    # Post-training (sft: chat jsonl with messages; dpo: prompt/chosen/rejected; rl: prompt/answer or ["tasks"])
    pack: bool = False  # sft: pack several conversations per row with document masks
    over_length: str = "drop"  # sft/dpo: conversations longer than seq_len are "drop"ped (counted warning) or an "error"
    system: str = ""  # dpo/rl: system message put before string prompts ("" = none)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.eos_pad_multiple < 0:
            raise ValueError(f"eos_pad_multiple must be >= 0, got {self.eos_pad_multiple}")
        if self.valid_rows < 1:
            raise ValueError(f"valid_rows must be >= 1, got {self.valid_rows}")
        if self.over_length not in OVER_LENGTH:
            raise ValueError(f"over_length must be {' or '.join(OVER_LENGTH)}, got {self.over_length!r}")
        if not self.text_field:
            raise ValueError("text_field must name a field (\"text\" by default)")


@dataclass
class TrainSection:
    batch_size: int = 8  # rows per micro-batch per rank (global batch = batch_size x grad_accum x ranks)
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
    device: str = "auto"  # "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N"
    threads: int = 0  # torch CPU threads (0 = torch's default, one per core; see blockdiff/machine.py under load)
    # "all", or "mask_embedding": only the [MASK] token's embedding row is updated (train/optim.py
    # apply_trainable); the causal stream never reads it, so the checkpoint's AR output stays bit-identical
    trainable: str = "all"

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.eval_every < 1 or self.save_every < 1:
            raise ValueError("eval_every and save_every must be >= 1")
        if self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {self.keep_last}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = torch's default), got {self.threads}")


@dataclass
class ObjectiveSection:
    """Which task the run is (train/tasks.py) and, for conversion, the label alignment the checkpoint gets."""

    kind: str = "diffusion"  # one of OBJECTIVES: "diffusion" (CPT / conversion), "ar" (next-token), sft, dpo, rl
    # Label alignment (docs/alignment.md). `labels` / `clean_stream` become properties of the checkpoint
    # (config.json `blockdiff`); "" = keep the starting checkpoint's (an AR parent: "same" / "block_causal",
    # LLaDA2's convention). Post-training a converted checkpoint always uses its own.
    labels: str = ""  # "same" (logit i predicts token i, LLaDA2) or "shift" (logit i predicts token i + 1, as AR)
    clean_stream: str = ""  # "block_causal" (LLaDA2) or "causal" (finished blocks encoded as the AR parent does)

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"kind must be one of {', '.join(OBJECTIVES)}, got {self.kind!r}")
        if self.labels not in ("", *LABELS):
            raise ValueError(f"labels must be {' or '.join(LABELS)}, got {self.labels!r}")
        if self.clean_stream not in ("", *CLEAN_STREAMS):
            raise ValueError(f"clean_stream must be {' or '.join(CLEAN_STREAMS)}, got {self.clean_stream!r}")


@dataclass
class Phase:
    block_size: int  # B for this phase (>= seq_len means MDLM over the row; model.config.effective_block_size)
    lr: float  # peak learning rate during this phase
    steps: int = 0  # optimiser steps (give steps or tokens)
    tokens: int = 0  # token budget (rows * seq_len); converted to steps
    name: str = ""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if (self.steps > 0) == (self.tokens > 0) or self.steps < 0 or self.tokens < 0:
            raise ValueError(f"give exactly one of steps or tokens, and it must be > 0 "
                             f"(got steps={self.steps}, tokens={self.tokens})")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


@dataclass
class MergeSection:
    top_k: int = 0  # average the k best checkpoints of the last phase by validation ELBO (0 = off)

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class EvalSection:
    """The conversion report's task accuracy (parent vs converted, threshold / S / Q decoding)."""

    tasks: int = 0  # held-out synthetic-task prompts for the report (0 = skip; bundled model only)
    max_new_tokens: int = 32  # generation budget per prompt (tokens)
    steps: int = 32  # denoising steps per block (DecodeConfig.steps)
    threshold: float | None = None  # threshold mode's M2T threshold; None = the mode's default (decode.config.MODES)
    # The evaluation's time, held to this share of the training's wall time (never below convert.EVAL_FLOOR_S): one
    # prompt of each model is timed first and as many prompts as fit are evaluated (all `tasks` when they do; the
    # report says how many). 0 = no limit.
    time_share: float = 0.5

    def __post_init__(self) -> None:
        if self.tasks < 0:
            raise ValueError(f"tasks must be >= 0, got {self.tasks}")
        if self.time_share < 0:
            raise ValueError(f"time_share must be >= 0 (0 = no limit), got {self.time_share}")
        from ..decode.engine import DecodeConfig  # its checks are the ones that apply

        DecodeConfig(max_new_tokens=self.max_new_tokens, steps=self.steps, threshold=self.threshold)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    diffusion: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    noise: EmbedNoiseConfig = field(default_factory=EmbedNoiseConfig)
    cap: CAPConfig = field(default_factory=CAPConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ebpo: EBPOConfig = field(default_factory=EBPOConfig)
    phases: list[Phase] = field(default_factory=list)
    merge: MergeSection = field(default_factory=MergeSection)
    eval: EvalSection = field(default_factory=EvalSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    source: str = "<recipe>"  # file the recipe came from (for messages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        # global: [train] batch_size is per rank, so a step is batch_size x grad_accum x ranks rows
        return self.train.batch_size * self.train.grad_accum * self.parallel.ranks * self.data.seq_len

    def phase_steps(self) -> list[int]:
        return [p.steps if p.steps else math.ceil(p.tokens / self.tokens_per_step) for p in self.phases]

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps())


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Recipe) if f.name not in ("phases", "source")}
# Fields of recipes written before the sections above were split out: where each one lives now.
MOVED = {
    **{("objective", n): f"[diffusion] {n}" for n in (
        "weighting", "t_per", "complementary", "t2t_ratio", "t2t_max_rate", "t2t_weight", "t2t_keep_weight",
        "ar_weight", "mask_slope", "mask_suffix")},
    ("objective", "t_lo"): "[diffusion] t_lo (kind diffusion / sft) or [dpo] t_lo (kind dpo)",
    ("objective", "t_hi"): "[diffusion] t_hi (kind diffusion / sft) or [dpo] t_hi (kind dpo)",
    ("objective", "embed_noise"): "[noise] enabled", ("objective", "embed_noise_std"): "[noise] std",
    ("objective", "embed_noise_frac"): "[noise] frac", ("objective", "cap"): "[cap] lam (> 0 turns CAP on; 2.0 is usual)",
    ("objective", "cap_lambda"): "[cap] lam", ("objective", "beta"): "[dpo] beta",
    ("objective", "dpo_sft_weight"): "[dpo] sft_weight", ("objective", "dpo_samples"): "[dpo] samples",
    ("objective", "dpo_answer_only"): "[dpo] answer_only",
    **{("rl", n): f"[rollout] {n}" for n in ("prompts_per_step", "group_size", "reward", "minibatches", "tasks")},
    **{("rl", n): f"[rollout.decode] {n}" for n in ("temperature", "threshold", "steps", "max_new_tokens")},
    **{("rl", n): f"[ebpo] {n}" for n in ("n_timesteps", "t_lo", "t_hi", "eps_low", "eps_high")},
}


def _nested(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())


def _coerce(kind: str, value: Any, where: str) -> Any:
    """Check a TOML value against a field's annotation (a string under `from __future__ import annotations`)."""
    optional = kind.endswith(" | None")
    kind = kind.removesuffix(" | None")
    if optional and value is None:
        return None
    if kind in ("int", "float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or (kind == "int" and not float(value).is_integer()):
            raise RecipeError(f"{where}: expected {kind}, got {value!r}")
        return int(value) if kind == "int" else float(value)
    if kind == "bool" and not isinstance(value, bool):
        raise RecipeError(f"{where}: expected true/false, got {value!r}")
    if kind == "str" and not isinstance(value, str):
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    if kind == "list[str]" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise RecipeError(f"{where}: expected a list of strings, got {value!r}")
    return value


def _build(cls, raw: Any, where: str, section: str = "", base: Any = None, label: str | None = None):
    """`cls` from a TOML table: unknown and run-time fields refused, types checked, nested tables (a field whose
    default is a dataclass, e.g. [rollout.decode]) built the same way over their default; the class's own
    checks (`__post_init__`) run here and their message is prefixed with the section (or `label`: ...)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if not is_runtime(f)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        moved = [f"{n} is now {MOVED[section, n]}" for n in unknown if (section, n) in MOVED]
        if moved:
            raise RecipeError(f"{where}: {'; '.join(moved)} (the recipe format gave each objective its own section, "
                              "see docs/cli.md, \"Recipes\")")
        runtime = [n for n in unknown if n in {f.name for f in dataclasses.fields(cls)}]
        if runtime:
            raise RecipeError(f"{where}: {', '.join(runtime)} is set by the run (from the checkpoint or the phase), "
                              "not by a recipe")
        raise RecipeError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    kwargs = {}
    if base is not None:
        kwargs = {n: getattr(base, n) for n in fields}
    for name, value in raw.items():
        f = fields[name]
        if _nested(f):
            sub_base = kwargs.get(name) or f.default_factory()
            kwargs[name] = _build(type(sub_base), value, f"{where.removesuffix(']')}.{name}]", f"{section}.{name}",
                                  sub_base)
        else:
            kwargs[name] = _coerce(f.type, value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required field
        raise RecipeError(f"{where}: {e}") from None
    except ValueError as e:  # the class's own checks
        raise RecipeError(f"{label}: {e}" if label else f"{where} {e}") from None


def parse_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    unknown = sorted(set(raw) - set(SECTIONS) - {"phases"})
    if unknown:
        if "rl" in unknown:
            raise RecipeError(f"{source}: [rl] was split into [rollout], [rollout.decode] and [ebpo]: "
                              + "; ".join(f"{n} is now {MOVED['rl', n]}" for n in raw["rl"] if ("rl", n) in MOVED))
        raise RecipeError(f"{source}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join([*SECTIONS, 'phases'])}")
    objective = _build(ObjectiveSection, raw.get("objective", {}), f"{source}: [objective]", "objective")
    kind = objective.kind
    unused = [name for name in set(raw) & {s for ss in KIND_SECTIONS.values() for s in ss}
              if name not in KIND_SECTIONS[kind]]
    if unused:
        users = {n: [k for k, ss in KIND_SECTIONS.items() if n in ss] for n in unused}
        raise RecipeError(f"{source}: " + "; ".join(f"[{n}] is not read by kind {kind!r} (only by "
                                                     f"{', '.join(users[n])})" for n in sorted(unused)))
    kw = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        defaults = KIND_DEFAULTS.get(kind, {}).get(name)
        if defaults and isinstance(table, dict):
            table = {**defaults, **table}
        kw[name] = objective if name == "objective" else _build(cls, table, f"{source}: [{name}]", name)
    phases_raw = raw.get("phases", [])
    if not isinstance(phases_raw, list):
        raise RecipeError(f"{source}: 'phases' must be an array of tables ([[phases]])")
    phases = []
    for i, p in enumerate(phases_raw):
        name = p.get("name") if isinstance(p, dict) and isinstance(p.get("name"), str) else ""
        where = f"{source}: [[phases]] #{i + 1}"
        phases.append(_build(Phase, p, where, label=f"{where}{' (' + name + ')' if name else ''}"))
    recipe = Recipe(**kw, phases=phases, source=source)
    validate(recipe)
    return recipe


def _set(raw: dict, key: str, value: Any, source: Path) -> None:
    """--set section.field=value (also section.sub.field for nested tables such as rollout.decode.temperature, and
    phases.N.field for the N-th [[phases]] table, 1-based as in the error messages)."""
    parts = key.split(".")
    if parts[0] == "phases":
        phases = raw.get("phases")
        n = len(phases) if isinstance(phases, list) else 0
        if len(parts) != 3 or not parts[1].isdigit() or not 1 <= int(parts[1]) <= n:
            raise RecipeError(f"{source}: --set {key}: expected phases.N.field with N in 1..{n} (the recipe's "
                              f"[[phases]] tables, in order)")
        if not isinstance(phases[int(parts[1]) - 1], dict):
            raise RecipeError(f"{source}: --set {key}: [[phases]] #{parts[1]} is not a table")
        phases[int(parts[1]) - 1][parts[2]] = value
        return
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise RecipeError(f"--set {key}: expected section.field with section in {', '.join(SECTIONS)}, "
                          "or phases.N.field")
    table = raw.setdefault(parts[0], {})
    for part in parts[1:-1]:
        if not isinstance(table, dict):
            break
        table = table.setdefault(part, {})
    if not isinstance(table, dict):
        raise RecipeError(f"{source}: --set {key}: {'.'.join(parts[:-1])} is not a table")
    table[parts[-1]] = value


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
    for name in SECTIONS:  # checked here: overrides and path resolution below index into these tables
        if name in raw and not isinstance(raw[name], dict):
            raise RecipeError(f"{path}: [{name}]: expected a table, got {type(raw[name]).__name__}")
    for key, value in (overrides or {}).items():
        _set(raw, key, value, path)
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
    """The checks that involve more than one section (each section checks itself when it is built)."""
    s = r.source

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise RecipeError(f"{s}: {msg}")

    need(bool(r.model.path), "[model] path is required (an HF-format folder)")
    need(bool(r.data.train), "[data] train needs at least one file or folder")
    need(len(r.phases) >= 1, "at least one [[phases]] table is required")
    L = r.data.seq_len
    for i, p in enumerate(r.phases):
        where = f"[[phases]] #{i + 1}{' (' + p.name + ')' if p.name else ''}"
        need(p.block_size >= L or L % p.block_size == 0,
             f"{where}: block_size {p.block_size} does not divide seq_len {L}; use a divisor of {L} "
             f"(e.g. {', '.join(str(d) for d in _divisors(L)[:8])}) or >= {L} for MDLM")
        if r.objective.kind == "ar":
            need(p.block_size == 1, f"{where}: the ar objective needs block_size = 1, got {p.block_size}")
    if r.objective.kind == "ar":
        need(r.train.trainable != "mask_embedding", "[train] trainable = \"mask_embedding\" needs a block-diffusion "
             "objective; kind \"ar\" has no [MASK] token")
        need(r.model.decode_block_size == 0, "[model] decode_block_size is for block-diffusion checkpoints; kind "
             "\"ar\" records none")
    if r.adapter.enabled:
        need(r.objective.kind != "ar", "[adapter] acts only at [MASK] positions; kind \"ar\" has none (train the "
             "weights, without [adapter])")
        need(r.train.trainable == "all", "[adapter] trains the adapter (and its own [MASK] embedding vector: "
             "[adapter] mask_embedding); remove [train] trainable")
        if r.objective.kind in ("diffusion", "sft"):
            need(r.diffusion.ar_weight == 0, "[diffusion] ar_weight trains the clean stream, which a mask-only "
                 "adapter leaves to the parent (its gradient would be zero); set it to 0 with [adapter]")
            need(r.diffusion.t2t_ratio == 0, "[diffusion] t2t_ratio: the editing stream trains predictions at "
                 "real tokens, which a mask-only adapter leaves to the parent; set it to 0 with [adapter] or train "
                 "the weights")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
