"""The forward (noising) process of masked diffusion: mask ratios t, absorbing-mask corruption, and the
Gaussian noise on masked-position embeddings used while converting an AR model.

Sources: LLaDA2.0 report (arXiv 2512.15745) section on the BDLM objective (linear schedule alpha_t = 1 - t,
each token masked independently with probability t) and its "noise on masked embeddings" stabiliser; BD3-LM
for per-block t. Departures: the embedding-noise std and its annealing are not published (docs/design.md 2.4): ours
are documented at `embedding_noise_std`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

T_PER = ("sample", "block")


def sample_t(
    batch: int,
    seq_len: int,
    *,
    t_lo: float,
    t_hi: float,
    per: str = "sample",
    block_size: int = 1,
    positions: Tensor | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> Tensor:
    """Mask ratio for every token, [b, L], drawn from U[t_lo, t_hi].

    per="sample": one t per row (LLaDA2 / dFactory); per="block": one t per (row, block) where a token's block is
    positions // block_size (BD3-LM), so each block is an independent diffusion problem.
    """
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        raise ValueError(f"mask-ratio bandwidth must satisfy 0 <= t_lo <= t_hi <= 1, got [{t_lo}, {t_hi}]")
    if per == "sample":
        u = torch.rand(batch, 1, generator=generator)
        t = (t_lo + (t_hi - t_lo) * u).expand(batch, seq_len)
    elif per == "block":
        if positions is None:
            positions = torch.arange(seq_len).expand(batch, seq_len)
        blocks = positions.cpu() // block_size  # [b, L]
        n_blocks = int(blocks.max()) + 1
        u = torch.rand(batch, n_blocks, generator=generator)
        t = torch.gather(t_lo + (t_hi - t_lo) * u, 1, blocks.long())
    else:
        raise ValueError(f"t_per must be one of {T_PER}, got {per!r}")
    return t.to(device).contiguous()


def mask_positions(t: Tensor, eligible: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Absorbing-mask draw: position i is masked with probability t[i] if eligible[i]. Returns bool [b, L]."""
    u = torch.rand(t.shape, generator=generator).to(t.device)
    return (u < t) & eligible


def embedding_noise_std(model) -> float:
    """Default std of the Gaussian noise added to masked-position embeddings during conversion.

    Ours (not published): the RMS of the embedding table's entries, i.e. mean row norm / sqrt(d). Noise of that
    size makes a masked position's input as large as a typical token's, so the near-zero (or mean-initialised)
    [MASK] embedding cannot produce the degenerate, tiny-norm activations that caused the gradient spikes the
    LLaDA2 authors describe at high mask ratios.
    """
    w = model.tok_embeddings.weight.detach().float()
    return float(w.norm(dim=-1).mean() / w.shape[-1] ** 0.5)


@dataclass
class EmbedNoiseConfig:
    """Gaussian noise on masked-position embeddings early in conversion; also the recipe section [noise]
    (kind "diffusion"). The std is in embedding units; the anneal length is a fraction of all optimiser steps."""

    enabled: bool = True  # add the noise (the stabiliser LLaDA2.0 describes for converting an AR model)
    std: float = 0.0  # noise std at step 0; 0 = derive it from the embedding table (embedding_noise_std)
    frac: float = 0.05  # anneal the std linearly to zero over this fraction of all steps

    def __post_init__(self) -> None:
        if self.std < 0:
            raise ValueError(f"std must be >= 0, got {self.std}")
        if not 0.0 <= self.frac <= 1.0:
            raise ValueError(f"frac must be in [0, 1], got {self.frac}")

    def std0(self, model) -> float:
        """Noise std at step 0 for `model` (0 when off); derive it from the starting model, before any resumed
        weights are loaded, so a resumed run anneals the same noise as an uninterrupted one."""
        return (self.std or embedding_noise_std(model)) if self.enabled else 0.0

    def at(self, std0: float, step: int, total_steps: int) -> float:
        return annealed_std(std0, step, int(round(self.frac * total_steps)))


def annealed_std(std0: float, step: int, anneal_steps: int) -> float:
    """Linear anneal from std0 at step 0 to 0 at `anneal_steps` (0 disables the noise)."""
    if anneal_steps <= 0 or std0 <= 0:
        return 0.0
    return std0 * max(0.0, 1.0 - step / anneal_steps)


def edit_corruption(
    x0: Tensor,
    x_t: Tensor,
    masked: Tensor,
    eligible: Tensor,
    *,
    ratio: float,
    rate_max: float,
    vocab_size: int,
    exclude=(),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """LLaDA2.1 editing-stream (T2T) corruption; the scheme is ours (the report publishes none, docs/design.md 4.4).

    Each row carries the editing stream with probability `ratio`; such a row draws a rate r ~ U(0, rate_max) and
    replaces each eligible, *unmasked* token with probability r by a token drawn uniformly from the vocabulary
    [0, vocab_size) minus `exclude` (special tokens). Uniform random tokens are the cheapest stand-in for the
    decoder's own wrong commits (which T2T decoding must repair); a draw equal to the original is not a corruption.
    Returns (x_t with the replacements, corrupted bool [b, L], edit_region bool [b, L]); labels at corrupted
    positions are x0; edit_region = the visible eligible tokens of the rows carrying the stream (corrupted or
    kept), where the loss also teaches the model to keep a correct token (see DiffusionLossConfig.t2t_keep_weight).
    """
    b, L = x0.shape
    row_on = torch.rand(b, 1, generator=generator) < ratio
    rate = torch.rand(b, 1, generator=generator) * rate_max
    u = torch.rand(b, L, generator=generator)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in set(exclude) if 0 <= i < vocab_size]] = False
    allowed_ids = allowed.nonzero()[:, 0]
    repl = allowed_ids[torch.randint(len(allowed_ids), (b, L), generator=generator)].to(x0.device)
    region = row_on.to(x0.device) & eligible & ~masked
    corrupted = (u < rate).to(x0.device) & region & (repl != x0)
    return torch.where(corrupted, repl, x_t), corrupted, region
