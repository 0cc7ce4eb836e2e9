"""The decoding engine: token ids in, token ids out. Batched block decoding with an exact KV cache for
block-diffusion models (docs/design.md 6.1-6.4), and greedy AR decoding of the parent model through the same cache.
Used by the CLI, the benchmark, the evaluation and RL rollouts.

Block decoding, per row r (prompts of different lengths share a batch; each row keeps its own blocks):
  canvas_r = prompt_r + max_new_tokens slots, rounded up to whole blocks; blocks start at position 0 (with a causal
  clean stream: the first block starts right after the prompt, see "Label alignment" below).
  prefill: every complete block before the one holding the prompt's end, block-causal mask, into the cache.
  then, block by block: the block's prompt tokens are fixed, the rest start as [MASK]; each step forwards only
  the block's B tokens against the row's cached prefix (bidirectional inside the block), picks a token and a
  confidence per position and applies the decoding rule:
    - threshold family (LLaDA2.0 threshold, dInfer, Fast-dLLM factor, dInfer credit): unmask only; when no mask
      is left, one more forward writes the block's clean K/V, which the cache then commits;
    - joint (LLaDA2.1 M2T + T2T, S/Q modes): unmask and edit in the same step; once the block has no mask, up
      to `max_post_steps` edit-only passes; the block is final at the first step that writes nothing (that
      step's forward saw exactly the final tokens, so its K/V are already clean: no extra forward) or when the
      edit budget is spent.
  A row stops after the block holding EOS (unless `ignore_eos`), at `max_new_tokens`, or when a stop string
  appears in its final text; a finished row leaves the batch (its cache rows are compacted away).
  Early exit in unmask-only rules: once every slot before the first committed EOS (or the budget) is committed
  the output is final (committed tokens never change), so the rest of the block is never decoded.
Every step is one forward of all active rows: rows writing clean K/V and rows denoising share it.
Label alignment (the checkpoint's `blockdiff.labels`, docs/alignment.md): with "same" slot j of the block is read
from logit j of the forward (LLaDA2); with "shift" from logit j-1, and slot 0 from the last logit of the forward
that encoded the finished previous block (the prefill or its cache-writing forward): an ordinary AR step. With
`clean_stream = "causal"` the prefill and every cache-writing forward are token-causal (the AR parent's K/V), so
joint (S/Q) blocks also end with one cache-writing forward.
Counting (docs/decoding.md): a row's forwards exclude the prefill and include its cache-writing forwards; generated
tokens count up to and including EOS.

Streaming: `stream(...)` yields a `StepUpdate` per row per step (tokens written, M2T or T2T, with confidence);
`generate(..., on_step=f)` calls f with each update. `decode/trace.py` writes them as JSONL.

Where the parts live: `decode/config.py` (DecodeConfig, MODES, Generation, StepUpdate), `decode/rules.py` (the
rule objects), `decode/row.py` (one row's state and bookkeeping), `decode/scheduler.py` (the step-able batch that
rows join and leave between steps: the server's continuous batching). `stream` / `generate` below add every prompt
to a scheduler up front and step it until it is idle.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from ..model.masks import dense_mask
from .cache import KVCache
from .config import MODES, BlockDecodeConfig, DecodeConfig, Generation, StepUpdate, TokenEvent
from .row import find_stop, first_stop
from .rules import choose_tokens
from .scheduler import Scheduler, alignment, check_context, check_prompts, fill_after_eos

__all__ = ["MODES", "BlockDecodeConfig", "DecodeConfig", "Generation", "StepUpdate", "TokenEvent", "alignment",
           "ar_generate", "block_generate", "check_context", "fill_after_eos", "find_stop", "generate", "stream"]


def stream(model, prompts: list[list[int]], cfg: DecodeConfig, *, mask_id: int, eos_ids, generator=None,
           stop: list[str] | tuple[str, ...] = (), decode: Callable[[list[int]], str] | None = None,
           events: bool = True) -> Iterator[StepUpdate | list[Generation]]:
    """Decode `prompts` as one batch; yields a StepUpdate per row per step and, last, the list of Generation
    (one per prompt, in order). `stop` strings need `decode` (token ids -> text). Raises ValueError when a prompt
    plus max_new_tokens (rounded up to whole blocks) exceeds the model's context."""
    check_prompts(prompts, model.cfg.vocab_size, mask_id)
    cfg = cfg.for_model(model)
    if stop and decode is None:
        raise ValueError("stop strings need a decode function (token ids -> text)")
    L = max(check_context(model, len(p), cfg) for p in prompts)
    sched = Scheduler(model, mask_id=mask_id, block_size=cfg.block_size, max_rows=len(prompts), max_len=L,
                      events=events)
    for r, p in enumerate(prompts):
        sched.add(r, p, cfg, eos_ids=eos_ids, generator=generator, stop=stop, decode=decode)
    results: list[Generation | None] = [None] * len(prompts)
    while not sched.idle:
        out = sched.step()
        for rid, g in out.finished:
            results[rid] = g
        yield from out.updates
    yield results  # type: ignore[misc]


def generate(model, prompts: list[list[int]], cfg: DecodeConfig, *, mask_id: int, eos_ids, generator=None,
             stop: list[str] | tuple[str, ...] = (), decode: Callable[[list[int]], str] | None = None,
             on_step: Callable[[StepUpdate], None] | None = None) -> list[Generation]:
    """Decode a batch of prompts (token id lists, any lengths); returns one Generation per prompt, in order.
    At temperature 0 a row's output equals that row decoded alone."""
    out = None
    for item in stream(model, prompts, cfg, mask_id=mask_id, eos_ids=eos_ids, generator=generator, stop=stop,
                       decode=decode, events=on_step is not None):
        if isinstance(item, list):
            out = item
        elif on_step is not None:
            on_step(item)
    assert out is not None
    return out


def block_generate(model, prompt: list[int], cfg: DecodeConfig, *, mask_id: int, eos_ids, generator=None) -> Generation:
    """One prompt (the foundation's entry point)."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    return generate(model, [prompt], cfg, mask_id=mask_id, eos_ids=eos_ids, generator=generator)[0]


@torch.no_grad()
def ar_generate(model, prompt: list[int], *, max_new_tokens: int, eos_ids, temperature: float = 0.0, generator=None) -> Generation:
    """Greedy (temperature 0) next-token decoding with a KV cache: the AR parent's baseline, and a block-diffusion
    checkpoint's own AR output (its causal clean stream; [MASK] is never written, as in every block decoder)."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    eos = set(eos_ids)
    device = next(model.parameters()).device
    info = getattr(model.cfg, "diffusion", None)
    mask_id = info.mask_token_id if info is not None else None  # a block-diffusion checkpoint decoded as AR
    P = len(prompt)
    check_context(model, P, DecodeConfig(block_size=1, max_new_tokens=max_new_tokens), ar=True)
    cache = KVCache(model.cfg, 1, P + max_new_tokens, device=device, dtype=next(model.parameters()).dtype)
    t0 = time.perf_counter()
    ids = torch.tensor([prompt], device=device)
    logits = model(ids, positions=torch.arange(P, device=device)[None],
                   mask=dense_mask("causal", seq_len=P, device=device), cache=cache)
    cache.commit(P)
    out: list[int] = []
    forwards = 0
    while True:
        if mask_id is not None:  # never write [MASK] (as every block decoder and spec): its AR stream's output
            logits[..., mask_id] = float("-inf")
        tok, _ = choose_tokens(logits[:, -1:], temperature, generator)
        t = int(tok)
        out.append(t)
        if t in eos or len(out) >= max_new_tokens:
            break
        logits = model(tok.view(1, 1), positions=torch.tensor([[P + len(out) - 1]], device=device), mask=None, cache=cache)
        cache.commit(1)
        forwards += 1
    seconds = time.perf_counter() - t0
    gen = out[:max_new_tokens]
    cut = first_stop(gen, eos)
    tokens, n_gen = (gen[:cut], cut + 1) if cut is not None else (gen, len(gen))
    # The first token comes from the prefill forward; count it so TPF of AR is exactly 1.
    return Generation(tokens, n_gen, forwards + 1, seconds, cut is not None, [], "eos" if cut is not None else "length")
