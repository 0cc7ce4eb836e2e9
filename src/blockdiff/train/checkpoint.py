"""Training checkpoints: an HF-layout model folder (loadable by `blockdiff generate` and by transformers) plus
everything needed for an exact resume -- optimiser state, RNG states, data-stream position, trainer state and
the resolved recipe. Each checkpoint is written to a temporary folder and renamed into place, so a crash
mid-save never leaves a partial checkpoint, and an existing one is never overwritten in place.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json
from ..model.hf_io import read_json, save_pretrained

STATE_NAME = "trainer_state.json"
OPTIM_NAME = "optimizer.pt"
RNG_NAME = "rng.pt"
RECIPE_NAME = "recipe.json"
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def rng_state(generator: torch.Generator) -> dict:
    return {
        "noise": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["noise"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    trainer_state: dict,
    recipe: dict,
) -> Path:
    """Save after `step` optimiser steps (trainer_state["step"] == step is the next step to run)."""
    out = checkpoint_dir(run_dir, step)

    def write_extra(tmp: Path) -> None:
        torch.save(optimizer.state_dict(), tmp / OPTIM_NAME)
        torch.save(rng_state(generator), tmp / RNG_NAME)
        write_json(tmp / STATE_NAME, trainer_state)
        write_json(tmp / RECIPE_NAME, recipe)

    return save_pretrained(model, out, tokenizer=tokenizer, write_extra=write_extra)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (a trainer_state.json present), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_state(ckpt: Path) -> dict:
    return read_json(Path(ckpt) / STATE_NAME)


def load_resume_state(ckpt: Path, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict:
    """Restore optimiser and RNG states in place; returns the trainer state."""
    ckpt = Path(ckpt)
    optimizer.load_state_dict(torch.load(ckpt / OPTIM_NAME, map_location="cpu", weights_only=False))
    set_rng_state(torch.load(ckpt / RNG_NAME, weights_only=False), generator)
    return load_trainer_state(ckpt)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete old step checkpoints beyond the newest `keep_last`, never a phase-end checkpoint."""
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    removable = [c for c in ckpts[:-keep_last] if not load_trainer_state(c).get("phase_end")]
    for c in removable:
        shutil.rmtree(c, ignore_errors=True)
