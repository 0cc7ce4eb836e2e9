"""Training tasks: what the one training loop (train/loop.py) asks of a run, per recipe [objective] kind.

A task owns, for its kind:
- `batches(...)`: the train batch source (`next_batch()`, `state_dict()` JSON-able, `load_state_dict()`) and the
  held-out batches (conversion and AR pretraining read documents, pack them and stream rows; SFT / DPO / RL read
  their own jsonl formats);
- `objective(block_size)`: `f(model, batch, generator, embed_noise_std) -> (loss, metrics)` at a phase's block
  size, built from the recipe's section(s) for this kind (train/recipe.py KIND_SECTIONS) plus the run-time fields
  (the [MASK] id, the block size, the checkpoint's label alignment);
- `evaluate(model, batches, block_size)`: held-out NLL per token (negative ELBO, or next-token NLL for AR);
- `noise_std0(model)`: the embedding-noise std at step 0 (conversion only);
- `reference`: whether the objective needs a frozen copy of the starting model (DPO).
The loop never branches on the kind: it calls these.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..data.chat_template import ChatTemplate
from ..data.packing import BatchStream, PackedDataset, PackedRows
from ..data.post_data import chat_rows, read_chat, read_pairs, read_rl_prompts
from ..data.token_cache import corpus_tokens
from ..model.config import DiffusionInfo, effective_block_size
from ..objectives.cap import cap_loss
from ..objectives.diffusion import ar_loss, ar_nll, diffusion_loss, elbo_nll
from ..objectives.policy import ebpo_loss
from ..objectives.preference import dpo_loss
from .rollout import RolloutSource

if TYPE_CHECKING:
    from .recipe import Recipe

Objective = Callable[..., tuple[torch.Tensor, dict]]


def special_ids(tok) -> tuple[int, ...]:
    """Ids the T2T corruption never draws: every special added token plus EOS / pad / BOS / [MASK]."""
    ids = {i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special}
    ids |= {i for i in (*tok.eos_ids, tok.pad_id, tok.bos_id, tok.mask_id) if i is not None}
    return tuple(sorted(ids))


def alignment_fields(info: DiffusionInfo | None) -> dict:
    """The checkpoint's label alignment as objective-config fields (LLaDA2's defaults without diffusion info)."""
    if info is None:
        return {"shift": False, "clean_causal": False}
    return {"shift": info.shift, "clean_causal": info.causal_clean}


def _batches(rows: PackedDataset | PackedRows, limit: int, batch_size: int, device,
             loss_mask: bool = True) -> list[dict]:
    n = min(limit, len(rows))
    out = []
    for i in range(0, n, batch_size):
        b = rows.rows(torch.arange(i, min(i + batch_size, n)))
        if not loss_mask:
            b.pop("loss_mask", None)
        out.append({k: v.to(device) for k, v in b.items()})
    return out


class Task(ABC):
    """The base: a block-diffusion task (a [MASK] token, the ELBO as held-out metric)."""

    kind = ""
    diffusion = True  # needs a [MASK] token and writes the `blockdiff` section
    reference = False  # the objective compares against a frozen copy of the starting model

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.tok = None
        self.model = None
        self.ref_model = None

    def bind(self, model, tok) -> None:
        """The prepared starting model and tokenizer (before any resumed weights are loaded)."""
        self.model, self.tok = model, tok
        if self.reference:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    @property
    def mask_id(self) -> int | None:
        return self.tok.mask_id if self.diffusion else None

    @property
    def final_block_size(self) -> int:
        """The last phase's effective block size: what the checkpoint records and the data is padded to."""
        return effective_block_size(self.recipe.phases[-1].block_size, seq_len=self.recipe.data.seq_len)

    def _runtime(self, block_size: int) -> dict:
        return {"mask_token_id": self.mask_id, "block_size": block_size,
                **alignment_fields(self.model.cfg.diffusion)}

    def noise_std0(self, model) -> float:
        return 0.0

    @abstractmethod
    def batches(self, device, run_dir: Path) -> tuple[object, list[dict]]:
        """(train batch source, held-out batches) of this kind."""

    @abstractmethod
    def objective(self, block_size: int) -> Objective:
        """f(model, batch, generator, embed_noise_std) -> (loss, metrics) at this phase's block size."""

    def evaluate(self, model, batches: list[dict], block_size: int) -> float:
        info = model.cfg.diffusion
        return elbo_nll(model, batches, mask_token_id=self.mask_id, block_size=block_size, shift=info.shift,
                        clean_causal=info.causal_clean)


class Conversion(Task):
    """kind "diffusion": continual pretraining of an AR parent on documents (the WSD conversion)."""

    kind = "diffusion"

    def batches(self, device, run_dir):
        r = self.recipe
        train, valid = load_corpus(r, self.tok, run_dir)
        stream = BatchStream(train, r.train.batch_size, seed=r.train.seed)
        held = _batches(valid, r.data.valid_rows, r.train.batch_size, device, loss_mask=False) if valid else []
        return stream, held

    def noise_std0(self, model) -> float:
        return self.recipe.noise.std0(model)

    def _diffusion_config(self, block_size: int):
        d, tok = self.recipe.diffusion, self.tok
        t2t = {"t2t_vocab": tok.vocab_size, "t2t_exclude": special_ids(tok)} if d.t2t_ratio > 0 else {}
        return dataclasses.replace(d, **self._runtime(block_size), **t2t)

    def objective(self, block_size):
        cfg = self._diffusion_config(block_size)
        return lambda model, batch, gen, std: diffusion_loss(model, batch, cfg, generator=gen, embed_noise_std=std)


class Pretraining(Conversion):
    """kind "ar": next-token pretraining (the bundled base model); block size 1, no [MASK]."""

    kind = "ar"
    diffusion = False

    def noise_std0(self, model) -> float:
        return 0.0

    def objective(self, block_size):
        return lambda model, batch, gen, std: ar_loss(model, batch)

    def evaluate(self, model, batches, block_size):
        return ar_nll(model, batches)


class SFT(Conversion):
    """kind "sft": the diffusion loss on chat rows (prompt never noised), CAP when [cap] lam > 0."""

    kind = "sft"

    def noise_std0(self, model) -> float:
        return 0.0

    def batches(self, device, run_dir):
        r, d, tok = self.recipe, self.recipe.data, self.tok

        def rows(paths, split):
            exs = read_chat(paths, tok, block_size=self.final_block_size, seq_len=d.seq_len, over_length=d.over_length,
                            field=d.messages_field or "messages", split=split)
            return chat_rows(exs, d.seq_len, tok.pad_id, pack=d.pack)

        valid = _batches(rows(d.valid, d.valid_split), d.valid_rows, r.train.batch_size, device) if d.valid else []
        return BatchStream(rows(d.train, d.split), r.train.batch_size, seed=r.train.seed), valid

    def objective(self, block_size):
        dcfg = self._diffusion_config(block_size)
        if self.recipe.cap.lam > 0:
            cfg = dataclasses.replace(self.recipe.cap, diffusion=dcfg)
            return lambda model, batch, gen, std: cap_loss(model, batch, cfg, generator=gen, embed_noise_std=std)
        return lambda model, batch, gen, std: diffusion_loss(model, batch, dcfg, generator=gen, embed_noise_std=std)


class DPO(Task):
    """kind "dpo": DPO on the ELBO from preference pairs against the frozen starting model."""

    kind = "dpo"
    reference = True

    def _pairs(self, paths):
        d = self.recipe.data
        return read_pairs(paths, self.tok, block_size=self.final_block_size, seq_len=d.seq_len,
                          over_length=d.over_length, system=d.system or None)

    def batches(self, device, run_dir):
        r, d = self.recipe, self.recipe.data
        valid = []
        if d.valid:  # the validation ELBO is measured on the chosen answers
            p = self._pairs(d.valid)
            chosen = PackedDataset(p.input_ids[:, 0], p.doc_ids[:, 0], p.positions[:, 0], p.loss_mask[:, 0])
            valid = _batches(chosen, d.valid_rows, r.train.batch_size, device)
        return BatchStream(self._pairs(d.train), r.train.batch_size, seed=r.train.seed), valid

    def objective(self, block_size):
        cfg = dataclasses.replace(self.recipe.dpo, **self._runtime(block_size), eos_id=self.tok.eos_id)
        ref = self.ref_model
        return lambda model, batch, gen, std: dpo_loss(model, batch, cfg, ref_model=ref, generator=gen)


class RL(Task):
    """kind "rl": EBPO with rollouts of the block decoder."""

    kind = "rl"

    def _ebpo(self, block_size: int):
        return dataclasses.replace(self.recipe.ebpo, **self._runtime(block_size))

    def batches(self, device, run_dir):
        r = self.recipe
        prompts = read_rl_prompts(r.data.train, system=r.data.system or None, n_tasks=r.rollout.tasks,
                                  seed=r.train.seed)
        return RolloutSource(prompts, self.tok, self.model, r.rollout, self._ebpo(self.final_block_size),
                             seed=r.train.seed), []

    def objective(self, block_size):
        cfg = self._ebpo(block_size)
        return lambda model, batch, gen, std: ebpo_loss(model, batch, cfg)


TASKS: dict[str, type[Task]] = {t.kind: t for t in (Conversion, Pretraining, SFT, DPO, RL)}


def make_task(recipe: Recipe) -> Task:
    return TASKS[recipe.objective.kind](recipe)


def default_cache_dir() -> Path:
    """Where tokenised corpora are cached between runs (keyed by the data files and the tokenizer, so any run may
    reuse them): $BLOCKDIFF_CACHE, else $XDG_CACHE_HOME/blockdiff, else ~/.cache/blockdiff (the usual user cache,
    as Hugging Face's is). `[data] cache_dir` overrides it per recipe."""
    if os.environ.get("BLOCKDIFF_CACHE"):
        return Path(os.environ["BLOCKDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blockdiff"


def load_corpus(recipe: Recipe, tok, run_dir: Path) -> tuple[PackedRows, PackedRows | None]:
    """Sources -> documents -> tokens (streamed once into the memory-mapped cache, data/token_cache.py) -> rows
    packed on demand, for conversion and AR pretraining. `[data] messages_field` rows are rendered with the
    checkpoint's chat template."""
    cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else default_cache_dir() / "tokens"
    d = recipe.data
    template = ChatTemplate(tok) if d.messages_field else None
    chat = {"messages_field": d.messages_field, "render": template.render, "template": template.source} \
        if template else {}

    def build(entries: list[str], split: str) -> PackedRows:
        corpus = corpus_tokens(entries, tok, cache, split=split, text_field=d.text_field, **chat)
        return PackedRows(corpus, d.seq_len, pad_id=tok.pad_id, eos_pad_multiple=d.eos_pad_multiple)

    train = build(d.train, d.split)
    valid = build(d.valid, d.valid_split) if d.valid else None
    return train, valid
