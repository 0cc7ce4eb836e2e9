"""Block-diffusion (BDLM) and masked-diffusion (MDLM) objectives on the vectorised [x_t ; x0] layout, and the
plain AR objective used to pretrain the bundled base model. Pure functions: `loss, metrics = f(model, batch, cfg, ...)`.

Sources:
- LLaDA2.0 report eq. 1 (BDLM: each noisy block conditioned on the clean earlier blocks and its own noisy
  block), eq. 2 (MDLM, one block), eq. 3 / open trainer (the [x_t ; x0] layout: both halves use positions
  0..L-1, only the noisy half's logits enter the loss, logit i predicts token i -- no shift).
- Weighting: the paper writes 1/t (ELBO); the open trainer averages over masked tokens (`token_mean`). Both
  are offered; the ELBO is what evaluation reports.
Departures: when B >= L the clean half is dropped (MDLM with full attention inside each document), as LLaDA2
does in its stable phase. Complementary masking (SFT, LLaDA2.0) is optional here for CPT too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model.masks import dense_mask, flex_block_mask
from .noise import T_PER, mask_positions, sample_t

WEIGHTINGS = ("elbo", "token_mean")


@dataclass
class DiffusionLossConfig:
    mask_token_id: int  # id of [MASK]
    block_size: int  # B, tokens per block (B >= L means MDLM)
    weighting: str = "elbo"  # "elbo" (1/t, the likelihood bound) or "token_mean" (open trainer)
    t_lo: float = 0.001  # lower end of the mask-ratio bandwidth (fraction of tokens)
    t_hi: float = 1.0  # upper end of the mask-ratio bandwidth
    t_per: str = "sample"  # one t per "sample" or per "block"
    complementary: bool = False  # also train the inverse mask of each sample in the same batch

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.t_per not in T_PER:
            raise ValueError(f"t_per must be one of {T_PER}, got {self.t_per!r}")
        if not 0.0 <= self.t_lo <= self.t_hi <= 1.0:
            raise ValueError(f"need 0 <= t_lo <= t_hi <= 1, got t_lo={self.t_lo}, t_hi={self.t_hi}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def build_mask(mode: str, *, seq_len: int, device, block_size=None, doc_ids=None, positions=None, batch=1):
    """Dense boolean mask for SDPA on CPU; FlexAttention block mask on CUDA (flex has no CPU backward)."""
    kw = dict(seq_len=seq_len, block_size=block_size, doc_ids=doc_ids, positions=positions, batch=batch, device=device)
    if torch.device(device).type == "cuda":
        return flex_block_mask(mode, **kw)
    return dense_mask(mode, **kw)


def noised_inputs(batch: dict[str, Tensor], cfg: DiffusionLossConfig, generator: torch.Generator | None):
    """Draw t and the mask; returns (x0, x_t, masked, t, eligible, doc_ids, positions), with the complementary copy
    appended along the batch when enabled."""
    x0 = batch["input_ids"]
    b, L = x0.shape
    doc_ids, positions = batch.get("doc_ids"), batch.get("positions")
    eligible = batch.get("loss_mask")
    if eligible is None:
        eligible = torch.ones_like(x0, dtype=torch.bool)
    t = sample_t(b, L, t_lo=cfg.t_lo, t_hi=cfg.t_hi, per=cfg.t_per, block_size=cfg.block_size,
                 positions=positions, generator=generator, device=x0.device)
    masked = mask_positions(t, eligible, generator)
    if cfg.complementary:
        # The inverse mask supervises every eligible token once per pair; its ratio is 1 - t.
        x0 = torch.cat([x0, x0])
        masked = torch.cat([masked, eligible & ~masked])
        t = torch.cat([t, 1.0 - t])
        eligible = torch.cat([eligible, eligible])
        doc_ids = None if doc_ids is None else torch.cat([doc_ids, doc_ids])
        positions = None if positions is None else torch.cat([positions, positions])
    x_t = torch.where(masked, torch.full_like(x0, cfg.mask_token_id), x0)
    return x0, x_t, masked, t, eligible, doc_ids, positions


def diffusion_loss(
    model,
    batch: dict[str, Tensor],
    cfg: DiffusionLossConfig,
    *,
    generator: torch.Generator | None = None,
    embed_noise_std: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """BDLM loss on [x_t ; x0] (MDLM on x_t alone when B >= L).

    batch: input_ids [b, L] (x0), optional doc_ids / positions [b, L] from packing, optional loss_mask [b, L]
    (tokens that may be noised; SFT passes the response mask). Returns (scalar loss, metrics).
    """
    x0, x_t, masked, t, eligible, doc_ids, positions = noised_inputs(batch, cfg, generator)
    b, L = x0.shape
    device = x0.device
    if positions is None:
        positions = torch.arange(L, device=device).expand(b, L)
    mdlm = cfg.block_size >= L
    if mdlm:
        inputs, pos = x_t, positions
        mask = build_mask("full", seq_len=L, device=device, doc_ids=doc_ids, positions=positions, batch=b)
    else:
        inputs, pos = torch.cat([x_t, x0], 1), torch.cat([positions, positions], 1)  # [b, 2L]
        mask = build_mask("bd_train", seq_len=L, device=device, block_size=cfg.block_size,
                          doc_ids=doc_ids, positions=positions, batch=b)
    h = model.embed(inputs)  # [b, T, d]
    if embed_noise_std > 0:
        noise_at = torch.zeros_like(inputs, dtype=torch.bool)
        noise_at[:, :L] = masked
        noise = torch.randn(h.shape, generator=generator).to(device=device, dtype=h.dtype)
        h = h + noise * embed_noise_std * noise_at[..., None]
    logits = model(inputs_embeds=h, positions=pos, mask=mask, logits_slice=slice(0, L))  # [b, L, V]
    ce = F.cross_entropy(logits.float().reshape(b * L, -1), x0.reshape(-1), reduction="none").view(b, L)
    m = masked.float()
    n_masked = m.sum()
    if cfg.weighting == "elbo":
        loss = (ce * m / t.clamp_min(1e-3)).sum() / eligible.sum().clamp_min(1)
    else:
        loss = (ce * m).sum() / n_masked.clamp_min(1)
    with torch.no_grad():
        correct = (logits.argmax(-1) == x0) & masked
        metrics = {
            "loss": float(loss.detach()),
            "masked_nll": float((ce * m).sum() / n_masked.clamp_min(1)),
            "masked_acc": float(correct.sum() / n_masked.clamp_min(1)),
            "mask_frac": float(n_masked / eligible.sum().clamp_min(1)),
        }
    return loss, metrics


def ar_loss(model, batch: dict[str, Tensor], cfg=None, **_) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy with a causal mask inside each packed document (pretraining the AR parent).
    The last token of each document has no target inside its document and is excluded."""
    x = batch["input_ids"]
    b, L = x.shape
    doc_ids, positions = batch.get("doc_ids"), batch.get("positions")
    mask = build_mask("causal", seq_len=L, device=x.device, doc_ids=doc_ids, positions=positions, batch=b)
    logits = model(x, positions=positions, mask=mask)[:, :-1]  # [b, L-1, V]
    target = x[:, 1:]
    valid = torch.ones_like(target, dtype=torch.bool) if doc_ids is None else doc_ids[:, 1:] == doc_ids[:, :-1]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    ce = ce.view(b, L - 1)
    loss = (ce * valid).sum() / valid.sum().clamp_min(1)
    with torch.no_grad():
        acc = ((logits.argmax(-1) == target) & valid).sum() / valid.sum().clamp_min(1)
    return loss, {"loss": float(loss.detach()), "next_token_acc": float(acc)}


@torch.no_grad()
def elbo_nll(model, batches, *, mask_token_id: int, block_size: int, eps: float = 1e-3, seed: int = 1234) -> float:
    """Per-token negative ELBO (nats) over held-out batches with t ~ U[eps, 1] and a fixed noise seed, so
    successive evaluations differ only by the model. exp() of it is the ELBO perplexity (an upper bound on
    the true perplexity)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = DiffusionLossConfig(mask_token_id=mask_token_id, block_size=block_size, weighting="elbo", t_lo=eps, t_hi=1.0)
    total, count = 0.0, 0
    for batch in batches:
        loss, _ = diffusion_loss(model, batch, cfg, generator=gen)
        n = batch["input_ids"].numel() if batch.get("loss_mask") is None else int(batch["loss_mask"].sum())
        total += float(loss) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def ar_nll(model, batches) -> float:
    """Per-token next-token NLL (nats) over held-out batches."""
    total, count = 0.0, 0
    for batch in batches:
        loss, _ = ar_loss(model, batch)
        n = batch["input_ids"].numel()
        total += float(loss) * n
        count += n
    return total / max(count, 1)
