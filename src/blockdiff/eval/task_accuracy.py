"""Held-out accuracy of a decoder on the synthetic tasks, with speed numbers measured in the same pass. The
conversion report and `bench/convert.py` both evaluate through `evaluate_checkpoint`.

Accuracy: exact match of the continuation (cut at EOS) with the task's answer, with a 95% interval (Wilson).
Speed: generated tokens (up to and including EOS) per forward (TPF, overall and per task) and per second (TPS),
prompts decoded one at a time (batch 1).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from ..data.tasks import TaskExample, is_correct


def evaluate_tasks(
    examples: Sequence[TaskExample],
    tokenizer,
    decode: Callable[[list[int]], object],
) -> dict:
    """`decode(prompt_ids) -> Generation`. Returns accuracy (fraction), per-task accuracy, TPF, TPS."""
    if not examples:
        raise ValueError("no examples to evaluate")
    hits: dict[str, list[bool]] = defaultdict(list)
    task_tok: dict[str, int] = defaultdict(int)
    task_fw: dict[str, int] = defaultdict(int)
    n_tokens = forwards = 0
    seconds = 0.0
    samples = []
    for ex in examples:
        g = decode(tokenizer.encode(ex.prompt))
        text = tokenizer.decode(g.tokens)
        ok = is_correct(ex, text)
        hits[ex.task].append(ok)
        n_tokens += g.n_generated
        forwards += g.forwards
        task_tok[ex.task] += g.n_generated
        task_fw[ex.task] += g.forwards
        seconds += g.seconds
        if len(samples) < 8:
            samples.append({"prompt": ex.prompt, "answer": ex.answer, "output": text, "correct": ok})
    flat = [h for v in hits.values() for h in v]
    return {
        "n": len(flat),
        "accuracy": sum(flat) / len(flat),
        "ci95": list(wilson_interval(sum(flat), len(flat))),
        "per_task": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "tpf_per_task": {k: task_tok[k] / max(task_fw[k], 1) for k in sorted(hits)},
        "tpf": n_tokens / max(forwards, 1),
        "tps": n_tokens / max(seconds, 1e-9),
        "generated_tokens": n_tokens,
        "forwards": forwards,
        "seconds": seconds,
        "samples": samples,
    }


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well-behaved near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


BLOCK_MODES = ("threshold", "S", "Q")


def evaluate_checkpoint(folder: str | Path, examples: Sequence, *, modes: Sequence[str] = BLOCK_MODES,
                        max_new_tokens: int = 32, steps: int = 32, threshold: float | None = None,
                        block_size: int | None = None, eos_fill: bool = False) -> dict[str, dict]:
    """Task accuracy of a checkpoint decoded with its own kind: {"AR": result} for an AR checkpoint (greedy, KV
    cache), {mode: result} for a block-diffusion one (each mode through the batched engine at batch 1, the block
    size from the checkpoint unless given). Each result carries a "decoding" description."""
    from ..load import load_checkpoint

    loaded = load_checkpoint(folder)
    info = loaded.info
    if info is None:
        res = evaluate_tasks(examples, loaded.tokenizer,
                             lambda ids: loaded.generate([ids], max_new_tokens=max_new_tokens)[0])
        return {"AR": res | {"decoding": "greedy AR, KV cache"}}
    out = {}
    for mode in modes:
        cfg = loaded.decode_config(mode=mode, block_size=block_size, steps=steps, max_new_tokens=max_new_tokens,
                                   threshold=threshold if mode == "threshold" else None, eos_fill=eos_fill)
        res = evaluate_tasks(examples, loaded.tokenizer, lambda ids: loaded.generate([ids], cfg)[0])
        desc = (f"threshold {cfg.tau_mask}" if mode == "threshold" else
                f"{mode} (M2T {cfg.tau_mask}, T2T {cfg.tau_edit})")
        fill = ", EOS fill" if eos_fill else ""
        out[mode] = res | {"decoding": f"{desc}, B={cfg.block_size}, steps={steps}, labels {info.labels}{fill}, "
                                       "block KV cache"}
    return out
