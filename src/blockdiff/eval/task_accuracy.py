"""Held-out accuracy of a decoder on the synthetic tasks, with speed numbers measured in the same pass.

`score` turns decoded outputs into the one result record every evaluation reports (the side-by-side tables of
`blockdiff eval`, the conversion report, the benchmarks, the harness check): accuracy with a 95% Wilson interval,
per-task accuracy and interval, TPF (overall and per task), tokens per second and forwards.

Accuracy: exact match of the continuation (cut at EOS) with the task's answer (`data.tasks.is_correct`), or, for
an example that carries its own rule (a `data.real_prompts.CheckedPrompt`: contains, number, runs the code...),
that rule.
Speed: generated tokens (up to and including EOS) per forward (TPF) and per second of decoding wall time (TPS).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from ..data.tasks import TaskExample, is_correct


def score(examples: Sequence[TaskExample], texts: Sequence[str], gens: Sequence, seconds: float) -> dict:
    """The result record of one decoding on `examples`: `texts[i]` is the answer text read from `gens[i]` (a
    decode.engine.Generation: tokens counted for TPF, forwards); `seconds` the wall time of all the decoding."""
    if not examples:
        raise ValueError("no examples to evaluate")
    if not len(examples) == len(texts) == len(gens):
        raise ValueError(f"{len(examples)} examples, {len(texts)} texts and {len(gens)} generations")
    hits: dict[str, list[bool]] = defaultdict(list)
    task_tok: dict[str, int] = defaultdict(int)
    task_fw: dict[str, int] = defaultdict(int)
    samples = []
    oks = []
    for ex, text, g in zip(examples, texts, gens):
        ok = bool(ex.is_correct(text)) if hasattr(ex, "is_correct") else is_correct(ex, text)
        oks.append(ok)
        hits[ex.task].append(ok)
        task_tok[ex.task] += g.n_generated
        task_fw[ex.task] += g.forwards
        if len(samples) < 8:
            samples.append({"prompt": ex.prompt, "answer": ex.answer, "output": text, "correct": ok})
    flat = [h for v in hits.values() for h in v]
    n_tokens, forwards = sum(task_tok.values()), sum(task_fw.values())
    return {
        "n": len(flat),
        "accuracy": sum(flat) / len(flat),
        "ci95": list(wilson_interval(sum(flat), len(flat))),
        "per_task": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "ci95_per_task": {k: list(wilson_interval(sum(v), len(v))) for k, v in sorted(hits.items())},
        "tpf_per_task": {k: task_tok[k] / max(task_fw[k], 1) for k in sorted(hits)},
        "tpf": n_tokens / max(forwards, 1),
        "tps": n_tokens / max(seconds, 1e-9),
        "generated_tokens": n_tokens,
        "forwards": forwards,
        "seconds": seconds,
        "correct": oks,
        "outputs": list(texts),
        "samples": samples,
    }


def evaluate_tasks(examples: Sequence[TaskExample], tokenizer, decode: Callable[[list[int]], object]) -> dict:
    """`decode(prompt_ids) -> Generation`, one prompt at a time. Returns `score`'s record."""
    texts, gens = [], []
    seconds = 0.0
    for ex in examples:
        t0 = time.perf_counter()
        g = decode(tokenizer.encode(ex.prompt))
        seconds += time.perf_counter() - t0
        gens.append(g)
        texts.append(tokenizer.decode(g.tokens))
    return score(examples, texts, gens, seconds)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well-behaved near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


BLOCK_MODES = ("threshold", "S", "Q")
SPEC = "spec"  # lossless self-speculation (decode/spec.py): a row of its own where the checkpoint can run it


def default_modes(model) -> tuple[str, ...]:
    """The block modes an evaluation runs unless told otherwise (the conversion report's rows): BLOCK_MODES, plus
    "spec" when the checkpoint (a model.transformer.Transformer) has the AR stream spec verifies with (labels
    "shift", causal clean stream; `decode.spec.check_spec_model` owns that check)."""
    from ..decode.spec import check_spec_model

    try:
        check_spec_model(model)
    except ValueError:
        return BLOCK_MODES
    return (*BLOCK_MODES, SPEC)


def evaluate_checkpoint(folder: str | Path, examples: Sequence, *, modes: Sequence[str] | None = None,
                        max_new_tokens: int = 32, steps: int = 32, threshold: float | None = None,
                        block_size: int | None = None, eos_fill: bool = False, batch_size: int = 1) -> dict[str, dict]:
    """Task accuracy of a checkpoint decoded with its own kind: {"AR": result} for an AR checkpoint (greedy, KV
    cache), {mode: result} for a block-diffusion one (each mode through the batched engine, the block size from the
    checkpoint unless given; `modes` None = `default_modes`). Each result carries a "decoding" description. Same
    code path as `blockdiff eval` (eval/compare.py)."""
    from .compare import DecodeSettings, evaluate_model

    settings = DecodeSettings(modes=None if modes is None else tuple(modes), max_new_tokens=max_new_tokens,
                              steps=steps, threshold=threshold, block_size=block_size, eos_fill=eos_fill,
                              batch_size=batch_size)
    return evaluate_model(folder, examples, settings)
