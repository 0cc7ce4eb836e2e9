"""`build_model(cfg)`: the decoder class for a config's family (dense Transformer or the LLaDA2-MoE decoder).

Both share one interface (forward(ids, positions, mask, *, inputs_embeds, cache, logits_slice) -> logits,
`cfg`, `embed`, `init_weights`, tok_embeddings / output for `resize_vocab`), so everything downstream takes
either.
"""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .llada2_moe import MoETransformer
from .transformer import Transformer


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.moe is not None:
        return MoETransformer(cfg)
    return Transformer(cfg)
