"""CAP: confidence-aware parallel training (LLaDA2.0 report, section on CAP; dFactory docs).

    L = L_SFT + lambda * H_correct,
    H_correct = mean entropy of the predicted distribution over masked positions whose argmax already equals
                the label (0 when there is none).

Sharpening the distributions the model already gets right raises the confidence of correct predictions, so a
threshold decoder commits more of them per forward (higher TPF). lambda = 2.0 is the value recommended in the
open trainer's documentation (docs/design.md 4.2); the report does not state its own. Positions that are wrong are
left to the cross-entropy term: minimising their entropy would only make the model confidently wrong.
Departure: none known; entropy is computed in float32 over the full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..fields import runtime
from .chunked_ce import token_entropy
from .diffusion import DiffusionLossConfig, bdlm_loss_from_terms, diffusion_terms


@dataclass
class CAPConfig:
    """CAP on top of the SFT loss; also the recipe section [cap] (kind "sft": a [cap] table with lam > 0 turns it on)."""

    diffusion: DiffusionLossConfig | None = runtime()  # the SFT loss it is added to (the recipe's [diffusion])
    lam: float = 0.0  # lambda, weight of the entropy term (dimensionless); 0 = off; 2.0 is the open trainer's value

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")


def cap_entropy(logits: Tensor, x0: Tensor, masked: Tensor) -> Tensor:
    """Mean entropy (nats) of softmax(logits) over masked positions whose argmax equals x0; 0 if none.
    logits [b, L, V], x0 / masked [b, L]. The selection is not differentiated (argmax)."""
    return correct_entropy(token_entropy(logits), logits.detach().argmax(-1), x0, masked)


def correct_entropy(ent: Tensor, pred: Tensor, x0: Tensor, masked: Tensor) -> Tensor:
    """H_correct from per-token entropies and argmax predictions [b, L] (what the chunked loss head returns)."""
    sel = (masked & (pred == x0)).float()
    return (ent * sel).sum() / sel.sum().clamp_min(1)


def cap_loss(model, batch: dict[str, Tensor], cfg: CAPConfig, *, generator=None, embed_noise_std: float = 0.0):
    terms = diffusion_terms(model, batch, cfg.diffusion, generator=generator, embed_noise_std=embed_noise_std,
                            entropy=True)
    loss, metrics = bdlm_loss_from_terms(terms, cfg.diffusion)
    ent = correct_entropy(terms.entropy, terms.pred, terms.x0, terms.masked)
    loss = loss + cfg.lam * ent
    metrics.update(loss=float(loss.detach()), sft_loss=metrics["loss"], cap_entropy=float(ent.detach()))
    return loss, metrics
