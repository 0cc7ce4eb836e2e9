"""The one checkpoint loader: an HF-format folder -> model, tokenizer and diffusion facts, checked together.

Every CLI verb, benchmark, evaluation and test that opens a checkpoint goes through `load_checkpoint` (as
nanochat's checkpoint manager does), so the checks live in one place:
- the weights and config.json load first (`model.hf_io.load_pretrained`: its errors name the folder and field);
- the tokenizer must fit the embedding table;
- the [MASK] id has three possible sources -- the `blockdiff` section of config.json (`mask_token_id`, what the
  model was trained with: the owner), the tokenizer's declared mask token (`Tokenizer.mask_id`) and, for official
  LLaDA2 folders without our section, `mask_token_id` in config.json or the tokenizer's `<|mask|>`
  (`hf_io._llada2_diffusion_info`). When the tokenizer names a mask token it must be the same id, else the folder
  is refused with both ids named (decoding would otherwise write one token and read another).

`Loaded.generate` is the one place that chooses between AR decoding (checkpoints without a `blockdiff` section,
or `ar=True`) and block decoding (the batched engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .data.tokenizer import Tokenizer, load_tokenizer
from .decode.engine import DecodeConfig, Generation, ar_generate, generate
from .model import mask_adapter
from .model.config import DiffusionInfo
from .model.hf_io import load_pretrained
from .model.transformer import Transformer


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    path: Path

    @property
    def info(self) -> DiffusionInfo | None:
        """The checkpoint's block-diffusion facts (mask id, trained block size, label alignment); None for AR."""
        return self.model.cfg.diffusion

    @property
    def is_diffusion(self) -> bool:
        return self.info is not None

    def decode_config(self, **fields) -> DecodeConfig:
        """A DecodeConfig for this checkpoint: `fields` as given, the block size resolved from the checkpoint
        when not given (or given as None / 0)."""
        if not fields.get("block_size"):
            fields["block_size"] = None
        return DecodeConfig(**fields).for_model(self.model)

    def generate(self, prompts: list[list[int]], cfg: DecodeConfig | None = None, *, ar: bool = False,
                 max_new_tokens: int | None = None, temperature: float = 0.0, generator: torch.Generator | None = None,
                 stop=(), on_step: Callable | None = None) -> list[Generation]:
        """Decode a batch of prompts with the checkpoint's own kind: block decoding through the engine with
        `cfg` for a block-diffusion checkpoint, greedy/sampled AR decoding (one prompt at a time, KV cache) for an
        AR checkpoint or when `ar` is set. `max_new_tokens` / `temperature` default to the cfg's."""
        tok = self.tokenizer
        if cfg is None:
            cfg = self.decode_config(max_new_tokens=max_new_tokens or 128, temperature=temperature)
        budget = max_new_tokens or cfg.max_new_tokens
        if ar or not self.is_diffusion:
            return [ar_generate(self.model, ids, max_new_tokens=budget, eos_ids=tok.eos_ids,
                                temperature=cfg.temperature, generator=generator) for ids in prompts]
        return generate(self.model, prompts, cfg.for_model(self.model), mask_id=self.info.mask_token_id,
                        eos_ids=tok.eos_ids, generator=generator, stop=stop, decode=tok.decode if stop else None,
                        on_step=on_step)


def check_mask_id(folder: Path, info: DiffusionInfo | None, tok: Tokenizer, vocab_size: int) -> None:
    """Refuse a folder whose [MASK] ids disagree or fall outside the vocabulary (see the module docstring)."""
    if info is None:
        return
    if not 0 <= info.mask_token_id < vocab_size:
        raise ValueError(f"{folder}/config.json: blockdiff.mask_token_id = {info.mask_token_id} is outside the "
                         f"vocabulary [0, {vocab_size})")
    if tok.mask_id is not None and tok.mask_id != info.mask_token_id:
        raise ValueError(f"{folder}: config.json blockdiff.mask_token_id is {info.mask_token_id} but the tokenizer's "
                         f"mask token {tok.mask_token!r} has id {tok.mask_id}; they must name the same token")


def load_checkpoint(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    train: bool = False, base: str | Path | None = None) -> Loaded:
    """Load an HF-format folder (ours, an AR parent, or an official LLaDA2 / Ling 2.0 one), or a mask-only adapter
    folder over its base (model/mask_adapter.py: the base's hash is checked; `base` overrides where the base is
    looked for). The model is in eval mode unless `train`."""
    folder = Path(folder)
    if base is None:
        model = load_pretrained(folder, device=device, dtype=dtype)  # first: its errors name the folder and config.json
    elif mask_adapter.is_adapter_folder(folder):
        model = mask_adapter.load(folder, device=device, dtype=dtype, base=base)
    else:
        raise ValueError(f"{folder}: base= is for adapter folders ({mask_adapter.ADAPTER_JSON}); this is not one")
    tok = load_tokenizer(folder)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{folder}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.cfg.vocab_size}")
    check_mask_id(folder, model.cfg.diffusion, tok, model.cfg.vocab_size)
    model.train(train)
    return Loaded(model, tok, folder)
