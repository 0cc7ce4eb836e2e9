"""Mixture of experts for the LLaDA2-MoE / Ling 2.0 (BailingMoeV2) family: the group-limited sigmoid router,
stacked routed experts with a sort-based grouped forward, and the shared expert (docs/design.md 5).

Router, per token (the official BailingMoeV2 / LLaDA2 gate; the same scheme as DeepSeek-V3's "aux-loss-free"
router): logits in fp32, scores = sigmoid(logits); *selection* uses scores + expert_bias: experts are split into
n_group groups, a group's score is the sum of its top-2 biased scores, the best topk_group groups are kept and
the top-k experts among them are chosen. The *weights* are the unbiased scores of the chosen experts, normalised
to sum 1 and times routed_scaling_factor. The bias only steers load balance, never the mix.

As in the official gate (LLaDA2MoeGate / BailingMoeV2Gate.forward in the remote code), `norm_topk_prob` and
`moe_router_enable_expert_bias` are not read: the weights are always normalised (for k > 1) and selection always
adds the expert_bias buffer. A folder whose config.json sets either to false still runs as the official code
runs it, and the values are written back unchanged (docs/moe.md).

`expert_bias` is a buffer, not a parameter: no optimiser ever touches it. During conversion we keep it frozen
(docs/choices.md): LLaDA2 does not publish its bias-update rule, and the Ling bias already balances the
experts for the routing the checkpoint learned.

Experts are stored stacked ([E, I, d] gate / up, [E, d, I] down, nn.Linear orientation per expert) so HF's
per-expert tensors load straight into a slice. The forward sorts the (token, expert) pairs by expert, runs one
matmul triple per expert that received tokens on a contiguous slice, and adds the weighted results back with
index_add_: no Python loop over tokens, no per-expert scan of the routing table, one host sync (the per-expert
slice ends) per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .moe_config import MoEConfig


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): the dense first layers and the shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate_proj
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up_proj
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down_proj

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(logits: Tensor, expert_bias: Tensor | None, m: MoEConfig) -> tuple[Tensor, Tensor]:
    """Router logits [N, E] -> (expert ids [N, k], weights [N, k] fp32). Pure function of the logits;
    `expert_bias=None` selects on the unbiased scores (the Router always passes its buffer)."""
    scores = torch.sigmoid(logits.float())  # [N, E]
    biased = scores if expert_bias is None else scores + expert_bias.float()
    N, E = scores.shape
    if m.n_group > 1 and m.topk_group < m.n_group:
        grouped = biased.view(N, m.n_group, E // m.n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
        keep = group_score.topk(m.topk_group, dim=-1).indices  # [N, topk_group]
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        biased = biased.masked_fill(~group_mask.repeat_interleave(E // m.n_group, dim=1), float("-inf"))
    idx = biased.topk(m.num_experts_per_tok, dim=-1).indices  # [N, k]
    weights = scores.gather(1, idx)
    if m.num_experts_per_tok > 1:  # whatever m.norm_topk_prob says, as the official gate does
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)  # 1e-20: the official gate's guard
    return idx, weights * m.routed_scaling_factor


class Router(nn.Module):
    def __init__(self, dim: int, m: MoEConfig):
        super().__init__()
        self.m = m
        self.weight = nn.Parameter(torch.empty(m.num_experts, dim))
        # Persistent buffer: saved and loaded with the checkpoint, never trained (see module docstring).
        self.register_buffer("expert_bias", torch.zeros(m.num_experts, dtype=torch.float32))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, d] -> (expert ids [N, k], weights [N, k] fp32). Logits in fp32 as the official gate does;
        autocast is switched off here, or bf16 training on CUDA would compute them in bf16 anyway."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        return route(logits, self.expert_bias, self.m)  # whatever m.expert_bias says, as the official gate does


class Experts(nn.Module):
    """E routed SwiGLU experts with stacked weights."""

    def __init__(self, dim: int, m: MoEConfig):
        super().__init__()
        E, I = m.num_experts, m.moe_intermediate_size
        self.w1 = nn.Parameter(torch.empty(E, I, dim))  # gate_proj of each expert
        self.w3 = nn.Parameter(torch.empty(E, I, dim))  # up_proj
        self.w2 = nn.Parameter(torch.empty(E, dim, I))  # down_proj

    def forward(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        fn = grouped_mm_expert_forward if use_grouped_mm(x) else grouped_expert_forward
        return fn(x, idx, weights, self.w1, self.w3, self.w2)


def use_grouped_mm(x: Tensor) -> bool:
    """torch's grouped GEMM (one kernel for all experts, no host sync) where it is fast: CUDA bf16 on sm90+. On CPU
    it exists but measured no faster than the sorted per-expert loop (dev/LOG.md), which stays the CPU path."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def grouped_mm_expert_forward(x: Tensor, idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Same result as `grouped_expert_forward` with `torch.nn.functional.grouped_mm`: the assignments sorted by
    expert, then three grouped GEMMs over the contiguous expert slices (offsets = cumulative token counts per
    expert, computed on device: no host sync, no Python loop over experts)."""
    N, k = idx.shape
    E = w1.shape[0]
    sorted_e, order = idx.reshape(-1).sort(stable=True)
    token = order // k
    xs = x.index_select(0, token)  # [N*k, d]
    ws = weights.reshape(-1)[order].to(x.dtype)[:, None]
    offs = torch.searchsorted(sorted_e, torch.arange(1, E + 1, device=idx.device)).to(torch.int32)
    h = F.silu(F.grouped_mm(xs, w1.transpose(1, 2), offs=offs)) * F.grouped_mm(xs, w3.transpose(1, 2), offs=offs)
    y = F.grouped_mm(h, w2.transpose(1, 2), offs=offs)  # [N*k, d]
    return torch.zeros_like(x).index_add_(0, token, y * ws)


def grouped_expert_forward(x: Tensor, idx: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """sum_j weights[n, j] * expert_{idx[n, j]}(x[n]) for x [N, d], idx / weights [N, k] -> [N, d].

    Sort the N*k assignments by expert; each expert then owns one contiguous slice of the gathered tokens, and
    its weighted output is added straight into its tokens' rows (no concatenated [N*k, d] intermediate: on CPU
    the extra copy cost as much as a third of the matmuls, bench/moe.py)."""
    N, k = idx.shape
    E = w1.shape[0]
    sorted_e, order = idx.reshape(-1).sort(stable=True)  # [N*k]
    token = order // k  # source token of each sorted assignment
    xs = x.index_select(0, token)  # [N*k, d], grouped by expert
    ws = weights.reshape(-1)[order].to(x.dtype)[:, None]  # [N*k, 1]
    ends = torch.searchsorted(sorted_e, torch.arange(1, E + 1, device=idx.device)).tolist()  # the one host sync
    counts = [end - start for start, end in zip([0] + ends[:-1], ends)]
    # split / unbind, never xs[a:b] or w[e]: their backward would allocate a full-size zero gradient per expert
    # (49 s instead of 0.5 s for one backward at 256 experts); split and unbind assemble one gradient per tensor.
    x_parts, w_parts, t_parts = xs.split(counts), ws.split(counts), token.split(counts)
    g1, g3, g2 = w1.unbind(0), w3.unbind(0), w2.unbind(0)
    out = torch.zeros_like(x)
    for e, c in enumerate(counts):
        if c == 0:
            continue
        xe = x_parts[e]
        ye = F.linear(F.silu(F.linear(xe, g1[e])) * F.linear(xe, g3[e]), g2[e])
        out.index_add_(0, t_parts[e], ye * w_parts[e])
    return out


class MoE(nn.Module):
    """Routed experts plus the shared expert: y = sum_j w_j expert_j(x) + shared(x)."""

    def __init__(self, dim: int, m: MoEConfig):
        super().__init__()
        self.router = Router(dim, m)
        self.experts = Experts(dim, m)
        # num_shared_experts = 0: no shared expert (the official LLaDA2 code builds none; Ling's builds a zero-width
        # one, whose empty tensors the loader accepts and skips).
        self.shared = SwiGLU(dim, m.shared_intermediate_size) if m.num_shared_experts > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights = self.router(flat)
        y = self.experts(flat, idx, weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(shape)
