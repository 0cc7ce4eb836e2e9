"""DPO on the ELBO (LLaDA2.0 report, post-training section; docs/design.md 4.3).

A diffusion LM has no tractable log-likelihood, so DPO's log p is replaced by the ELBO B(theta, y | c) -- the
SFT objective read as a likelihood bound, sum over masked response tokens of log p / t -- estimated with one
Monte Carlo sample (t, x_t):

    L = -log sigmoid(beta * ((B_theta - B_ref)(y_w) - (B_theta - B_ref)(y_l))),   beta = 0.1.

The reference is the frozen starting (post-SFT) model. Ours: the noise sample is shared by policy and
reference (their difference then has far lower variance than with independent draws) and by chosen and
rejected (one t per pair and the same uniform draw per position: rows are padded to one length), so the
margin compares the two answers under the same corruption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fields import require_bound, runtime
from .diffusion import sequence_elbo


@dataclass
class DPOConfig:
    """DPO on the ELBO; also the recipe section [dpo]. t is the fraction of answer tokens masked."""

    beta: float = 0.1  # inverse temperature of the implicit reward (dimensionless; report value)
    t_lo: float = 0.001  # mask-ratio range of the ELBO sample (the full range: a likelihood estimate)
    t_hi: float = 1.0
    sft_weight: float = 0.0  # alpha of an added NLL term on the chosen answer, nats per token (RPO-style; 0 = plain DPO)
    samples: int = 1  # Monte Carlo (t, x_t) draws per pair, averaged (each shared by policy / reference / both answers)
    answer_only: bool = False  # ELBO over the answer up to its first EOS only (not the EOS padding after it)
    # Filled at run time from the checkpoint, the tokenizer and the phase (fields.runtime), never by a recipe.
    mask_token_id: int | None = runtime()
    block_size: int | None = runtime()  # B
    eos_id: int | None = runtime()  # with `answer_only`: the EOS id that ends an answer
    shift: bool = runtime(False)  # the checkpoint's label alignment is "shift" (DiffusionInfo.labels)
    clean_causal: bool = runtime(False)  # the checkpoint's clean stream is token-causal (DiffusionInfo.clean_stream)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.t_lo <= self.t_hi <= 1.0:
            raise ValueError(f"need 0 <= t_lo <= t_hi <= 1, got t_lo={self.t_lo}, t_hi={self.t_hi}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


def pair_noise(batch: dict[str, Tensor], cfg: DPOConfig, generator=None):
    """Flatten a pair batch (input_ids [n, 2, L]) to [2n, L] (chosen rows first) and draw one shared noise
    sample: t per pair, one uniform per (pair, position). Returns x0, x_t, masked, t, positions, doc_ids."""
    ids = batch["input_ids"]
    n, two, L = ids.shape
    if two != 2:
        raise ValueError(f"pair batch must be [n, 2, L] (chosen, rejected), got {tuple(ids.shape)}")

    def flat(x):
        return None if x is None else x.transpose(0, 1).reshape(2 * n, L)

    x0, eligible = flat(ids), flat(batch["loss_mask"])
    if cfg.answer_only:
        # Ours: drop the EOS padding after the answer's first EOS from the ELBO. Rows are padded to seq_len, so
        # ~half the scored positions are padding whose CE differs between the answers only through noise; the
        # preference signal sits in a handful of answer tokens.
        if cfg.eos_id is None:
            raise ValueError("answer_only needs eos_id")
        eos_seen = torch.cumsum((x0 == cfg.eos_id) & eligible, dim=-1)
        eligible = eligible & ((eos_seen == 0) | ((eos_seen == 1) & (x0 == cfg.eos_id)))
    t = (cfg.t_lo + (cfg.t_hi - cfg.t_lo) * torch.rand(n, 1, generator=generator)).expand(n, L).repeat(2, 1)
    u = torch.rand(n, L, generator=generator).repeat(2, 1)
    t, u = t.to(x0.device), u.to(x0.device)
    masked = (u < t) & eligible
    x_t = torch.where(masked, torch.full_like(x0, cfg.mask_token_id), x0)
    return x0, x_t, masked, t, flat(batch.get("positions")), flat(batch.get("doc_ids"))


def dpo_loss(model, batch: dict[str, Tensor], cfg: DPOConfig, *, ref_model, generator=None):
    """batch: input_ids / loss_mask / positions [n, 2, L]. Returns (loss, metrics) with rewards
    beta * (B_theta - B_ref) of chosen and rejected, their margin and the preference accuracy (margin > 0)."""
    require_bound(cfg, "mask_token_id", "block_size")
    elbo = elbo_ref = 0.0
    for _ in range(cfg.samples):
        # Ours, after LLaDA 1.5's VRPO: averaging K shared-noise ELBO draws cuts the variance of the margin, which
        # at K = 1 is several nats next to beta-scaled rewards of ~0.1-1 (dev/LOG.md).
        x0, x_t, masked, t, pos, docs = pair_noise(batch, cfg, generator)
        kw = dict(block_size=cfg.block_size, positions=pos, doc_ids=docs, shift=cfg.shift,
                  clean_causal=cfg.clean_causal)
        elbo = elbo + sequence_elbo(model, x0, x_t, masked, t, **kw) / cfg.samples  # [2n]
        with torch.no_grad():
            elbo_ref = elbo_ref + sequence_elbo(ref_model, x0, x_t, masked, t, **kw) / cfg.samples
    n = x0.shape[0] // 2
    reward = cfg.beta * (elbo - elbo_ref)
    margin = reward[:n] - reward[n:]
    loss = -F.logsigmoid(margin).mean()
    if cfg.sft_weight:
        # Ours, after RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): + alpha * the chosen
        # answer's negative ELBO per response token. Plain DPO only moves the *difference* of the two answers'
        # likelihoods, and on this model both fall fast (chosen ELBO -2 -> -47 nats in 150 steps, dev/LOG.md);
        # the NLL term keeps the chosen answer likely while the margin grows.
        n_tok = batch["loss_mask"][:, 0].sum(-1).clamp_min(1).to(elbo.dtype)  # [n] response tokens of chosen
        loss = loss + cfg.sft_weight * (-elbo[:n] / n_tok).mean()
    with torch.no_grad():
        metrics = {"loss": float(loss.detach()), "reward_chosen": float(reward[:n].mean()),
                   "reward_rejected": float(reward[n:].mean()), "reward_margin": float(margin.mean()),
                   "pref_acc": float((margin > 0).float().mean()),
                   "elbo_chosen": float(elbo[:n].mean()), "elbo_rejected": float(elbo[n:].mean())}
    return loss, metrics


@torch.no_grad()
def elbo_preference_accuracy(model, batches, cfg: DPOConfig, *, samples: int = 4, seed: int = 1234) -> dict:
    """Held-out preference accuracy: fraction of pairs whose ELBO (averaged over `samples` shared noise draws,
    fixed seed) is higher for the chosen answer; also the mean ELBO margin (nats)."""
    gen = torch.Generator().manual_seed(seed)
    wins, margins = [], []
    for batch in batches:
        n = batch["input_ids"].shape[0]
        total = torch.zeros(2 * n)
        for _ in range(samples):
            x0, x_t, masked, t, pos, docs = pair_noise(batch, cfg, gen)
            total += sequence_elbo(model, x0, x_t, masked, t, block_size=cfg.block_size, positions=pos,
                                   doc_ids=docs, shift=cfg.shift, clean_causal=cfg.clean_causal).cpu()
        m = (total[:n] - total[n:]) / samples
        margins.append(m)
        wins.append(m > 0)
    m = torch.cat(margins)
    return {"pairs": len(m), "pref_acc": float(torch.cat(wins).float().mean()), "elbo_margin": float(m.mean())}
