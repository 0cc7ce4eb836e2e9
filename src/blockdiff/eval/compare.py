"""Checkpoints x decoding settings on the same prompts: the one evaluation code path.

`blockdiff eval`, the conversion report (`convert.py`), `bench/convert.py` and `bench/posttrain.py` all decode
through `evaluate_model` and score through `task_accuracy.score`, so a number means the same thing wherever it is
printed. Each checkpoint is decoded with its own kind: greedy AR (KV cache) for an AR checkpoint, the chosen block
modes through the batched engine for a block-diffusion one (`load.Loaded.generate` chooses); unless the modes are
given, those are threshold, S and Q, plus spec where the checkpoint can run it (`task_accuracy.default_modes`).

A result row: `task_accuracy.score`'s record (accuracy, Wilson 95% interval, per task, TPF, tokens/s, forwards)
plus the decoding: `label` (its key), `mode`, `tau_mask` / `tau_edit` and a one-line `decoding` description.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..data.tasks import TaskExample
from .task_accuracy import SPEC, default_modes, score

AR = "AR"  # the label and mode of greedy AR decoding


@dataclass(frozen=True)
class Decoding:
    """One decoding setting: mode "AR" (greedy AR) or a key of decode.config.MODES, with optional thresholds
    (probabilities in [0, 1]; None = the mode's default)."""

    mode: str
    threshold: float | None = None  # M2T threshold
    edit_threshold: float | None = None  # T2T threshold (joint modes)

    @property
    def label(self) -> str:
        """Table key: the mode for default thresholds ("threshold", "S", "Q", "AR"), else e.g. "threshold@0.9",
        "joint@0.7/0.5"."""
        if self.threshold is None and self.edit_threshold is None:
            return self.mode
        return f"{self.mode}@{self.threshold}" + ("" if self.edit_threshold is None else f"/{self.edit_threshold}")


@dataclass
class DecodeSettings:
    """What every decoding of one evaluation shares."""

    modes: tuple[str, ...] | None = None  # block modes for block-diffusion checkpoints (AR ones: greedy AR); None =
    #                                       each checkpoint's task_accuracy.default_modes (spec where it can run)
    max_new_tokens: int = 32  # generation budget per prompt (tokens)
    steps: int = 32  # denoising steps per block
    threshold: float | None = None  # M2T threshold of "threshold" mode (None = the mode's default)
    block_size: int | None = None  # B (tokens); None = each checkpoint's own
    eos_fill: bool = False
    batch_size: int = 1  # prompts per engine call (temperature 0: a row's output does not depend on it)
    temperature: float = 0.0
    seed: int = 0  # sampling seed (temperature > 0)

    def __post_init__(self) -> None:
        from ..decode.engine import MODES

        bad = [m for m in self.modes or () if m not in MODES]
        if bad:
            raise ValueError(f"--modes: unknown {', '.join(bad)}; allowed: {', '.join(MODES)}")
        for name in ("max_new_tokens", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def decodings(self, loaded) -> list[Decoding]:
        """The decodings of one checkpoint (a load.Loaded)."""
        if not loaded.is_diffusion:
            return [Decoding(AR)]
        modes = self.modes if self.modes is not None else default_modes(loaded.model)
        return [Decoding(m, self.threshold if m == "threshold" else None) for m in modes]


def describe(dec: Decoding, cfg, info, settings: DecodeSettings) -> str:
    """One line naming the decoding (the conversion report's wording)."""
    if dec.mode == AR:
        return "greedy AR, KV cache"
    if dec.mode == SPEC:
        cut = f", drafts cut below {cfg.tau_mask}" if cfg.tau_mask > 0 else ""
        return (f"spec (draft_len {cfg.draft_len}{cut}; lossless: the checkpoint's own AR output), labels "
                f"{info.labels}, clean stream {info.clean_stream}, KV cache")
    desc = f"threshold {cfg.tau_mask}" if cfg.rule == "threshold" and dec.mode == "threshold" else (
        f"{dec.mode} (M2T {cfg.tau_mask}, T2T {cfg.tau_edit})" if cfg.edits else f"{dec.mode} {cfg.tau_mask}")
    fill = ", EOS fill" if settings.eos_fill else ""
    return f"{desc}, B={cfg.block_size}, steps={settings.steps}, labels {info.labels}{fill}, block KV cache"


def run_decoding(loaded, examples: Sequence[TaskExample], dec: Decoding, settings: DecodeSettings, *,
                 encode: Callable[[TaskExample], list[int]] | None = None,
                 output_text: Callable[[list[int]], str] | None = None) -> dict:
    """Decode every example with one setting (batches of settings.batch_size) and score it."""
    tok = loaded.tokenizer
    encode = encode or (lambda ex: tok.encode(ex.prompt))
    output_text = output_text or tok.decode
    if dec.mode == AR:
        cfg = loaded.decode_config(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
    elif not loaded.is_diffusion:
        raise ValueError(f"{loaded.path}: an AR checkpoint cannot decode with block mode {dec.mode!r}")
    else:
        cfg = loaded.decode_config(mode=dec.mode, block_size=settings.block_size, steps=settings.steps,
                                   max_new_tokens=settings.max_new_tokens, threshold=dec.threshold,
                                   edit_threshold=dec.edit_threshold, eos_fill=settings.eos_fill,
                                   temperature=settings.temperature)
    gen = torch.Generator().manual_seed(settings.seed) if settings.temperature > 0 else None
    prompts = [encode(ex) for ex in examples]
    gens: list = []
    seconds = 0.0
    bs = settings.batch_size
    for i in range(0, len(prompts), bs):
        t0 = time.perf_counter()
        gens += loaded.generate(prompts[i:i + bs], cfg, ar=dec.mode == AR, generator=gen)
        seconds += time.perf_counter() - t0
    res = score(examples, [output_text(g.tokens) for g in gens], gens, seconds)
    return res | {"label": dec.label, "mode": dec.mode, "tau_mask": None if dec.mode == AR else cfg.tau_mask,
                  "tau_edit": None if dec.mode == AR else cfg.tau_edit,
                  "decoding": describe(dec, cfg, loaded.info, settings)}


def evaluate_model(model, examples: Sequence[TaskExample], settings: DecodeSettings,
                   decodings: Sequence[Decoding] | None = None, **hooks) -> dict[str, dict]:
    """{label: result} for one checkpoint (a folder or a load.Loaded): its own kind's decodings from `settings`
    unless `decodings` are given. `hooks`: run_decoding's `encode` / `output_text` (e.g. a chat template)."""
    from ..load import Loaded, load_checkpoint

    loaded = model if isinstance(model, Loaded) else load_checkpoint(model)
    decs = list(decodings) if decodings is not None else settings.decodings(loaded)
    return {d.label: run_decoding(loaded, examples, d, settings, **hooks) for d in decs}


@dataclass
class Comparison:
    """Several checkpoints side by side on the same prompts: rows in order (model, then decoding)."""

    prompts: dict  # how the prompts were drawn: split, n, seed, tasks
    settings: dict
    models: list[dict] = field(default_factory=list)  # {"name", "folder", "kind", "rows": {label: result}}
    sweeps: list[dict] = field(default_factory=list)  # frontier points, see eval/frontier.py

    def as_json(self) -> dict:
        return {"prompts": self.prompts, "settings": self.settings, "models": self.models, "sweeps": self.sweeps}


def chat_hooks(loaded) -> dict:
    """run_decoding's hooks for chat prompts: the user message rendered with the checkpoint's own chat template
    (generation header included), and the answer read back without the template's end-of-turn markers."""
    from ..data.chat_template import ChatTemplate, answer_text, encode_prompt, user_turn

    template = ChatTemplate(loaded.tokenizer)
    return {"encode": lambda ex: encode_prompt(user_turn(ex.prompt), loaded.tokenizer, template),
            "output_text": lambda ids: answer_text(loaded.tokenizer, ids)}


def agreement(outputs: Sequence[str], reference: Sequence[str]) -> float:
    """Fraction of prompts whose output text equals the reference's (e.g. the parent's greedy AR output)."""
    if len(outputs) != len(reference) or not outputs:
        raise ValueError(f"{len(outputs)} outputs against {len(reference)} reference outputs")
    return sum(a == b for a, b in zip(outputs, reference)) / len(outputs)


def compare(models: Sequence[tuple[str, str | Path]], examples: Sequence[TaskExample], settings: DecodeSettings,
            *, prompts_info: dict | None = None, progress: Callable[[str], None] | None = None,
            chat: bool = False, ppl: Sequence[tuple[list[int], list[int]]] | None = None,
            ppl_samples: int = 8) -> Comparison:
    """Evaluate `models` [(name, folder)] on the same `examples`, each with its own kind of decoding.

    chat: prompts are user messages, rendered with each checkpoint's chat template (`chat_hooks`).
    Every row gets `agree`: the fraction of its outputs equal to the first model's first row (the reference,
    usually the parent's greedy AR). ppl: (context, continuation) token pairs (e.g. the parent's own held-out
    answers); each model gets `ppl` = {"ar": exact next-token perplexity of the continuations (for a block-diffusion
    checkpoint with shifted labels and a causal clean stream: its AR stream), "elbo": the block-diffusion bound's
    perplexity (`ppl_samples` noisings; block-diffusion checkpoints only)}."""
    from ..load import load_checkpoint

    out = Comparison(prompts_info or {"n": len(examples)}, asdict(settings))
    reference: list[str] | None = None
    for name, folder in models:
        loaded = load_checkpoint(folder)
        hooks = chat_hooks(loaded) if chat else {}
        rows = {}
        for dec in settings.decodings(loaded):
            r = rows[dec.label] = run_decoding(loaded, examples, dec, settings, **hooks)
            if reference is None:
                reference = r["outputs"]
                out.prompts["reference"] = f"{name} {dec.label}"
            r["agree"] = agreement(r["outputs"], reference)
            if progress:
                progress(f"{name} {dec.label}: accuracy {r['accuracy']:.3f} {r['ci95']}, agree {r['agree']:.3f}, "
                         f"TPF {r['tpf']:.2f}, {r['tps']:.1f} tokens/s")
        entry = {"name": name, "folder": str(folder), "kind": "block diffusion" if loaded.is_diffusion else "AR",
                 "rows": rows}
        if ppl:
            entry["ppl"] = perplexities(loaded, ppl, samples=ppl_samples)
            if progress:
                progress(f"{name} perplexity: {entry['ppl']}")
        out.models.append(entry)
    return out


def perplexities(loaded, requests: Sequence[tuple[list[int], list[int]]], *, samples: int = 8) -> dict:
    """exp(mean NLL per continuation token): exact AR (the causal stream) and, for a block-diffusion checkpoint,
    its ELBO bound (an upper bound on its perplexity in expectation)."""
    import math

    from .likelihood import ar_loglikelihood, elbo_loglikelihood

    n = sum(len(c) for _, c in requests)
    res = {"tokens": n}
    spec_ok = True
    if loaded.is_diffusion:
        from ..decode.spec import check_spec_model

        try:
            check_spec_model(loaded.model)
        except ValueError:
            spec_ok = False  # no AR stream (labels "same" or a block-causal clean stream)
    if spec_ok:
        res["ar"] = round(math.exp(-sum(r.logprob for r in ar_loglikelihood(loaded.model, requests)) / n), 4)
    if loaded.is_diffusion:
        lls = elbo_loglikelihood(loaded.model, requests, samples=samples, seed=0)
        res["elbo"] = round(math.exp(-sum(r.logprob for r in lls) / n), 4)
    return res


def format_markdown(c: Comparison | dict, title: str = "blockdiff eval") -> str:
    """The side-by-side table: per model and decoding, accuracy with its 95% interval, per-task accuracy, TPF,
    tokens/s, forwards; then per-task intervals and TPF."""
    d = c.as_json() if isinstance(c, Comparison) else c
    rows = [(m["name"], r) for m in d["models"] for r in m["rows"].values()]
    if not rows:
        return f"# {title}\n\n(no models)\n"
    tasks = list(rows[0][1]["per_task"])
    p, s = d["prompts"], d["settings"]
    head = (f"{p.get('n')} {p.get('split', 'heldout')} prompts (seed {p.get('seed', '?')}), max {s['max_new_tokens']} "
            f"new tokens, batch {s['batch_size']}, temperature {s['temperature']}")
    lines = [f"# {title}", "", head, "",
             "| model | decoding | accuracy | 95% CI | " + " | ".join(tasks) + " | agree | TPF | tokens/s | forwards |",
             "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    for name, r in rows:
        per = " | ".join(f"{r['per_task'].get(k, 0.0):.3f}" for k in tasks)
        lo, hi = r["ci95"]
        agree = f"{r['agree']:.3f}" if "agree" in r else ""
        lines.append(f"| {name} | {r['decoding']} | {r['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {per} | {agree} | "
                     f"{r['tpf']:.2f} | {r['tps']:.1f} | {r['forwards']} |")
    lines += ["", "Per task: accuracy [95% CI] / TPF", "", "| model | decoding | " + " | ".join(tasks) + " |",
              "|---|---|" + "---|" * len(tasks)]
    for name, r in rows:
        cells = [f"{r['per_task'][k]:.2f} [{r['ci95_per_task'][k][0]:.2f}, {r['ci95_per_task'][k][1]:.2f}] / "
                 f"{r['tpf_per_task'][k]:.2f}" for k in tasks]
        lines.append(f"| {name} | {r['label']} | " + " | ".join(cells) + " |")
    if p.get("reference"):
        lines += ["", f"agree: fraction of outputs identical to {p['reference']}'s."]
    if any("ppl" in m for m in d["models"]):
        lines += ["", "Held-out perplexity (per continuation token; ar = exact next-token, elbo = the block-diffusion "
                  "bound)", "", "| model | tokens | ar | elbo |", "|---|---|---|---|"]
        for m in d["models"]:
            if "ppl" in m:
                q = m["ppl"]
                lines.append(f"| {m['name']} | {q['tokens']} | {q.get('ar', '')} | {q.get('elbo', '')} |")
    if d.get("sweeps"):
        lines += ["", "## Frontier sweep (accuracy vs TPF)", "", "| model | sweep | M2T | T2T | accuracy | 95% CI | TPF |",
                  "|---|---|---|---|---|---|---|"]
        for sw in d["sweeps"]:
            for pt in sw["points"]:
                lines.append(f"| {sw['model']} | {sw['kind']} | {pt['tau_mask']} | "
                             f"{'' if pt['tau_edit'] is None else pt['tau_edit']} | {pt['accuracy']:.3f} | "
                             f"[{pt['ci95'][0]:.3f}, {pt['ci95'][1]:.3f}] | {pt['tpf']:.2f} |")
    return "\n".join(lines) + "\n"
