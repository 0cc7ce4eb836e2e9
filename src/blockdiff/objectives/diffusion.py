"""Block-diffusion (BDLM) and masked-diffusion (MDLM) objectives on the vectorised [x_t ; x0] layout, and the
plain AR objective used to pretrain the bundled base model. Pure functions: `loss, metrics = f(model, batch, cfg, ...)`.

Sources:
- LLaDA2.0 report eq. 1 (BDLM: each noisy block conditioned on the clean earlier blocks and its own noisy
  block), eq. 2 (MDLM, one block), eq. 3 / open trainer (the [x_t ; x0] layout: both halves use positions
  0..L-1, only the noisy half's logits enter the loss, logit i predicts token i -- no shift).
- Weighting: the paper writes 1/t (ELBO); the open trainer averages over masked tokens (`token_mean`). Both
  are offered; the ELBO is what evaluation reports.
- Label alignment (docs/alignment.md): `shift=True` trains logit i-1 to predict token i, as the AR parent does
  (Dream, Fast-dLLM v2): inside a block the prediction of token i comes from the noisy logit at i-1; a block's
  first token comes from the clean stream's logit at the last position of the previous block (an AR step, which
  is how the decoder reads it); a document's first token is not predicted. With B = 1 this is exactly the
  parent's next-token loss. `clean_causal=True` encodes the clean half token-causally (NBDiff), and `ar_weight`
  adds the AR next-token loss on the clean stream beside the diffusion loss (Nemotron-Labs-Diffusion): read from
  the same forward when the clean half is causal, else from one extra causal forward.
Departures: when B >= L the clean half is dropped (MDLM with full attention inside each document), as LLaDA2
does in its stable phase. Complementary masking (SFT, LLaDA2.0) is optional here for CPT too.
SFT is this same loss with `loss_mask` = the response tokens (prompt tokens never noised, never scored).
LLaDA2.1 editing stream (T2T): with `t2t_ratio > 0` some unmasked response tokens are replaced by random
tokens and the model must output the originals there; the corruption scheme is ours (noise.edit_corruption,
docs/post_training.md) since the report does not publish it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..fields import require_bound, runtime
from ..model.masks import dense_mask, flex_block_mask, positions_from_doc_ids
from .chunked_ce import LOSS_CHUNK_TOKENS, scored_ce, token_entropy
from .noise import T_PER, edit_corruption, mask_positions, sample_t

WEIGHTINGS = ("elbo", "token_mean")


@dataclass
class DiffusionLossConfig:
    """The block-diffusion loss (CPT, SFT, CAP); also the recipe section [diffusion]. Ratios are fractions of
    tokens in [0, 1]; weights are dimensionless multipliers of a loss in nats per token."""

    weighting: str = "elbo"  # "elbo" (1/t, the likelihood bound) or "token_mean" (open trainer)
    t_lo: float = 0.001  # lower end of the mask-ratio bandwidth (fraction of tokens masked)
    t_hi: float = 1.0  # upper end of the mask-ratio bandwidth
    t_per: str = "sample"  # one t per "sample" (LLaDA2) or per "block" (BD3-LM)
    complementary: bool = False  # also train the inverse mask of each sample in the same batch (SFT default: on)
    # LLaDA2.1 editing stream (T2T), see noise.edit_corruption: off when t2t_ratio == 0.
    t2t_ratio: float = 0.0  # fraction of rows (Bernoulli per row) that also carry token corruption
    t2t_max_rate: float = 0.25  # per-row corruption rate r ~ U(0, t2t_max_rate) of the unmasked eligible tokens
    t2t_weight: float = 1.0  # weight of the T2T loss (token mean over corrupted positions) added to the M2T loss
    t2t_keep_weight: float = 1.0  # weight of the keep term (CE at intact visible tokens of edit rows; 0 = off)
    # AR-preserving aids (docs/alignment.md); 0 = off, LLaDA2's behaviour.
    ar_weight: float = 0.0  # weight of the AR next-token loss on the clean stream (nats per token; 0 = off)
    mask_slope: float = 0.0  # position-dependent masking: t scaled by 1 + slope * (2u - 1), u in [0, 1] the
    #                          position inside the block, so later slots are masked more often (0 = uniform)
    mask_suffix: float = 0.0  # fraction of blocks masked as a suffix: a cut drawn uniformly inside the block, slots
    #                           before it kept clean, slots from it on masked at rate t (the decoder's usual state:
    #                           a clean prompt or committed prefix, masks after it); 0 = off
    # Memory: the loss applies the output head to this many scored tokens at a time, recomputing each chunk's
    # logits in backward (objectives/chunked_ce.py), so its memory is O(chunk x V), not O(b x L x V); same loss
    # and gradients. 0 = off: the whole [b, L, V] logits at once (no recompute; fine for small vocabularies).
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS  # tokens per chunk (scored tokens of the micro-batch, all rows)
    # Filled at run time from the checkpoint and the phase (fields.runtime), never by a recipe.
    mask_token_id: int | None = runtime()  # id of [MASK]
    block_size: int | None = runtime()  # B, tokens per block of the phase (B >= L means MDLM)
    shift: bool = runtime(False)  # labels "shift": logit i-1 predicts token i (else "same": logit i predicts token i)
    clean_causal: bool = runtime(False)  # clean half of [x_t ; x0] token-causal (else block-causal)
    t2t_vocab: int = runtime(0)  # replacement tokens are drawn from ids [0, t2t_vocab) (needed when t2t_ratio > 0)
    t2t_exclude: tuple[int, ...] = runtime(())  # ids never drawn (special tokens: EOS, pad, [MASK], chat markers)

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be {' or '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.t_per not in T_PER:
            raise ValueError(f"t_per must be {' or '.join(T_PER)}, got {self.t_per!r}")
        if not 0.0 <= self.t_lo <= self.t_hi <= 1.0:
            raise ValueError(f"need 0 <= t_lo <= t_hi <= 1, got t_lo={self.t_lo}, t_hi={self.t_hi}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not (0.0 <= self.t2t_ratio <= 1.0 and 0.0 <= self.t2t_max_rate <= 1.0):
            raise ValueError(f"t2t_ratio and t2t_max_rate must be in [0, 1], got {self.t2t_ratio}, {self.t2t_max_rate}")
        if self.t2t_weight < 0 or self.t2t_keep_weight < 0:
            raise ValueError(f"t2t_weight and t2t_keep_weight must be >= 0, got {self.t2t_weight}, {self.t2t_keep_weight}")
        if self.mask_token_id is not None and self.t2t_ratio > 0 and self.t2t_vocab <= len(set(self.t2t_exclude)):
            raise ValueError(f"t2t_ratio > 0 needs t2t_vocab (replacement vocabulary size), got {self.t2t_vocab}")
        if self.ar_weight < 0:
            raise ValueError(f"ar_weight must be >= 0, got {self.ar_weight}")
        if not 0.0 <= self.mask_slope <= 1.0:
            raise ValueError(f"mask_slope must be in [0, 1], got {self.mask_slope}")
        if not 0.0 <= self.mask_suffix <= 1.0:
            raise ValueError(f"mask_suffix must be in [0, 1], got {self.mask_suffix}")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"loss_chunk_tokens must be >= 0 (0 = off), got {self.loss_chunk_tokens}")


def build_mask(mode: str, *, seq_len: int, device, block_size=None, doc_ids=None, positions=None, batch=1):
    """Dense boolean mask for SDPA on CPU; FlexAttention block mask on CUDA (flex has no CPU backward)."""
    kw = dict(seq_len=seq_len, block_size=block_size, doc_ids=doc_ids, positions=positions, batch=batch, device=device)
    if torch.device(device).type == "cuda":
        return flex_block_mask(mode, **kw)
    return dense_mask(mode, **kw)


def noised_inputs(batch: dict[str, Tensor], cfg: DiffusionLossConfig, generator: torch.Generator | None):
    """Draw t and the mask; returns (x0, x_t, masked, t, eligible, doc_ids, positions, block_positions), with the
    complementary copy appended along the batch when enabled. `block_positions` place the block boundaries
    (block = block_positions // B): the positions themselves, or with a causal clean stream the positions plus a
    random offset in [0, B) per row, because the decoder of such a checkpoint starts its first block right after
    the prompt, wherever that falls (docs/alignment.md)."""
    require_bound(cfg, "mask_token_id", "block_size")
    x0 = batch["input_ids"]
    b, L = x0.shape
    doc_ids, positions = batch.get("doc_ids"), batch.get("positions")
    eligible = batch.get("loss_mask")
    if eligible is None:
        eligible = torch.ones_like(x0, dtype=torch.bool)
    bpos = _positions(x0, doc_ids, positions)
    if cfg.clean_causal and cfg.block_size < L:
        bpos = bpos + torch.randint(0, cfg.block_size, (b, 1), generator=generator).to(x0.device)
    t = sample_t(b, L, t_lo=cfg.t_lo, t_hi=cfg.t_hi, per=cfg.t_per, block_size=cfg.block_size,
                 positions=bpos, generator=generator, device=x0.device)
    if cfg.mask_slope > 0:
        t = slope_t(t, bpos, min(cfg.block_size, L), cfg.mask_slope)
    masked = mask_positions(t, eligible, generator)
    if cfg.mask_suffix > 0:
        masked = masked & ~clean_prefix(bpos, min(cfg.block_size, L), cfg.mask_suffix, generator)
    if cfg.complementary:
        # The inverse mask supervises every eligible token once per pair; its ratio is 1 - t.
        x0 = torch.cat([x0, x0])
        masked = torch.cat([masked, eligible & ~masked])
        t = torch.cat([t, 1.0 - t])
        eligible = torch.cat([eligible, eligible])
        doc_ids = None if doc_ids is None else torch.cat([doc_ids, doc_ids])
        positions = None if positions is None else torch.cat([positions, positions])
        bpos = torch.cat([bpos, bpos])
    x_t = torch.where(masked, torch.full_like(x0, cfg.mask_token_id), x0)
    return x0, x_t, masked, t, eligible, doc_ids, positions, bpos


def _positions(x0: Tensor, doc_ids: Tensor | None, positions: Tensor | None) -> Tensor:
    if positions is not None:
        return positions
    if doc_ids is not None:
        return positions_from_doc_ids(doc_ids)
    b, L = x0.shape
    return torch.arange(L, device=x0.device).expand(b, L)


def slope_t(t: Tensor, positions: Tensor, block_size: int, slope: float) -> Tensor:
    """Position-dependent masking (Efficient-DLM's idea, our linear form): the mask ratio of the slot at offset u in
    [0, 1] inside its block is t * (1 + slope * (2u - 1)), clamped to [1e-3, 1]; the block's mean ratio stays ~t.
    Later slots, which the decoder fills last and from the least context, are masked more often in training."""
    if block_size <= 1:
        return t
    u = (positions % block_size).to(t.dtype) / (block_size - 1)
    return (t * (1.0 + slope * (2.0 * u - 1.0))).clamp(1e-3, 1.0)


def clean_prefix(positions: Tensor, block_size: int, frac: float, generator=None) -> Tensor:
    """Bool [b, L]: the slots kept clean by suffix masking. A fraction `frac` of the (row, block) pairs draws a cut
    uniformly in [0, B] and keeps the slots before it clean; other blocks keep nothing (uniform masking)."""
    b, L = positions.shape
    blocks = (positions // block_size).cpu()
    n = int(blocks.max()) + 1
    on = torch.rand(b, n, generator=generator) < frac
    cut = torch.randint(0, block_size + 1, (b, n), generator=generator)
    cut = torch.where(on, cut, torch.zeros_like(cut))
    return ((positions.cpu() % block_size) < torch.gather(cut, 1, blocks.long())).to(positions.device)


@dataclass
class BDLMTerms:
    """What one noised forward produced; shared by the BDLM loss and CAP."""
    logits: Tensor | None  # [b, L, V] aligned noisy-half logits: logits[:, i] predicts token i (whatever the
    #                        alignment); None when the loss is chunked (cfg.loss_chunk_tokens > 0)
    pred: Tensor  # [b, L] argmax of those logits (-1 where not scored when chunked), not differentiated
    x0: Tensor  # [b, L] labels
    masked: Tensor  # [b, L] bool, M2T positions ([MASK] in x_t) that have a prediction
    corrupted: Tensor  # [b, L] bool, T2T positions (a wrong token in x_t), all False without the editing stream
    edit_region: Tensor  # [b, L] bool, visible eligible tokens of rows carrying the editing stream
    t: Tensor  # [b, L] mask ratio per token
    eligible: Tensor  # [b, L] bool, tokens that may be noised
    ce: Tensor  # [b, L] float32 cross-entropy of x0 under logits (0 where not scored when chunked)
    entropy: Tensor | None = None  # [b, L] float32 entropy of softmax(logits), when asked for (CAP)
    ar_loss: Tensor | None = None  # scalar AR next-token loss on the clean stream (when cfg.ar_weight > 0)
    ar_acc: float = 0.0


@dataclass
class BDLMForward:
    logits: Tensor | None  # [b, L, V] aligned: logits[:, i] predicts token i (None with hidden=True)
    scorable: Tensor  # [b, L] bool: token i has a prediction (False at a document's first token when shifted)
    clean_logits: Tensor | None = None  # [b, L, V] clean-stream logits (shift or causal clean stream), raw
    hidden: Tensor | None = None  # with hidden=True: [b, L, d] aligned normed hidden states, model.output(hidden)
    #                               gives `logits`
    clean_hidden: Tensor | None = None  # with hidden=True: [b, L, d] clean-stream hidden states, raw


def bdlm_forward(model, x_t: Tensor, x0: Tensor, *, block_size: int, doc_ids=None, positions=None,
                 noise_at: Tensor | None = None, embed_noise_std: float = 0.0, generator=None, shift: bool = False,
                 clean_causal: bool = False, need_clean: bool = False, block_positions=None,
                 hidden: bool = False) -> BDLMForward:
    """One forward of [x_t ; x0] under the block-diffusion training mask (x_t alone with full attention inside
    each document when B >= L); one forward gives every block's conditional. Returns logits aligned so that
    logits[:, i] predicts token i under either label alignment (see the module docstring). `block_positions`
    (default: the positions) place the block boundaries; RoPE always uses the positions. `hidden`: return the
    final normed hidden states instead of logits (aligned alike: the head is applied per position), for a loss
    that applies the head in chunks (chunked_ce.py)."""
    b, L = x0.shape
    device = x0.device
    positions = _positions(x0, doc_ids, positions)
    bpos = positions if block_positions is None else block_positions
    two_halves = block_size < L
    if not two_halves:
        inputs, pos = x_t, positions
        mask = build_mask("full", seq_len=L, device=device, doc_ids=doc_ids, positions=positions, batch=b)
    else:
        inputs, pos = torch.cat([x_t, x0], 1), torch.cat([positions, positions], 1)  # [b, 2L]
        mode = "bd_train_causal" if clean_causal else "bd_train"
        mask = build_mask(mode, seq_len=L, device=device, block_size=block_size,
                          doc_ids=doc_ids, positions=bpos, batch=b)
    h = model.embed(inputs)  # [b, T, d]
    if embed_noise_std > 0 and noise_at is not None:
        at = torch.zeros_like(inputs, dtype=torch.bool)
        at[:, :L] = noise_at
        noise = torch.randn(h.shape, generator=generator).to(device=device, dtype=h.dtype)
        h = h + noise * embed_noise_std * at[..., None]
    want_clean = two_halves and (shift or need_clean)
    out = model(inputs_embeds=h, positions=pos, mask=mask, logits_slice=None if want_clean else slice(0, L),
                return_hidden=hidden)
    noisy, clean = (out[:, :L], out[:, L:]) if want_clean else (out, None)
    scorable = torch.ones_like(x0, dtype=torch.bool)
    if shift:
        # token i from logit i-1 -- the noisy one inside a block, the clean one at a block's first slot
        aligned = torch.zeros_like(noisy)
        aligned[:, 1:] = noisy[:, :-1]
        if clean is not None:
            first = (bpos % block_size == 0)[:, 1:, None]
            aligned[:, 1:] = torch.where(first, clean[:, :-1], aligned[:, 1:])
        noisy, scorable = aligned, positions > 0
    if hidden:
        return BDLMForward(None, scorable, hidden=noisy, clean_hidden=clean)
    return BDLMForward(noisy, scorable, clean)


def token_ce(logits: Tensor, x0: Tensor) -> Tensor:
    b, L = x0.shape
    return F.cross_entropy(logits.float().reshape(b * L, -1), x0.reshape(-1), reduction="none").view(b, L)


def next_token_ce(logits: Tensor, x0: Tensor, doc_ids: Tensor | None, *, head=None,
                  chunk_tokens: int = 0) -> tuple[Tensor, float]:
    """AR loss from logits [b, L, V] of a causal stream over x0: (mean CE over in-document targets, accuracy).
    With `head` (the model's output layer), `logits` are the normed hidden states [b, L, d] and the head is
    applied `chunk_tokens` targets at a time (chunked_ce.scored_ce)."""
    b, L = x0.shape
    target = x0[:, 1:]
    valid = torch.ones_like(target, dtype=torch.bool) if doc_ids is None else doc_ids[:, 1:] == doc_ids[:, :-1]
    if head is not None:
        ce, pred = scored_ce(head, logits[:, :-1], target, valid, chunk_tokens=chunk_tokens)
        n = valid.sum().clamp_min(1)
        return ce.sum() / n, float((pred == target).sum() / n)  # pred is -1 off `valid`
    lg = logits[:, :-1]
    ce = F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="none").view(b, L - 1)
    loss = (ce * valid).sum() / valid.sum().clamp_min(1)
    with torch.no_grad():
        acc = float(((lg.argmax(-1) == target) & valid).sum() / valid.sum().clamp_min(1))
    return loss, acc


def diffusion_terms(model, batch: dict[str, Tensor], cfg: DiffusionLossConfig, *, generator=None,
                    embed_noise_std: float = 0.0, entropy: bool = False) -> BDLMTerms:
    """Noise the batch (masks; the editing corruption when cfg.t2t_ratio > 0) and run one forward. `entropy`:
    also the per-token entropy of the predictions (CAP)."""
    x0, x_t, masked, t, eligible, doc_ids, positions, bpos = noised_inputs(batch, cfg, generator)
    corrupted = region = torch.zeros_like(masked)
    if cfg.t2t_ratio > 0:
        x_t, corrupted, region = edit_corruption(x0, x_t, masked, eligible, ratio=cfg.t2t_ratio, rate_max=cfg.t2t_max_rate,
                                         vocab_size=cfg.t2t_vocab, exclude=cfg.t2t_exclude, generator=generator)
    L = x0.shape[1]
    ar_in_forward = cfg.ar_weight > 0 and cfg.clean_causal and cfg.block_size < L
    chunk = cfg.loss_chunk_tokens
    fw = bdlm_forward(model, x_t, x0, block_size=cfg.block_size, doc_ids=doc_ids, positions=positions,
                      noise_at=masked, embed_noise_std=embed_noise_std, generator=generator, shift=cfg.shift,
                      clean_causal=cfg.clean_causal, need_clean=ar_in_forward, block_positions=bpos, hidden=chunk > 0)
    sc = fw.scorable  # shifted labels: a document's first token has no prediction, so it is neither scored nor counted
    masked, corrupted, region = masked & sc, corrupted & sc, region & sc
    if chunk > 0:  # only the tokens some term reads (bdlm_loss_from_terms, CAP) go through the head
        ce, pred, *ent = scored_ce(model.output, fw.hidden, x0, masked | corrupted | region, chunk_tokens=chunk,
                                   entropy=entropy)
    else:
        ce, ent = token_ce(fw.logits, x0), [token_entropy(fw.logits)] if entropy else []
        with torch.no_grad():
            pred = fw.logits.argmax(-1)
    terms = BDLMTerms(fw.logits, pred, x0, masked, corrupted, region, t, eligible & sc, ce, *ent)
    if cfg.ar_weight > 0:
        if ar_in_forward:
            terms.ar_loss, terms.ar_acc = next_token_ce(fw.clean_logits if chunk == 0 else fw.clean_hidden, x0, doc_ids,
                                                        head=model.output if chunk > 0 else None, chunk_tokens=chunk)
        else:  # block-causal clean half (or none): one extra causal forward over the clean batch
            terms.ar_loss, m = ar_loss(model, batch, chunk_tokens=chunk)
            terms.ar_acc = m["next_token_acc"]
    return terms


def bdlm_loss_from_terms(terms: BDLMTerms, cfg: DiffusionLossConfig) -> tuple[Tensor, dict[str, float]]:
    ce, m, t, eligible = terms.ce, terms.masked.float(), terms.t, terms.eligible
    n_masked = m.sum()
    if cfg.weighting == "elbo":
        loss = (ce * m / t.clamp_min(1e-3)).sum() / eligible.sum().clamp_min(1)
    else:
        loss = (ce * m).sum() / n_masked.clamp_min(1)
    with torch.no_grad():
        pred = terms.pred
        correct = (pred == terms.x0) & terms.masked
        metrics = {
            "masked_nll": float((ce * m).sum() / n_masked.clamp_min(1)),
            "masked_acc": float(correct.sum() / n_masked.clamp_min(1)),
            "mask_frac": float(n_masked / eligible.sum().clamp_min(1)),
        }
    if cfg.t2t_ratio > 0:
        # Editing stream (LLaDA2.1 T2T): recover the original at every corrupted position, and (keep term) predict
        # the token itself at the visible tokens left intact in those rows. Without the keep term the model only
        # ever sees "a visible token in an edit row is wrong" and S-mode decoding rewrites correct tokens
        # (measured, dev/LOG.md). Token means, no 1/t: not terms of the likelihood bound (docs/post_training.md).
        c = terms.corrupted.float()
        n_c = c.sum()
        t2t = (ce * c).sum() / n_c.clamp_min(1)
        kept = (terms.edit_region & ~terms.corrupted).float()
        keep = (ce * kept).sum() / kept.sum().clamp_min(1)
        loss = loss + cfg.t2t_weight * (t2t + cfg.t2t_keep_weight * keep)
        with torch.no_grad():
            metrics.update(t2t_nll=float(t2t), t2t_keep_nll=float(keep), t2t_frac=float(n_c / eligible.sum().clamp_min(1)),
                           t2t_acc=float(((pred == terms.x0) & terms.corrupted).sum() / n_c.clamp_min(1)))
    if terms.ar_loss is not None:
        loss = loss + cfg.ar_weight * terms.ar_loss
        metrics.update(ar_nll=float(terms.ar_loss.detach()), ar_acc=terms.ar_acc)
    metrics = {"loss": float(loss.detach()), **metrics}
    return loss, metrics


def diffusion_loss(
    model,
    batch: dict[str, Tensor],
    cfg: DiffusionLossConfig,
    *,
    generator: torch.Generator | None = None,
    embed_noise_std: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """BDLM loss on [x_t ; x0] (MDLM on x_t alone when B >= L), plus the T2T editing loss when enabled.

    batch: input_ids [b, L] (x0), optional doc_ids / positions [b, L] from packing, optional loss_mask [b, L]
    (tokens that may be noised; SFT passes the response mask, so prompt tokens are never masked, corrupted or
    scored). Returns (scalar loss, metrics).
    """
    terms = diffusion_terms(model, batch, cfg, generator=generator, embed_noise_std=embed_noise_std)
    return bdlm_loss_from_terms(terms, cfg)


def sequence_elbo(model, x0: Tensor, x_t: Tensor, masked: Tensor, t: Tensor, *, block_size: int, doc_ids=None,
                  positions=None, shift: bool = False, clean_causal: bool = False,
                  chunk_tokens: int = LOSS_CHUNK_TOKENS) -> Tensor:
    """One-sample ELBO estimate per row, [b]: -sum over masked i of CE_i / t_i (a lower bound on log p(x0 | the
    unnoised tokens) in expectation over t and the mask). Used by DPO as the likelihood surrogate."""
    return -(masked_ce(model, x0, x_t, masked, block_size=block_size, doc_ids=doc_ids, positions=positions,
                       shift=shift, clean_causal=clean_causal, chunk_tokens=chunk_tokens) / t.clamp_min(1e-3)).sum(-1)


def masked_ce(model, x0: Tensor, x_t: Tensor, masked: Tensor, *, block_size: int, doc_ids=None, positions=None,
              shift: bool = False, clean_causal: bool = False, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> Tensor:
    """[b, L] float32 cross-entropy of x0 at the masked positions that have a prediction (0 elsewhere) from one
    forward of [x_t ; x0]; the head is applied `chunk_tokens` tokens at a time (0 = all logits at once)."""
    fw = bdlm_forward(model, x_t, x0, block_size=block_size, doc_ids=doc_ids, positions=positions, shift=shift,
                      clean_causal=clean_causal, hidden=chunk_tokens > 0)
    where = masked & fw.scorable
    if chunk_tokens > 0:
        return scored_ce(model.output, fw.hidden, x0, where, chunk_tokens=chunk_tokens)[0]
    return token_ce(fw.logits, x0) * where


def ar_loss(model, batch: dict[str, Tensor], cfg=None, *, chunk_tokens: int = LOSS_CHUNK_TOKENS,
            **_) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy with a causal mask inside each packed document (pretraining the AR parent).
    The last token of each document has no target inside its document and is excluded. The head is applied
    `chunk_tokens` targets at a time (chunked_ce.py; 0 = all logits at once)."""
    x = batch["input_ids"]
    b, L = x.shape
    doc_ids, positions = batch.get("doc_ids"), batch.get("positions")
    mask = build_mask("causal", seq_len=L, device=x.device, doc_ids=doc_ids, positions=positions, batch=b)
    chunked = chunk_tokens > 0
    out = model(x, positions=positions, mask=mask, return_hidden=chunked)
    loss, acc = next_token_ce(out, x, doc_ids, head=model.output if chunked else None, chunk_tokens=chunk_tokens)
    return loss, {"loss": float(loss.detach()), "next_token_acc": acc}


@torch.no_grad()
def elbo_nll(model, batches, *, mask_token_id: int, block_size: int, eps: float = 1e-3, seed: int = 1234,
             shift: bool = False, clean_causal: bool = False) -> float:
    """Per-token negative ELBO (nats) over held-out batches with t ~ U[eps, 1] and a fixed noise seed, so
    successive evaluations differ only by the model. exp() of it is the ELBO perplexity (an upper bound on
    the true perplexity)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = DiffusionLossConfig(mask_token_id=mask_token_id, block_size=block_size, weighting="elbo", t_lo=eps, t_hi=1.0,
                              shift=shift, clean_causal=clean_causal)
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
