"""Cross-entropy through the output head a chunk of tokens at a time, so the [b, L, V] logits never exist at once.

At real vocabularies (Qwen 151,936, Llama 128,256) and long rows the loss's fp32 logits, their log-softmax and
their gradient are the largest tensors of a training step (4 bytes x b x L x V each: 20 GiB at L = 32k). The
standard remedy (chunked / "fused linear" cross-entropy, as in Liger-Kernel and torchtune): the model returns
its normed final hidden states, the loss applies the head to `chunk_tokens` scored tokens at a time, and each
chunk runs under `torch.utils.checkpoint`, so backward recomputes that chunk's logits instead of keeping them.
Peak loss memory is then O(chunk_tokens x V) instead of O(b x L x V), for one extra head matmul per chunk.

Only the scored tokens go through the head (the masked ones of a diffusion loss, the in-document targets of the
AR loss): the others' cross-entropy is multiplied by 0 downstream, so skipping them changes no loss and no
gradient, and saves head compute. Same loss and gradients as the full-logits path up to float summation order
(tests/test_objectives.py compares every parameter's gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Tokens per chunk of the loss head (the default of DiffusionLossConfig.loss_chunk_tokens, and what the AR, DPO
# and EBPO losses use). 1024 tokens x 151,936 rows x 4 bytes = 0.58 GiB per fp32 [chunk, V] tensor, about four
# of them live at once in a chunk's backward; a [1024, d] x [d, V] head matmul still runs at full speed. Runs of
# at most this many scored tokens form one chunk and are not recomputed (nothing would be saved).
LOSS_CHUNK_TOKENS = 1024


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats, float32) of softmax(logits) over the last dim: [..., V] -> [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _chunk(head, h: Tensor, y: Tensor, entropy: bool):
    logits = head(h).float()  # [c, V]
    ce = F.cross_entropy(logits, y, reduction="none")
    pred = logits.detach().argmax(-1)
    return (ce, pred, token_entropy(logits)) if entropy else (ce, pred)


def scored_ce(head, h: Tensor, labels: Tensor, where: Tensor, *, chunk_tokens: int = LOSS_CHUNK_TOKENS,
              entropy: bool = False) -> tuple[Tensor, ...]:
    """Cross-entropy of `labels` under head(h) at the positions `where`, `chunk_tokens` tokens at a time.

    head: the model's output layer (h -> logits); h [b, L, d] normed final hidden states; labels, where [b, L].
    Returns ce [b, L] fp32 (0 where not scored), pred [b, L] argmax of the logits (-1 where not scored) and, with
    `entropy`, the entropy [b, L] of softmax(logits) (0 where not scored). `chunk_tokens` <= 0: one chunk.
    """
    idx = where.reshape(-1).nonzero().squeeze(-1)  # [n] flat indices of the scored tokens
    hs, ys = h.reshape(-1, h.shape[-1])[idx], labels.reshape(-1)[idx]  # [n, d], [n]
    n = len(idx)
    step = chunk_tokens if 0 < chunk_tokens < n else max(n, 1)
    recompute = torch.is_grad_enabled() and hs.requires_grad and step < n  # one chunk: nothing to save by it
    outs = []
    for s in range(0, max(n, 1), step):  # an empty selection still runs one (empty) chunk
        args = (head, hs[s:s + step], ys[s:s + step], entropy)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False, preserve_rng_state=False) if recompute
                    else _chunk(*args))
    out = []
    for i, part in enumerate(zip(*outs)):
        fill = torch.full((labels.numel(),), -1 if i == 1 else 0, dtype=part[0].dtype, device=h.device)
        out.append(fill.index_put((idx,), torch.cat(part)).view(labels.shape))
    return tuple(out)
