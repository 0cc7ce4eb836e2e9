"""Decoding-test helpers shared by test_decode, test_engine, test_alignment and test_gpu: a wrapper that records
and edits the logits the decoder sees, a deterministic tie-breaker, logit edits (force EOS, disagree) and the
label alignments. Plain functions, imported by name; the `bd` / `ar` model fixtures live in conftest.py.

Why a tie-breaker: the tiny random models are near uniform (every confidence ~1/V), so the fixtures scale the
final norm by SHARPEN. Masked slots of one block then still differ only by their RoPE position and their
confidences can tie to ~1e-6, the size of the cached-vs-uncached (or CPU-vs-GPU) rounding; `tiebroken` adds a
fixed random logit bias per absolute position (the same in both decoders) so every argmax, ranking and threshold
decision of the equivalence tests has a margin of at least 3e-4 in probability (measured when the tests were
written).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

SHARPEN = 20.0  # logit scale that turns the near-uniform random model into a confident one

# (labels, clean_stream) of a checkpoint, docs/alignment.md
ALIGNMENTS = [("same", "block_causal"), ("shift", "block_causal"), ("shift", "causal"), ("same", "causal")]


def skip_unsupported(mode: str, labels: str, clean: str) -> None:
    """Mode spec needs a causal AR stream (shift + causal); other alignments refuse it (tests/test_spec.py)."""
    if mode == "spec" and (labels, clean) != ("shift", "causal"):
        pytest.skip("spec needs labels shift + clean_stream causal (refusal tested in test_spec.py)")


class Spy(nn.Module):
    """Wraps the model the engine calls: records every forward's ids and positions, and optionally edits the
    logits by absolute position and input (force EOS at one position, forbid it elsewhere, push toward [MASK]).
    More than `max_calls` forwards raise: a decoder that never fills its block fails instead of hanging."""

    def __init__(self, inner: nn.Module, edit=None, max_calls: int = 1000):
        super().__init__()
        self.inner = inner
        self.cfg = inner.cfg
        self.edit = edit
        self.max_calls = max_calls
        self.calls: list[tuple[list[int], list[int]]] = []

    def forward(self, input_ids, positions=None, mask=None, *, cache=None):
        for row_ids, row_pos in zip(input_ids.tolist(), positions.tolist()):
            self.calls.append((row_ids, row_pos))
        if len(self.calls) > self.max_calls:
            raise RuntimeError(f"more than {self.max_calls} forwards: the decoder is not making progress")
        logits = self.inner(input_ids, positions=positions, mask=mask, cache=cache)
        if self.edit is not None:
            logits = self.edit(logits, positions, input_ids)
        return logits


def tiebroken(model: nn.Module) -> Spy:
    """`model` plus a fixed random logit bias per absolute position (same values on every device)."""
    device = next(model.parameters()).device
    bias = torch.randn(128, model.cfg.vocab_size, generator=torch.Generator().manual_seed(0)).to(device) * 2.0
    return Spy(model, lambda logits, positions, ids: logits + bias[positions])


def make_prompt(n: int, seed: int, high: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, high, (n,), generator=g).tolist()  # id 0 is EOS in the fixtures' tokenizer


def force(eos_id: int, at: int | None, boost_id: int | None = None):
    """Logit edit: EOS nowhere except (overwhelmingly) at absolute position `at`; optionally push every
    position toward `boost_id`."""

    def edit(logits, positions, ids):
        logits = logits.clone()
        logits[..., eos_id] = -1e4
        if at is not None:
            logits[..., eos_id] = torch.where(positions == at, 1e4, -1e4)
        if boost_id is not None:
            logits[..., boost_id] += 1e3
        return logits

    return edit


def disagree(logits, positions, ids):
    """Logit edit: the model 'wants' to change every unmasked token it sees (prompt included) to id+1 (the
    fixtures' [MASK] is the last id)."""
    mask_id = logits.shape[-1] - 1
    logits = logits.clone()
    logits.scatter_add_(-1, ((ids + 1) % mask_id)[..., None], torch.where(ids == mask_id, 0.0, 50.0)[..., None])
    return logits


def with_alignment(model, labels: str, clean: str):
    """The same weights seen as a checkpoint with another label alignment / clean stream (its own config copy)."""
    m = copy.copy(model)
    m.cfg = copy.deepcopy(model.cfg)
    m.cfg.diffusion = dataclasses.replace(m.cfg.diffusion, labels=labels, clean_stream=clean)
    return m
