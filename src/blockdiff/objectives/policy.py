"""EBPO: ELBO-based Block-level Policy Optimization (LLaDA2.1 report, RL section; docs/design.md 4.5).

PPO-style clipped surrogate with asymmetric bounds over rollouts of the block decoder:

    J = E[min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)],   loss = -J.

log rho is built from the vectorised block likelihood: for each of N timesteps t_n the response is noised at
ratio t_n and [z_n ; y] goes through one forward with the block-diffusion training mask, which gives
log p(y_block | noisy block, clean earlier blocks) for every block at once. Then

    log rho = (1 / |y|) * sum_n w_n * sum_{masked i in y} (log p_theta(y_i | z_n) - log p_old(y_i | z_n)),
    w_n = 1 / (N * t_n)   (the ELBO weights: the bracket is the one-sample ELBO difference),

with p_old the policy at rollout time evaluated on the SAME noise (stored with the rollout).

Choices the report leaves open (ours, docs/post_training.md):
- N = 2 timesteps, stratified: t_n = t_lo + (t_hi - t_lo) * (n + u_n) / N, u_n ~ U(0, 1) per sequence, so the
  two draws cover the low- and high-noise halves (less variance than two i.i.d. draws); t_lo = 0.1 keeps
  1/t bounded.
- ELBO weights 1/(N t_n), then a per-token mean (1/|y|, |y| = response tokens incl. EOS padding): a sequence-level
  ratio that does not grow with response length (as in GSPO), so the clip range means the same for every
  answer length.
- eps_low 0.2, eps_high 0.28: PPO's 0.2 below; the larger upper bound lets rare, improving answers gain
  probability faster (DAPO's "clip-higher").
- Advantage: group-relative (GRPO), A = (r - mean_group) / (std_group + 1e-6) over G samples of a prompt;
  groups with zero spread (all right or all wrong) carry no signal and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..fields import require_bound, runtime
from .diffusion import masked_ce


@dataclass
class EBPOConfig:
    """The EBPO policy loss; also the recipe section [ebpo] (kind "rl"). t is the fraction of response tokens masked."""

    n_timesteps: int = 2  # N noise levels per sequence
    t_lo: float = 0.1  # stratified range of t_n
    t_hi: float = 1.0
    eps_low: float = 0.2  # rho clipped below at 1 - eps_low
    eps_high: float = 0.28  # rho clipped above at 1 + eps_high
    # Filled at run time from the checkpoint and the phase (fields.runtime), never by a recipe.
    mask_token_id: int | None = runtime()
    block_size: int | None = runtime()  # B
    shift: bool = runtime(False)  # the checkpoint's label alignment is "shift" (DiffusionInfo.labels)
    clean_causal: bool = runtime(False)  # the checkpoint's clean stream is token-causal (DiffusionInfo.clean_stream)

    def __post_init__(self) -> None:
        if self.n_timesteps < 1:
            raise ValueError(f"n_timesteps must be >= 1, got {self.n_timesteps}")
        if not 0.0 < self.t_lo <= self.t_hi <= 1.0:
            raise ValueError(f"need 0 < t_lo <= t_hi <= 1, got [{self.t_lo}, {self.t_hi}]")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")


def group_advantages(rewards: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """rewards [groups, G] -> (advantages [groups, G], keep [groups] bool: groups with nonzero spread)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    keep = std[:, 0] > 0
    return (rewards - mean) / (std + eps), keep


def sample_timesteps(eligible: Tensor, cfg: EBPOConfig, generator=None) -> tuple[Tensor, Tensor]:
    """Stratified t_n [N, b] and masks [N, b, L] over the eligible (response) tokens."""
    b, L = eligible.shape
    N = cfg.n_timesteps
    u = torch.rand(N, b, generator=generator)
    t = cfg.t_lo + (cfg.t_hi - cfg.t_lo) * (torch.arange(N)[:, None] + u) / N
    masked = (torch.rand(N, b, L, generator=generator) < t[..., None]).to(eligible.device) & eligible
    return t.to(eligible.device), masked


def elbo_logp(model, batch: dict[str, Tensor], cfg: EBPOConfig) -> Tensor:
    """Per-sequence (1/|y|) sum_n 1/(N t_n) sum_{masked i} log p(y_i | z_n), [b], with the batch's stored noise
    (t [N, b], masked [N, b, L]). One forward per timestep over all blocks."""
    x0, t, masked = batch["input_ids"], batch["t"], batch["masked"]
    n_resp = batch["loss_mask"].sum(-1).clamp_min(1)
    total = torch.zeros(x0.shape[0], device=x0.device)
    for n in range(t.shape[0]):
        x_t = torch.where(masked[n], torch.full_like(x0, cfg.mask_token_id), x0)
        logp = -masked_ce(model, x0, x_t, masked[n], block_size=cfg.block_size, positions=batch.get("positions"),
                          shift=cfg.shift, clean_causal=cfg.clean_causal).sum(-1)
        total = total + logp / (t.shape[0] * t[n])
    return total / n_resp


def clipped_surrogate(log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """Per-sequence min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) and whether the clipped branch was taken."""
    rho = log_ratio.exp()
    unclipped = rho * adv
    clipped = rho.clamp(1 - eps_low, 1 + eps_high) * adv
    return torch.minimum(unclipped, clipped), clipped < unclipped


def ebpo_loss(model, batch: dict[str, Tensor], cfg: EBPOConfig, **_) -> tuple[Tensor, dict[str, float]]:
    """batch (from the rollout source): input_ids / loss_mask / positions [b, L], t [N, b], masked [N, b, L],
    old_logp [b] (elbo_logp of the rollout policy on the same noise), advantages [b], reward_mean [1]."""
    require_bound(cfg, "mask_token_id", "block_size")
    reward = float(batch["reward_mean"].mean()) if "reward_mean" in batch else float("nan")
    if batch["input_ids"].shape[0] == 0:  # every group had zero advantage: no update
        return torch.zeros((), requires_grad=True), {"loss": 0.0, "reward": reward, "clip_frac": 0.0,
                                                     "abs_log_ratio": 0.0, "sequences": 0.0}
    log_ratio = elbo_logp(model, batch, cfg) - batch["old_logp"]
    surr, was_clipped = clipped_surrogate(log_ratio, batch["advantages"], cfg.eps_low, cfg.eps_high)
    loss = -surr.mean()
    with torch.no_grad():
        metrics = {"loss": float(loss.detach()), "reward": reward, "clip_frac": float(was_clipped.float().mean()),
                   "abs_log_ratio": float(log_ratio.abs().mean()), "sequences": float(len(surr))}
    return loss, metrics
