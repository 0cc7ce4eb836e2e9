"""Batch sources and objectives of the post-training recipes (SFT, CAP, DPO, RL): what `train/loop.py` needs to
run them through the same loop as conversion. A source has `next_batch()`, `state_dict()` (JSON-able) and
`load_state_dict()`; the objective is `f(model, batch, generator, embed_noise_std) -> (loss, metrics)`.
"""

from __future__ import annotations

from ..data.post_data import chat_rows, read_chat, read_pairs, read_rl_prompts
from ..data.packing import BatchStream, PackedDataset
from ..objectives.cap import CAPConfig, cap_loss
from ..objectives.diffusion import DiffusionLossConfig, ar_loss, diffusion_loss
from ..objectives.policy import EBPOConfig, ebpo_loss
from ..objectives.preference import DPOConfig, dpo_loss
from .recipe import Recipe
from .rollout import RolloutConfig, RolloutSource


def special_ids(tok) -> tuple[int, ...]:
    """Ids the T2T corruption never draws: every special added token plus EOS / pad / BOS / [MASK]."""
    ids = {i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special}
    ids |= {i for i in (*tok.eos_ids, tok.pad_id, tok.bos_id, tok.mask_id) if i is not None}
    return tuple(sorted(ids))


def _alignment(info) -> dict:
    """The checkpoint's label alignment as objective-config fields (LLaDA2's defaults without diffusion info)."""
    if info is None:
        return {"shift": False, "clean_causal": False}
    return {"shift": info.shift, "clean_causal": info.causal_clean}


def ebpo_config(recipe: Recipe, mask_id: int, block_size: int, info=None) -> EBPOConfig:
    q = recipe.rl
    return EBPOConfig(mask_token_id=mask_id, block_size=block_size, n_timesteps=q.n_timesteps, t_lo=q.t_lo,
                      t_hi=q.t_hi, eps_low=q.eps_low, eps_high=q.eps_high, **_alignment(info))


def make_objective(recipe: Recipe, block_size: int, mask_id: int | None, tok, ref_model=None, info=None):
    """The recipe's objective at this phase's block size, as f(model, batch, generator, embed_noise_std).
    `info` is the model's DiffusionInfo: its label alignment and clean stream reach every objective."""
    o = recipe.objective
    align = _alignment(info)
    if o.kind == "ar":
        return lambda model, batch, gen, std: ar_loss(model, batch)
    if o.kind == "dpo":
        cfg = DPOConfig(mask_token_id=mask_id, block_size=block_size, beta=o.beta, t_lo=o.t_lo, t_hi=o.t_hi,
                        sft_weight=o.dpo_sft_weight, samples=o.dpo_samples, eos_id=tok.eos_id,
                        answer_only=o.dpo_answer_only, **align)
        return lambda model, batch, gen, std: dpo_loss(model, batch, cfg, ref_model=ref_model, generator=gen)
    if o.kind == "rl":
        cfg = ebpo_config(recipe, mask_id, block_size, info)
        return lambda model, batch, gen, std: ebpo_loss(model, batch, cfg)
    dcfg = DiffusionLossConfig(mask_token_id=mask_id, block_size=block_size, weighting=o.weighting, t_lo=o.t_lo,
                               t_hi=o.t_hi, t_per=o.t_per, complementary=o.complementary, t2t_ratio=o.t2t_ratio,
                               t2t_max_rate=o.t2t_max_rate, t2t_weight=o.t2t_weight,
                               t2t_keep_weight=o.t2t_keep_weight,
                               t2t_vocab=tok.vocab_size if o.t2t_ratio > 0 else 0,
                               t2t_exclude=special_ids(tok) if o.t2t_ratio > 0 else (), ar_weight=o.ar_weight,
                               mask_slope=o.mask_slope, mask_suffix=o.mask_suffix, **align)
    if o.cap:
        cfg = CAPConfig(dcfg, lam=o.cap_lambda)
        return lambda model, batch, gen, std: cap_loss(model, batch, cfg, generator=gen, embed_noise_std=std)
    return lambda model, batch, gen, std: diffusion_loss(model, batch, dcfg, generator=gen, embed_noise_std=std)


def _batches(rows: PackedDataset, limit: int, batch_size: int, device) -> list[dict]:
    n = min(limit, len(rows))
    out = []
    for i in range(0, n, batch_size):
        sl = slice(i, min(i + batch_size, n))
        out.append({"input_ids": rows.input_ids[sl].to(device), "doc_ids": rows.doc_ids[sl].to(device),
                    "positions": rows.positions[sl].to(device), "loss_mask": rows.loss_mask[sl].to(device)})
    return out


def post_training_sources(recipe: Recipe, tok, model, device) -> tuple[object, list[dict]]:
    """(train batch source, validation batches for the ELBO of response tokens) for kind sft / dpo / rl."""
    d, t, kind = recipe.data, recipe.train, recipe.objective.kind
    B = recipe.phases[-1].block_size
    if kind == "sft":
        def rows(paths):
            exs = read_chat(paths, tok, block_size=B, seq_len=d.seq_len, over_length=d.over_length)
            return chat_rows(exs, d.seq_len, tok.pad_id, pack=d.pack)
        valid = _batches(rows(d.valid), d.valid_rows, t.batch_size, device) if d.valid else []
        return BatchStream(rows(d.train), t.batch_size, seed=t.seed), valid
    if kind == "dpo":
        def pairs(paths):
            return read_pairs(paths, tok, block_size=B, seq_len=d.seq_len, over_length=d.over_length,
                              system=d.system or None)
        valid = []
        if d.valid:  # the validation ELBO is measured on the chosen answers
            p = pairs(d.valid)
            chosen = PackedDataset(p.input_ids[:, 0], p.doc_ids[:, 0], p.positions[:, 0], p.loss_mask[:, 0])
            valid = _batches(chosen, d.valid_rows, t.batch_size, device)
        return BatchStream(pairs(d.train), t.batch_size, seed=t.seed), valid
    if kind == "rl":
        q = recipe.rl
        prompts = read_rl_prompts(d.train, system=d.system or None, n_tasks=q.tasks, seed=t.seed)
        rcfg = RolloutConfig(prompts_per_step=q.prompts_per_step, group_size=q.group_size, temperature=q.temperature,
                             threshold=q.threshold, steps=q.steps, max_new_tokens=q.max_new_tokens, reward=q.reward,
                             minibatches=q.minibatches)
        return RolloutSource(prompts, tok, model, rcfg, ebpo_config(recipe, tok.mask_id, B, model.cfg.diffusion),
                             seed=t.seed), []
    raise ValueError(f"no post-training source for objective kind {kind!r}")
