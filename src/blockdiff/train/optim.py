"""What a run updates and how: the trainable parameters ([train] trainable) and the AdamW optimiser over them.

`trainable = "mask_embedding"` (issue 18 part 4, "drafts trained to be accepted") updates only the [MASK] token's
row of the input embedding. Why that keeps the verifier exactly where it is: the causal (clean) stream never
holds a [MASK] token -- AR decoding, spec's verification and the x0 half of training rows see real tokens only,
and no clean position attends to a noisy slot (model/masks.py) -- so every hidden state of the clean stream, and
every logit of a non-mask token, is bit-identical to the starting checkpoint's. With tied embeddings the row is
also the head's [MASK] logit row; every decoder sets that logit to -inf (it never writes [MASK]), so the AR greedy
output is unchanged token for token. What moves is what a [MASK] slot looks like, i.e. the drafts.

How: every other parameter is frozen (requires_grad False: no gradient is even computed), and a gradient hook on
the embedding zeroes every row but the mask row. The embedding is in the no-weight-decay group (as always), and
AdamW turns an always-zero gradient into an exactly zero update (both moments stay 0, the step is 0 / eps), so
the other rows stay bit-identical -- tests/test_train.py checks it with torch.equal. A separate parameter for the
row would need the model to know about training; the hook keeps the model plain (docs STYLE 1).
"""

from __future__ import annotations

import torch


def apply_trainable(model, trainable: str, mask_id: int | None, *, where: str = "[train] trainable") -> None:
    """Restrict training to `trainable` (recipe.TRAINABLE): "all" leaves the model as it is; "mask_embedding"
    freezes all parameters but the input embedding and masks its gradient to row `mask_id`."""
    if trainable == "all":
        return
    if trainable != "mask_embedding":
        raise ValueError(f"{where}: unknown value {trainable!r}")
    if mask_id is None:
        raise ValueError(f"{where} = \"mask_embedding\" needs a checkpoint with a [MASK] token")
    model.requires_grad_(False)
    weight = model.tok_embeddings.weight  # [V, d]; with tied embeddings also the head
    weight.requires_grad_(True)

    def only_mask_row(grad: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(grad)  # not grad * one_hot: an inf elsewhere would turn into NaN
        out[mask_id] = grad[mask_id]
        return out

    weight.register_hook(only_mask_row)


def build_optimizer(model, recipe) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; decoupled weight decay on 2-D weights except embeddings."""
    t = recipe.train
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embeddings" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.phases[0].lr, betas=(t.beta1, t.beta2), foreach=True)
