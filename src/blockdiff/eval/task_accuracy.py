"""Held-out accuracy of a decoder on the synthetic tasks, with speed numbers measured in the same pass.

Accuracy: exact match of the continuation (cut at EOS) with the task's answer. Speed: generated tokens
(up to and including EOS) per forward (TPF) and per second (TPS), prompts decoded one at a time (batch 1).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

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
        seconds += g.seconds
        if len(samples) < 8:
            samples.append({"prompt": ex.prompt, "answer": ex.answer, "output": text, "correct": ok})
    flat = [h for v in hits.values() for h in v]
    return {
        "n": len(flat),
        "accuracy": sum(flat) / len(flat),
        "per_task": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "tpf": n_tokens / max(forwards, 1),
        "tps": n_tokens / max(seconds, 1e-9),
        "generated_tokens": n_tokens,
        "forwards": forwards,
        "seconds": seconds,
        "samples": samples,
    }
