"""The one visible training loop (docs/design.md, Code conventions 3). Conversion (CPT with the WSD block
schedule), AR pretraining of the bundled base model and post-training (SFT/CAP, DPO, RL) differ only in the task
object (train/tasks.py: batch source, objective, evaluation, reference model) and the phases; the loop never
branches on the recipe's [objective] kind.

Per optimiser step: look up the phase (block size, lr) -> `grad_accum` micro-batches through the objective ->
NaN/inf guard -> clip -> AdamW step -> metrics. Evaluation (validation ELBO perplexity) and checkpoints happen
every N steps and at every phase end. A checkpoint holds everything for an exact resume (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.tokenizer import Tokenizer
from ..load import load_checkpoint
from ..model import mask_adapter
from ..model.config import DiffusionInfo
from ..model.moe_config import as_llada2_moe
from ..model.transformer import Transformer, init_rows_to_mean, resize_vocab
from . import checkpoint as ckpt_io
from . import parallel
from .metrics import MetricsLog, plot_curves
from .optim import apply_trainable, build_optimizer
from .plan import print_run_plan
from .recipe import Recipe
from .schedule import Schedule
from .tasks import Task, make_task


class TrainingDiverged(RuntimeError):
    pass


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training: says which checkpoint a --resume continues from."""


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path  # HF folder of the model after the last step
    steps: int
    evals: list[dict] = field(default_factory=list)  # every validation record of the run
    wall_s: float = 0.0
    tokens_per_s: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available")
    return dev


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA; fp32 on CPU (bf16 is ~37x slower than fp32 on the project's CPUs)."""
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def prepare_model(recipe: Recipe, device: torch.device, task: Task | None = None) -> tuple[Transformer, Tokenizer]:
    """Load the starting checkpoint (load.load_checkpoint: tokenizer and mask id checked); for a block-diffusion
    task, make sure a [MASK] token exists (adding it to the tokenizer and growing embedding + head when the new
    id lies past the table; a new [MASK] row starts at the mean of the trained rows, `init_rows_to_mean`) and
    record the checkpoint's diffusion facts.
    A Ling 2.0 (bailing_moe_v2) parent becomes a llada2_moe model (`as_llada2_moe`); its router expert_bias
    is a buffer, so training leaves it frozen (docs/choices.md)."""
    task = task or make_task(recipe)
    loaded = load_checkpoint(recipe.model.path, device=device, train=True)
    model, tok = loaded.model, loaded.tokenizer
    base_vocab = model.cfg.vocab_size
    has_adapter = mask_adapter.attachment(model) is not None
    if has_adapter and not recipe.adapter.enabled:
        raise ValueError(f"{recipe.source}: {recipe.model.path} is a mask-only adapter over a frozen base; add the "
                         "same [adapter] section to train it further (its weights cannot be trained without it)")
    if has_adapter and recipe.adapter.settings() != mask_adapter.attachment(model).config.settings():
        raise ValueError(f"{recipe.source}: [adapter] differs from the adapter of {recipe.model.path} "
                         f"({mask_adapter.attachment(model).config.settings()}); give the same settings to continue it")
    if recipe.train.trainable == "mask_embedding" and model.cfg.diffusion is None:
        raise ValueError(f"{recipe.source}: [train] trainable = \"mask_embedding\" trains the [MASK] row of a "
                         f"block-diffusion checkpoint, but {recipe.model.path} has none (no blockdiff section in its "
                         "config.json); convert it first")
    if task.diffusion:
        n_trained = tok.vocab_size  # rows past the tokenizer (Qwen's ~270 padding rows) were never trained
        tok = tok.with_mask_token(recipe.model.mask_token)
        if tok.mask_id >= model.cfg.vocab_size:
            resize_vocab(model, tok.mask_id + 1)
        if tok.mask_id >= n_trained and not (recipe.adapter.enabled and tok.mask_id < base_vocab):
            # a new token, in a new row or in an untrained padding row: the mean of the trained rows either way.
            # Not in the base table under a mask-only adapter: that table is frozen and the adapter folder keeps
            # only the rows past it (model/mask_adapter.py), so a changed padding row would not be saved.
            init_rows_to_mean(model, [tok.mask_id], n_trained)
        if model.cfg.family == "bailing_moe_v2":
            as_llada2_moe(model.cfg)
        model.cfg.diffusion = DiffusionInfo(mask_token_id=tok.mask_id,
                                            block_size=recipe.model.recorded_block_size(task.final_block_size),
                                            **checkpoint_alignment(recipe, model.cfg.diffusion))
    if recipe.adapter.enabled and not has_adapter:
        mask_adapter.attach(model, recipe.adapter, tok.mask_id, mask_adapter.fingerprint(recipe.model.path, base_vocab))
    return model, tok


def checkpoint_alignment(recipe: Recipe, info: DiffusionInfo | None) -> dict[str, str]:
    """labels / clean_stream of the trained checkpoint: the recipe's choice for an AR parent (LLaDA2's
    "same" / "block_causal" when unset); a block-diffusion starting checkpoint keeps its own, and a recipe that
    asks for another is refused (its logits would be read with the wrong alignment)."""
    o = recipe.objective
    if info is None:
        return {"labels": o.labels or "same", "clean_stream": o.clean_stream or "block_causal"}
    for field_name, want, have in (("labels", o.labels, info.labels), ("clean_stream", o.clean_stream, info.clean_stream)):
        if want and want != have:
            raise ValueError(f"{recipe.source}: [objective] {field_name} = {want!r}, but the starting checkpoint "
                             f"{recipe.model.path} was trained with {field_name} = {have!r} (its config.json "
                             f"blockdiff section); remove the field to keep the checkpoint's")
    return {"labels": info.labels, "clean_stream": info.clean_stream}


def evaluate(model, task: Task, batches: list[dict], block_size: int, amp) -> float:
    """Held-out per-token NLL (nats) through the task: negative ELBO for diffusion, next-token NLL for AR."""
    was_training = model.training
    model.eval()
    with amp():
        nll = task.evaluate(model, batches, block_size)
    model.train(was_training)
    return nll


# What a run folder holds (train, convert); `overwrite` deletes a folder only when it holds nothing else.
RUN_ENTRIES = {"checkpoints", "final", "merged", "metrics.jsonl", "loss.png", "report.json", "report.md"}


def clear_run_dir(run_dir: Path) -> None:
    """Delete a previous run in `run_dir` (--overwrite), refusing when it holds anything a run does not write."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise FileExistsError(f"--out {run_dir} exists and is not a folder")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise FileExistsError(f"--overwrite: {run_dir} holds files a blockdiff run does not write "
                              f"({', '.join(foreign[:5])}); move them or choose another --out")
    shutil.rmtree(run_dir)


def train(recipe: Recipe, run_dir: str | Path, *, overwrite: bool = False, **kw) -> TrainResult:
    """Run (or resume) a recipe into `run_dir` (see `_train`). Ctrl-C becomes TrainingInterrupted, which names the
    checkpoint a --resume continues from (the step in progress is lost, nothing half-written is kept); a run that
    fails before its first checkpoint removes the folder it created. `overwrite` first deletes a previous run there."""
    run_dir = Path(run_dir)
    if kw.get("resume") and (not run_dir.is_dir() or ckpt_io.latest_checkpoint(run_dir) is None):
        raise FileNotFoundError(f"--resume: {run_dir} holds no checkpoint to continue (no {run_dir}/checkpoints/"
                                "step_*); to start the run, give the same command without --resume")
    if overwrite:
        if kw.get("resume"):
            raise ValueError("--overwrite deletes the run that --resume would continue: give one of them")
        if parallel.is_main_process():  # under torchrun one rank deletes; the others write nothing before a barrier
            clear_run_dir(run_dir)
    created = not run_dir.exists()
    try:
        return _train(recipe, run_dir, **kw)
    except BaseException as e:
        latest = ckpt_io.latest_checkpoint(run_dir) if run_dir.is_dir() else None
        if created and latest is None:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping: leave no empty --out behind
        if not isinstance(e, KeyboardInterrupt):
            raise
        if latest is None:
            raise TrainingInterrupted("no checkpoint was written yet; run the command again to start over") from None
        step = ckpt_io.load_trainer_state(latest)["step"]
        raise TrainingInterrupted(f"the last checkpoint is {latest} (step {step}); --resume continues from it") from None


def _train(
    recipe: Recipe,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
) -> TrainResult:
    """Run (or resume) a recipe into `run_dir`. `max_steps` stops early after that many global steps
    (checkpointing first), e.g. to test interruption and resume."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    dist = parallel.setup(recipe.parallel, device)  # one plain rank without torchrun
    device, recipe.parallel.ranks = dist.device, dist.world
    amp_dtype = autocast_dtype(t.dtype, device)

    def amp():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    torch.manual_seed(t.seed)
    generator = torch.Generator().manual_seed(t.seed + dist.rank)  # ranks draw different noise
    schedule = Schedule(recipe)
    task = make_task(recipe)
    model, tok = prepare_model(recipe, torch.device("cpu") if dist.sharded else device, task)  # FSDP moves shards
    print_run_plan(recipe, model.cfg, dist)  # per-device memory, before the run starts (rank 0)
    # Before any resumed weights are loaded: DPO's frozen reference and the embedding-noise std are the
    # starting model's, so a resumed run matches an uninterrupted one.
    task.bind(model, tok)
    with dist.main_first():  # rank 0 tokenises into the shared cache, the others read it
        stream, valid_batches = task.batches(device, run_dir)
    stream, valid_batches = parallel.shard_batches(stream, dist), parallel.global_eval_batches(valid_batches, dist)
    noise_std0 = task.noise_std0(model)
    if recipe.train.trainable != "all" and dist.world > 1:
        raise ValueError(f"{recipe.source}: [train] trainable = {recipe.train.trainable!r} runs on one device "
                         "(its gradient hook needs the whole embedding); run it without torchrun")
    apply_trainable(model, recipe.train.trainable, task.mask_id)
    if mask_adapter.attachment(model) is not None and dist.main:
        n, total = mask_adapter.trainable_parameters(model), model.cfg.num_parameters()
        print(f"[blockdiff] mask-only adapter: {n:,} trainable parameters ({100 * n / total:.2f}% of the parent's "
              f"{total:,}); the parent's weights are frozen")
    parallel.parallelize_task(model, task, recipe, dist)
    optimizer = build_optimizer(model, recipe)
    start = 0
    evals: list[dict] = []
    prior_wall, prior_tokens = 0.0, 0  # wall time and tokens of the steps before a resume (the report covers all)
    latest = ckpt_io.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        state = ckpt_io.load_resume_state(latest, model, optimizer, generator, dist)
        stream.load_state_dict(state["data"])
        start, evals = state["step"], state.get("evals", [])
        prior_wall, prior_tokens = state.get("wall_s", 0.0), state.get("tokens", 0)
        if start >= schedule.total_steps and dist.main:
            print(f"[blockdiff] {run_dir} already finished its {schedule.total_steps} steps: nothing to train")
        else:
            print(f"[blockdiff] resumed from {latest} at step {start}")
    elif any((run_dir / "checkpoints").glob("step_*")):
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume to continue or choose a new --out")
    log = MetricsLog(run_dir / "metrics.jsonl", truncate_from_step=start) if dist.main else parallel.Discard()
    end = schedule.total_steps if max_steps is None else min(schedule.total_steps, max_steps)
    last_good = latest
    model.train()
    # On a terminal the bar refreshes twice a second; in a log file (CI, nohup) every 30 s, not every step.
    bar = tqdm(total=schedule.total_steps, initial=start, disable=not (progress and dist.main), unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    t0, tokens_seen = time.perf_counter(), 0

    def save(step: int, phase_end: bool) -> Path:
        ph = schedule.phase_at(step - 1)
        if model.cfg.diffusion is not None:
            model.cfg.diffusion.block_size = recipe.model.recorded_block_size(ph.block_size)
        state = {"step": step, "phase": ph.name, "block_size": ph.block_size, "phase_end": phase_end,
                 "data": stream.state_dict(), "evals": evals, "val_nll": evals[-1]["val_nll"] if evals and evals[-1]["step"] == step else None,
                 "wall_s": prior_wall + time.perf_counter() - t0, "tokens": prior_tokens + tokens_seen}
        path = ckpt_io.save_checkpoint(run_dir, step, model=model, tokenizer=tok, optimizer=optimizer,
                                       generator=generator, trainer_state=state, recipe=recipe.to_dict(), dist=dist)
        if dist.main:
            ckpt_io.prune_checkpoints(run_dir, t.keep_last)
        return path

    for step in range(start, end):
        phase = schedule.phase_at(step)
        lr = schedule.lr_at(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        objective = task.objective(phase.block_size)
        std = recipe.noise.at(noise_std0, step, schedule.total_steps)
        micro: list[dict] = []
        for _ in range(t.grad_accum):
            batch = {k: v.to(device) for k, v in stream.next_batch().items()}
            with amp():
                loss, m = objective(model, batch, generator, std)
            if dist.any(not torch.isfinite(loss)):  # every rank stops together
                _diverged(step, phase, "loss", float(loss.detach()), last_good)
            (loss / t.grad_accum).backward()
            micro.append(m)
        gnorm = parallel.clip_grad_norm(model, t.grad_clip if t.grad_clip > 0 else float("inf"))
        if not torch.isfinite(gnorm):
            _diverged(step, phase, "gradient norm", float(gnorm), last_good)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += recipe.tokens_per_step
        elapsed = time.perf_counter() - t0
        record = dist.mean({k: sum(m[k] for m in micro) / len(micro) for k in micro[0]})
        record.update(step=step + 1, phase=phase.name, block_size=phase.block_size, lr=lr, grad_norm=float(gnorm),
                      embed_noise_std=std, tokens_per_s=tokens_seen / max(elapsed, 1e-9))
        log.write(record)
        bar.update(1)
        bar.set_postfix(B=phase.block_size, loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        done = step + 1
        phase_end = schedule.is_phase_end(step)
        if valid_batches and (done % t.eval_every == 0 or phase_end or done == end):
            eval_b = phase.block_size
            nll = evaluate(model, task, valid_batches, eval_b, amp)
            rec = {"step": done, "phase": phase.name, "block_size": eval_b, "val_nll": nll,
                   "val_ppl": math.exp(min(nll, 50.0)), "phase_end": phase_end}
            evals.append(rec)
            log.write({"eval": True, **rec})
            bar.write(f"[eval] step {done} {phase.name} B={eval_b}: val ELBO ppl {rec['val_ppl']:.3f}")
        if done % t.save_every == 0 or phase_end or done == end:
            last_good = save(done, phase_end)
    bar.close()
    wall = prior_wall + time.perf_counter() - t0
    tokens_seen += prior_tokens
    final_dir = run_dir / "final"
    if end == schedule.total_steps and last_good is not None:
        parallel.save_final(model, final_dir, tok, dist)
    if dist.main:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss.png", schedule)
    dist.close()
    return TrainResult(run_dir, final_dir, end, evals, wall, tokens_seen / max(wall, 1e-9))


def _diverged(step: int, phase, what: str, value: float, last_good: Path | None) -> None:
    where = f"{last_good}" if last_good is not None else "none yet (no checkpoint was written)"
    raise TrainingDiverged(
        f"training stopped at step {step + 1} (phase {phase.name}, block size {phase.block_size}): {what} is {value}. "
        f"No update was applied and nothing was saved. Last good checkpoint: {where}. "
        "Lower the phase lr or raise warmup_steps, then continue with --resume."
    )
