"""The decoder: one plain-PyTorch transformer for the dense Llama / Qwen2 / Qwen3 family.

It takes token ids (or input embeddings), positions and an attention mask and returns logits. It knows nothing
of noise, losses, sampling or parallelism (docs/design.md, Code conventions 1). Whether it behaves as an AR model or a
block-diffusion model is decided entirely by the mask the caller passes and by how the caller reads the logits.

KV cache protocol (duck-typed, implemented in `blockdiff.decode.cache`): if `cache` is given, every attention
layer calls `cache.update(layer_idx, k, v)` with this forward's keys/values [b, hkv, T, d] and attends to the
returned keys/values (the cached prefix followed by these T tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import additive_mask, check_mask, rope_cache_attend, rope_cos_sin, rope_inv_freq
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and scale after casting back, as Llama / Qwen reference code does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.wq = nn.Linear(d, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, d, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask, cache=None, q_slice: slice | None = None) -> Tensor:
        """Self-attention over x [b, T, d]. With `q_slice`, only those positions are queries (keys and values
        still come from all T); the output is [b, len(q_slice), d]. `mask` must then be dense or None."""
        b, T, _ = x.shape
        xq = x if q_slice is None else x[:, q_slice]
        Tq = xq.shape[1]
        q = self.wq(xq).view(b, Tq, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.wo(rope_cache_attend(q, k, v, cos, sin, mask, cache, self.layer_idx, q_slice))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)  # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask, cache=None, out_slice: slice | None = None) -> Tensor:
        """With `out_slice`, only those positions' outputs are computed (the rest still serve as keys/values)."""
        h = self.attention(self.attention_norm(x), cos, sin, mask, cache, q_slice=out_slice)
        x = (x if out_slice is None else x[:, out_slice]) + h
        return x + self.feed_forward(self.ffn_norm(x))


class DecoderLM(nn.Module):
    """Embedding -> layers -> norm -> head, shared by the dense decoder and the LLaDA2-MoE decoder (which differ only
    in their layers): `block(cfg, layer_idx)` builds each layer, called as layer(x, cos, sin, mask, cache,
    out_slice=...). `rotary_dim` limits RoPE to the first dims of each head (partial rotary)."""

    def __init__(self, cfg: ModelConfig, block, rotary_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg, rotary_dim), persistent=False)

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Fresh random init (tests and from-scratch runs; checkpoints overwrite it). Buffers other than the RoPE
        frequencies (the MoE expert_bias) start at zero."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        for buf in self.buffers():
            if buf is not self.inv_freq:
                buf.zero_()

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.tok_embeddings(input_ids)

    def forward(
        self,
        input_ids: Tensor | None = None,
        positions: Tensor | None = None,
        mask=None,
        *,
        inputs_embeds: Tensor | None = None,
        cache=None,
        logits_slice: slice | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """input_ids [b, T] (or inputs_embeds [b, T, d]), positions [b, T] (default arange),
        mask: bool [b|1, 1, T, K] / BlockMask / None (all visible). Returns logits [b, T, V].
        `logits_slice` limits the head to those positions (e.g. the noisy half of [x_t ; x0]): the head is the
        largest matmul at real vocab sizes, so skipping positions whose logits are never read saves time.
        `return_hidden` returns the normed final hidden states [b, T, d] instead, for a loss that applies
        `self.output` itself a chunk at a time (objectives/chunked_ce.py: [b, T, V] logits never exist at once)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, T = x.shape[:2]
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(b, T)
        elif positions.dim() == 1:
            positions = positions.expand(b, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        check_mask(mask)
        if not torch.is_autocast_enabled(x.device.type):  # autocast: q's dtype is not x's; SDPA converts it then
            mask = additive_mask(mask, x.dtype)  # once for every layer (SDPA would convert it in each)
        # The last layer only needs outputs where logits are read: its other positions matter only as keys and
        # values. With a dense (or no) mask and no cache, its queries, attention rows and FFN are restricted to
        # `logits_slice` (on [x_t ; x0] that skips the clean half's last-layer compute). Elsewhere, slice after.
        fused = logits_slice is not None and cache is None and (mask is None or isinstance(mask, Tensor))
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, out_slice=logits_slice if fused and i == last else None)
        if logits_slice is not None and not fused:
            x = x[:, logits_slice]
        x = self.norm(x)
        return x if return_hidden else self.output(x)


class Transformer(DecoderLM):
    """The dense Llama / Qwen2 / Qwen3 decoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, Block)


def resize_vocab(model: Transformer, new_size: int) -> None:
    """Grow the embedding (and untied head) to `new_size` rows, e.g. to add a [MASK] token; the new rows start at
    the mean of the existing ones (`init_rows_to_mean`)."""
    old = model.tok_embeddings.weight
    n_old, d = old.shape
    if new_size < n_old:
        raise ValueError(f"resize_vocab only grows the vocabulary ({n_old} -> {new_size} requested)")
    if new_size == n_old:
        return
    tied = model.output.weight is model.tok_embeddings.weight
    emb = nn.Embedding(new_size, d, device=old.device, dtype=old.dtype)
    with torch.no_grad():
        emb.weight[:n_old] = old
    model.tok_embeddings = emb
    if tied:
        model.output.weight = emb.weight
    else:
        head = nn.Linear(d, new_size, bias=False, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            head.weight[:n_old] = model.output.weight
        model.output = head
    model.cfg.vocab_size = new_size
    init_rows_to_mean(model, range(n_old, new_size), n_old)


def init_rows_to_mean(model: Transformer, rows, n_trained: int) -> None:
    """Set embedding (and untied head) rows `rows` to the mean of rows [0, n_trained), the trained ones.

    A token that starts "average" perturbs no existing logit ranking much and has a non-degenerate norm. LLaDA2
    found that re-initialising the mask embedding hurt (forgetting); for an added token there is nothing to keep,
    so the mean is the neutral choice (HF's `resize_token_embeddings(mean_resizing=True)` uses it too). Rows past
    the tokenizer's size (Qwen's table has ~270 padding rows beyond its 151,6xx tokens) were never trained, so
    `n_trained` is the tokenizer's size when a new token lands in such a row, not the table's.
    """
    rows = torch.as_tensor(list(rows), dtype=torch.long, device=model.tok_embeddings.weight.device)
    if len(rows) == 0:
        return
    tied = model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        for w in (model.tok_embeddings.weight,) if tied else (model.tok_embeddings.weight, model.output.weight):
            w[rows] = w[:n_trained].mean(0, keepdim=True)
