"""Unmasking rules: which masked positions of the current block to commit at this step. Each rule is a
small function, vectorised over the batch: (confidence [b, B], masked [b, B], ...) -> commit bool [b, B].

Confidence is the probability of the chosen token, computed in float32 (SYSTEM.md 6.1).
"""

from __future__ import annotations

import torch
from torch import Tensor


def choose_tokens(logits: Tensor, temperature: float = 0.0, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """logits [b, B, V] -> (token [b, B], confidence [b, B]). Temperature 0 = argmax (the official LLaDA2 HF
    code samples even at temperature 0; we follow the fix later adopted by other engines)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if temperature <= 0:
        conf, tok = probs.max(dim=-1)
        return tok, conf
    p = torch.softmax(logits.float() / temperature, dim=-1)
    tok = torch.multinomial(p.view(-1, p.shape[-1]), 1, generator=generator).view(p.shape[:-1])
    return tok, torch.gather(probs, -1, tok[..., None])[..., 0]


def threshold_rule(conf: Tensor, masked: Tensor, threshold: float, quota: int) -> Tensor:
    """LLaDA2.0 threshold decoding with fallback [code]: commit every masked position with confidence >
    threshold; if fewer than `quota` pass, commit the `quota` most confident masked positions instead
    (guaranteed progress). quota = ceil(B / steps), 1 at the defaults B = 32, steps = 32."""
    conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
    passing = masked & (conf > threshold)
    order = conf.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    k = torch.where(passing.sum(-1, keepdim=True) < quota, quota, 0)  # [b, 1]
    return passing | ((rank < k) & masked)
