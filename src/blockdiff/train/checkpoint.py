"""Training checkpoints: an HF-layout model folder (loadable by `blockdiff generate`, top-k merge and transformers)
plus, in the newest checkpoint only, everything needed for an exact resume.

    checkpoints/step_000120/
      config.json, model*.safetensors, tokenizer files   the consolidated weights (rank 0 writes them)
      trainer_state.json, recipe.json                    step, phase, data position, evals; the resolved recipe
      resume/                                            torch.distributed.checkpoint (DCP): model + optimizer,
                                                         one shard file per rank (newest checkpoint only)
      rng/rank_00000.pt ...                              every rank's RNG states (newest checkpoint only)

The resume state is what a run needs to continue, and only the newest checkpoint is ever continued from, so once
a checkpoint is complete the resume state of the older ones is deleted: they keep their weights (for merging and
evaluation), not 2x more in Adam moments. DCP reshards on load, so a run saved on N ranks resumes on M (docs/
distributed.md). Each checkpoint is assembled in a hidden `.step_N.partial` folder and renamed into place, so a
kill mid-save leaves the previous checkpoint, resume state included, untouched. Checkpoints of the earlier format
(optimizer.pt and rng.pt in every folder) still resume.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json
from ..model.hf_io import read_json, save_pretrained

STATE_NAME = "trainer_state.json"
RESUME_DIR = "resume"  # DCP folder: {"model": ..., "optim": ...}
RNG_DIR = "rng"  # rank_{r:05d}.pt per rank
OPTIM_NAME = "optimizer.pt"  # earlier format (read only)
RNG_NAME = "rng.pt"  # earlier format (read only)
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


def rng_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / RNG_DIR / f"rank_{rank:05d}.pt"


@contextlib.contextmanager
def _one_process_ok():
    """DCP warns when no process group exists; one plain process saving / loading its own state is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _resume_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


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
    dist=None,
) -> Path:
    """Save after `step` optimiser steps (trainer_state["step"] == step is the next step to run). Every rank
    calls this (`dist`: train/parallel.py Distributed; None = one plain process): each writes its DCP shard and
    RNG state, rank 0 the consolidated HF weights and the JSON files, then renames the folder into place."""
    import torch.distributed.checkpoint as dcp

    from .parallel import Distributed, full_state_dict, single_device_copy

    dist = dist or Distributed()
    out = checkpoint_dir(run_dir, step)
    partial = out.with_name(f".{out.name}.partial")
    if dist.main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed mid-save
        (partial / RNG_DIR).mkdir(parents=True)
    dist.barrier()
    with _one_process_ok():
        dcp.save(_resume_state(model, optimizer), checkpoint_id=partial / RESUME_DIR)
    torch.save(rng_state(generator), rng_file(partial, dist.rank))
    full = full_state_dict(model, dist)  # a collective when sharded: every rank takes part
    dist.barrier()
    if dist.main:
        export = single_device_copy(model, full) if dist.sharded else model

        def write_extra(tmp: Path) -> None:
            for name in (RESUME_DIR, RNG_DIR):
                os.replace(partial / name, tmp / name)
            write_json(tmp / STATE_NAME, {**trainer_state, "ranks": dist.world})
            write_json(tmp / RECIPE_NAME, recipe)

        save_pretrained(export, out, tokenizer=tokenizer, write_extra=write_extra)
        shutil.rmtree(partial, ignore_errors=True)
        drop_resume_state(run_dir, keep=out)
    dist.barrier()
    return out


def drop_resume_state(run_dir: Path, keep: Path) -> None:
    """Delete the resume state (DCP shards, RNG files, the earlier format's optimizer.pt / rng.pt) of every
    checkpoint but `keep`: only the newest is continued from; the others keep their weights."""
    for c in list_checkpoints(run_dir):
        if c == Path(keep):
            continue
        for name in (RESUME_DIR, RNG_DIR):
            shutil.rmtree(c / name, ignore_errors=True)
        for name in (OPTIM_NAME, RNG_NAME):
            (c / name).unlink(missing_ok=True)


def has_resume_state(ckpt: Path) -> bool:
    return (Path(ckpt) / RESUME_DIR).is_dir() or (Path(ckpt) / OPTIM_NAME).is_file()


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


def load_resume_state(ckpt: Path, model, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                      dist=None) -> dict:
    """Restore model, optimiser and RNG states in place (every rank calls this); returns the trainer state.
    The DCP state is resharded to this run's ranks. RNG: rank r takes rank r's saved state; a rank the saving run
    did not have gets a fresh seed (an exact continuation needs the same rank count)."""
    from .parallel import Distributed

    ckpt, dist = Path(ckpt), dist or Distributed()
    if (ckpt / OPTIM_NAME).is_file():  # the earlier single-process format
        from ..model.hf_io import load_pretrained

        model.load_state_dict(load_pretrained(ckpt).state_dict())
        optimizer.load_state_dict(torch.load(ckpt / OPTIM_NAME, map_location="cpu", weights_only=False))
        set_rng_state(torch.load(ckpt / RNG_NAME, weights_only=False), generator)
        return load_trainer_state(ckpt)
    if not (ckpt / RESUME_DIR).is_dir():
        raise FileNotFoundError(f"{ckpt} holds weights only (no {RESUME_DIR}/): only a run's newest checkpoint "
                                "keeps the optimizer and RNG states a resume needs")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _resume_state(model, optimizer)
    with _one_process_ok():
        dcp.load(state, checkpoint_id=ckpt / RESUME_DIR)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    trainer = load_trainer_state(ckpt)
    f = rng_file(ckpt, dist.rank)
    if f.is_file():
        set_rng_state(torch.load(f, weights_only=False), generator)
    else:
        saved = trainer.get("ranks", "?")
        warnings.warn(f"{ckpt} was saved by {saved} rank(s); rank {dist.rank} has no saved RNG state and is "
                      "seeded afresh (the run continues, but not bit-for-bit as on the saving rank count)")
        generator.manual_seed(int(generator.initial_seed()) + 1_000_003 * int(trainer["step"]))
    return trainer


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete old step checkpoints beyond the newest `keep_last`, never a phase-end checkpoint."""
    if keep_last <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    removable = [c for c in ckpts[:-keep_last] if not load_trainer_state(c).get("phase_end")]
    for c in removable:
        shutil.rmtree(c, ignore_errors=True)
