"""RL rollouts for EBPO: prompts -> G sampled answers per prompt through the block decoder -> rewards ->
group-relative advantages -> a training batch with its noise sample and the rollout policy's log-likelihoods.

`generate_responses` is the one place that calls the decoding engine (`decode.engine.generate`, batched: all
prompts x G samples of a rollout decode together).

Resume: the source owns its rollout generator (sampling, prompt order, noise) and any minibatches of the current
rollout not yet trained on; `state_dict` holds both (JSON-able), so a resumed run rolls out exactly what an
uninterrupted one would.

Many ranks (torchrun + FSDP2, docs/distributed.md): the block decoder's number of forwards depends on the sampled
text, so decoding through the sharded model (an all-gather per block per forward) would deadlock when ranks decode
different prompts. Instead every rollout gathers one plain full copy of the current weights on each rank
(`parallel.full_replica`, one collective), each rank decodes its contiguous share of the prompt groups with no
collective inside the decoding loop, and the responses are all-gathered, so every rank holds the whole global
rollout and builds the same minibatches from it. The rollout generator advances identically on every rank (it
draws one seed per rollout; group g decodes with its own generator seeded `seed + g`), so the source's state is the
same on every rank and for every rank count, and kill-and-resume stays exact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist_

from ..data.chat_template import ChatTemplate, answer_text, encode_prompt
from ..data.post_data import RLPrompt
from ..data.tasks import TaskExample, is_correct
from ..decode.engine import DecodeConfig, generate
from ..objectives.policy import EBPOConfig, elbo_logp, group_advantages, sample_timesteps


def _exact(output: str, answer: str) -> float:
    return float(is_correct(TaskExample("user", "", answer.strip()), output))


def _contains(output: str, answer: str) -> float:
    return float(answer.strip() in output)


REWARDS = {"exact": _exact, "contains": _contains}  # reward(output text, reference answer) -> [0, 1]


def _rollout_decoding() -> DecodeConfig:
    # LLaDA2.0 threshold decoding, sampled (temperature > 0, so a group's answers differ), short answers.
    return DecodeConfig(mode="threshold", temperature=0.8, max_new_tokens=32)


@dataclass
class RolloutConfig:
    """RL rollouts; also the recipe sections [rollout] and [rollout.decode] (kind "rl")."""

    prompts_per_step: int = 4  # prompts per rollout
    group_size: int = 4  # G samples per prompt (group-relative advantages need G >= 2)
    reward: str = "exact"  # key of REWARDS
    minibatches: int = 1  # optimiser steps per rollout (p_old differs from p_theta from the 2nd on)
    max_resample: int = 4  # rollouts tried per step before giving up on finding a group with nonzero advantage
    tasks: int = 2000  # prompts drawn from the synthetic tasks when [data] train = ["tasks"]
    decode: DecodeConfig = field(default_factory=_rollout_decoding)  # how answers are sampled; B = the phase's

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "minibatches", "max_resample", "tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (group-relative advantages), got {self.group_size}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        if self.decode.temperature <= 0:
            raise ValueError(f"decode.temperature must be > 0 (a group of greedy samples is identical), "
                             f"got {self.decode.temperature}")


def generate_responses(model, prompts: list[list[int]], cfg: RolloutConfig, *, block_size: int, mask_id: int,
                       eos_ids, generator: torch.Generator) -> list[list[int]]:
    """Adapter to the decoding engine: one sampled response (ids, trimmed at EOS) per prompt."""
    dcfg = dataclasses.replace(cfg.decode, block_size=block_size)
    return [g.tokens for g in generate(model, prompts, dcfg, mask_id=mask_id, eos_ids=eos_ids, generator=generator)]


def _to_json(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.flatten().tolist()}


def _from_json(d: dict) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"])).view(d["shape"])


def _fsdp_wrapped(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) and dist_.is_initialized()


class RolloutSource:
    """Batch source of the RL recipe: `next_batch()` -> dict for `ebpo_loss`. Under FSDP every rank gets the whole
    global minibatch (`splits_across_ranks`: the rollout's decoding is what is split, see the module docstring)."""

    splits_across_ranks = True  # parallel.shard_batches passes it through unsplit

    def __init__(self, prompts: list[RLPrompt], tok, model, cfg: RolloutConfig, ebpo: EBPOConfig, *, seed: int):
        if not prompts:
            raise ValueError("RL needs at least one prompt")
        self.prompts, self.tok, self.model, self.cfg, self.ebpo = prompts, tok, model, cfg, ebpo
        self.template = ChatTemplate(tok)
        self.generator = torch.Generator().manual_seed(seed + 7919)  # rollout RNG, independent of the noise RNG
        self.order = torch.randperm(len(prompts), generator=self.generator).tolist()
        self.cursor = 0
        self.rollouts = 0
        self.pending: list[dict] = []

    def _take_prompts(self) -> list[RLPrompt]:
        out = []
        for _ in range(self.cfg.prompts_per_step):
            if self.cursor == len(self.order):
                self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
                self.cursor = 0
            out.append(self.prompts[self.order[self.cursor]])
            self.cursor += 1
        return out

    @torch.no_grad()
    def _rollout(self) -> list[dict]:
        c, B, tok = self.cfg, self.ebpo.block_size, self.tok
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        split = _fsdp_wrapped(self.model)
        decoder = None
        if split:
            from .parallel import full_replica

            decoder = full_replica(self.model, device)  # every rank, before any rank decodes
        rows, advs, all_rewards = [], [], []
        for _ in range(c.max_resample):
            prompts = self._take_prompts()
            ids = [encode_prompt(p.messages, tok, self.template) for p in prompts]
            flat = [i for i in ids for _ in range(c.group_size)]
            if split:
                resp = self._decode_split(decoder, ids, B)
            else:
                resp = generate_responses(self.model, flat, c, block_size=B, mask_id=self.ebpo.mask_token_id,
                                          eos_ids=tok.eos_ids, generator=self.generator)
            self.rollouts += 1
            rewards = torch.tensor([REWARDS[c.reward](answer_text(tok, r), prompts[k // c.group_size].answer)
                                    for k, r in enumerate(resp)]).view(len(prompts), c.group_size)
            all_rewards.append(rewards)
            adv, keep = group_advantages(rewards)
            for g in range(len(prompts)):
                if keep[g]:
                    for j in range(c.group_size):
                        k = g * c.group_size + j
                        rows.append((flat[k], resp[k]))
                        advs.append(float(adv[g, j]))
            if rows:
                break
        del decoder
        reward_mean = torch.cat(all_rewards).mean().view(1)
        self.model.train(was_training)
        if not rows:
            empty = torch.zeros(0, B, dtype=torch.long)
            return [{"input_ids": empty, "loss_mask": empty.bool(), "reward_mean": reward_mean}]
        # Prompt + response + EOS, EOS-padded to a multiple of B, then to the longest row (as SFT rows).
        seqs = []
        for p, r in rows:
            s = p + r + [tok.eos_id]
            s += [tok.eos_id] * (-len(s) % B)
            seqs.append((s, len(p)))
        L = max(len(s) for s, _ in seqs)
        input_ids = torch.full((len(seqs), L), tok.eos_id, dtype=torch.long)
        loss_mask = torch.zeros((len(seqs), L), dtype=torch.bool)
        for i, (s, p) in enumerate(seqs):
            input_ids[i, : len(s)] = torch.tensor(s)
            loss_mask[i, p:] = True
        t, masked = sample_timesteps(loss_mask, self.ebpo, self.generator)
        batch = {"input_ids": input_ids.to(device), "loss_mask": loss_mask.to(device), "t": t.to(device),
                 "masked": masked.to(device), "advantages": torch.tensor(advs, device=device)}
        batch["old_logp"] = elbo_logp(self.model, batch, self.ebpo).detach()
        # Split the rollout into minibatches (one optimiser step each); the noise columns go with their rows.
        chunks = torch.arange(len(seqs)).tensor_split(max(1, min(c.minibatches, len(seqs))))
        out = []
        for idx in chunks:
            mb = {k: (v[:, idx] if k in ("t", "masked") else v[idx]) for k, v in batch.items()}
            mb = {k: v.cpu() for k, v in mb.items()}
            mb["reward_mean"] = reward_mean
            out.append(mb)
        return out

    def _decode_split(self, decoder, ids: list[list[int]], block_size: int) -> list[list[int]]:
        """The responses of all groups (prompt-major, G per prompt, as one process orders them): this rank decodes
        groups [rank*P/world, (rank+1)*P/world) on its full replica, then one all-gather. Group g samples with a
        generator seeded from the rollout's seed + g, so the global rollout does not depend on the rank count."""
        c = self.cfg
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        rank, world = dist_.get_rank(), dist_.get_world_size()
        P = len(ids)
        mine = []
        for g in range(rank * P // world, (rank + 1) * P // world):
            gen = torch.Generator().manual_seed(seed + g)
            mine.append(generate_responses(decoder, [ids[g]] * c.group_size, c, block_size=block_size,
                                           mask_id=self.ebpo.mask_token_id, eos_ids=self.tok.eos_ids, generator=gen))
        shares: list = [None] * world
        dist_.all_gather_object(shares, mine)
        return [r for share in shares for group in share for r in group]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if not self.pending:
            self.pending = self._rollout()
        return self.pending.pop(0)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist(), "order": self.order, "cursor": self.cursor,
                "rollouts": self.rollouts,
                "pending": [{k: _to_json(v) for k, v in mb.items()} for mb in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.order, self.cursor, self.rollouts = list(state["order"]), int(state["cursor"]), int(state["rollouts"])
        self.pending = [{k: _from_json(v) for k, v in mb.items()} for mb in state["pending"]]
