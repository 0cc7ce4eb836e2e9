"""Top-k checkpoint merge (LLaDA2.0 report: after BDLM training, average the parameters of the k best
checkpoints by a validation metric). k is not published; we default to 3 in the bundled recipe.

Only checkpoints evaluated at the same block size are comparable (the ELBO depends on B), so candidates are
the checkpoints of the final block size unless `block_size` says otherwise. Averaging is done in float64 and
cast back, so the result is the exact mean up to the final rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..load import load_checkpoint
from ..model import mask_adapter
from ..model.hf_io import load_pretrained, save_pretrained
from .checkpoint import list_checkpoints, load_trainer_state


@dataclass
class MergeResult:
    out: Path
    chosen: list[tuple[Path, float]]  # (checkpoint, validation NLL in nats)
    block_size: int


def select_top_k(run_dir: str | Path, k: int, block_size: int | None = None) -> tuple[list[tuple[Path, float]], int]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ckpts = list_checkpoints(Path(run_dir))
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no checkpoints under {Path(run_dir) / 'checkpoints'}")
    states = [(c, load_trainer_state(c)) for c in ckpts]
    if block_size is None:
        block_size = states[-1][1]["block_size"]
    scored = [(c, s["val_nll"]) for c, s in states if s.get("val_nll") is not None and s["block_size"] == block_size]
    if not scored:
        raise ValueError(f"{run_dir}: no checkpoint with a validation score at block size {block_size} "
                         "(does the recipe have [data] valid files?)")
    scored.sort(key=lambda cs: cs[1])
    return scored[:k], block_size


@torch.no_grad()
def average_checkpoints(paths: list[Path], out: str | Path) -> Path:
    """Parameter-wise mean of HF-layout checkpoints with identical shapes; tokenizer taken from the first."""
    if not paths:
        raise ValueError("nothing to average")
    adapters = [mask_adapter.is_adapter_folder(p) for p in paths]
    if any(adapters):
        if not all(adapters):
            raise ValueError(f"{paths[adapters.index(False)]}: a full checkpoint among adapter checkpoints; average "
                             "adapters of one run only")
        return mask_adapter.average(paths, Path(out))
    first = load_checkpoint(paths[0])
    base = first.model
    acc = {n: p.detach().to(torch.float64).clone() for n, p in base.named_parameters()}
    for path in paths[1:]:
        other = dict(load_pretrained(path).named_parameters())
        if other.keys() != acc.keys():  # e.g. another depth or an untied head: never average a subset
            diff = sorted(other.keys() ^ acc.keys())
            raise ValueError(f"{path}: parameters differ from {paths[0]} ({', '.join(diff[:4])}"
                             f"{', ...' if len(diff) > 4 else ''})")
        for n, a in acc.items():
            if other[n].shape != a.shape:
                raise ValueError(f"{path}: parameter {n} has shape {tuple(other[n].shape)}, expected {tuple(a.shape)}")
            a += other[n].to(torch.float64)
    for n, p in base.named_parameters():
        p.copy_((acc[n] / len(paths)).to(p.dtype))
    return save_pretrained(base, out, tokenizer=first.tokenizer)


def merge_top_k(run_dir: str | Path, k: int, out: str | Path, block_size: int | None = None) -> MergeResult:
    chosen, b = select_top_k(run_dir, k, block_size)
    average_checkpoints([c for c, _ in chosen], out)
    return MergeResult(Path(out), chosen, b)
