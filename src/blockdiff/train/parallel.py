"""Many devices through torchrun: the process group, the device mesh and the torchtitan-style `apply_*` functions
that parallelise the single-device model from outside (docs/distributed.md).

The model files know nothing of this. `setup(cfg, device)` reads the variables torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), starts the process group (gloo on CPU, nccl on CUDA) and returns a `Distributed`
context that the training loop passes around: the rank, the device of this rank, the mesh, and the few collectives
the loop needs (metric means, the NaN guard's "did any rank see it", a barrier). One process without torchrun gets
a `Distributed` of one rank whose collectives are no-ops, so the loop has one code path.

`parallelize(model, cfg, dist)` applies, in torchtitan's order: activation checkpointing per decoder block
(`apply_ac`), `torch.compile` per block (`apply_compile`), then FSDP2 (`apply_fsdp`: `fully_shard` per block, then
the root, which holds the embedding, the final norm and the head). Data parallelism is plain FSDP2 over one mesh
dimension; tensor, pipeline, context and expert parallelism are not implemented.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist_
from torch import nn

from ..fields import runtime

FSDP_MODES = ("auto", "on", "off")
AC_MODES = ("none", "full")
PARAM_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class ParallelConfig:
    """How a run is spread over devices; also the recipe section [parallel]. The number of ranks is not a recipe
    field: it is what torchrun launched (`--nproc-per-node` x `--nnodes`)."""

    fsdp: str = "auto"  # "auto": FSDP2 when launched by torchrun (WORLD_SIZE set); "on": also in one plain process
    #                     (a 1-rank group: measures FSDP's overhead); "off": the plain single-device loop (one rank only)
    reshard_after_forward: bool = True  # free a block's gathered weights after its forward (ZeRO-3); false keeps them
    #                                     until backward (ZeRO-2 like: less communication, more memory)
    param_dtype: str = "auto"  # FSDP compute dtype of gathered weights: "auto" (bfloat16 on CUDA, float32 on CPU),
    #                            "float32", "bfloat16"; master weights, gradient reduction and optimizer state stay fp32
    ac: str = "none"  # activation checkpointing: "none" or "full" (each decoder block recomputed in backward)
    compile: bool = False  # torch.compile each decoder block (CUDA; first steps are slower while it compiles)
    ranks: int = runtime(1)  # data-parallel ranks of the run (set from torchrun's WORLD_SIZE)

    def __post_init__(self) -> None:
        if self.fsdp not in FSDP_MODES:
            raise ValueError(f"fsdp must be one of {', '.join(FSDP_MODES)}, got {self.fsdp!r}")
        if self.ac not in AC_MODES:
            raise ValueError(f"ac must be one of {', '.join(AC_MODES)}, got {self.ac!r}")
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {', '.join(PARAM_DTYPES)}, got {self.param_dtype!r}")


def launched() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment torchrun sets; (0, 1, 0) in a plain process."""
    env = os.environ
    try:
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them): {e}") from None


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that prints, plots and writes reports."""
    return launched()[0] == 0


class Distributed:
    """This rank's view of the run. `sharded`: the model is wrapped by FSDP2 (collectives in every forward, so every
    rank must run the same forwards). A 1-rank instance without a process group makes every collective a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 mesh=None, sharded: bool = False, owns_group: bool = False):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device or torch.device("cpu")
        self.mesh, self.sharded, self._owns_group = mesh, sharded, owns_group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def _active(self) -> bool:
        return self.world > 1 and dist_.is_initialized()

    def mean(self, record: dict) -> dict:
        """Average the numeric entries of a metrics record over ranks (every rank gets the same result)."""
        keys = [k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not self._active or not keys:
            return dict(record)
        t = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=self._comm_device)
        dist_.all_reduce(t)
        out = dict(record)
        out.update({k: float(v) / self.world for k, v in zip(keys, t.tolist())})
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (the NaN guard stops all ranks together)."""
        if not self._active:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device)
        dist_.all_reduce(t, op=dist_.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self._active:
            dist_.barrier(device_ids=[self.local_rank]) if self.device.type == "cuda" else dist_.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. tokenising into the shared cache), the others after it."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self._owns_group and dist_.is_initialized():
            dist_.destroy_process_group()
            self._owns_group = False


def setup(cfg: ParallelConfig, device: torch.device) -> Distributed:
    """The process group and mesh for a run on `device` (the recipe's [train] device: under torchrun "cuda" means
    cuda:LOCAL_RANK). Without torchrun and with fsdp "auto"/"off": one plain rank, no group."""
    rank, world, local_rank = launched()
    if world > 1 and cfg.fsdp == "off":
        raise ValueError(f"[parallel] fsdp = \"off\" runs one process, but torchrun launched {world} ranks; "
                         "use fsdp = \"auto\" or launch without torchrun")
    use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and "WORLD_SIZE" in os.environ)
    if not use_fsdp:
        return Distributed(device=device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible: "
                             "launch at most that many ranks per node (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = not dist_.is_initialized()
    if owns:
        if "WORLD_SIZE" in os.environ:
            dist_.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:  # fsdp = "on" in a plain process: a group of one, no rendezvous needed
            dist_.init_process_group(backend, store=dist_.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp_shard",))
    if rank != 0:  # only rank 0 prints; warnings and errors (stderr) still show from every rank
        sys.stdout = open(os.devnull, "w")
    return Distributed(rank, world, local_rank, device, mesh, sharded=True, owns_group=owns)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: what activation checkpointing, compile and FSDP treat as units."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList of decoder blocks")
    return layers


def apply_ac(model: nn.Module, cfg: ParallelConfig) -> None:
    """Full activation checkpointing per block: a block keeps only its input for backward and recomputes the
    rest (about one more forward of compute for the activation memory of one block). The wrapper's state-dict
    hooks drop its `_checkpoint_wrapped_module` prefix, so saved names are unchanged."""
    if cfg.ac == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from ..model.mask_adapter import snapshot_for_ac

    layers = blocks(model)
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)
    snapshot_for_ac(model)  # a mask-adapter model: each recomputation sees its own forward's [MASK] positions


def apply_compile(model: nn.Module, cfg: ParallelConfig) -> None:
    """torch.compile per block (`Module.compile` compiles in place, so parameter names stay the same). The blocks
    are alike, so one compiled graph serves all of them."""
    if cfg.compile:
        for block in blocks(model):
            block.compile()


def fsdp_param_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    if cfg.param_dtype == "bfloat16" or (cfg.param_dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def apply_fsdp(model: nn.Module, mesh, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """FSDP2: `fully_shard` each decoder block, then the root (embedding, final norm, head; a tied head shares the
    embedding's shard). Parameters are sharded along dim 0 over the mesh; each block's are all-gathered for its
    forward and backward, gradients reduce-scattered in fp32. The last block and the root are not resharded after
    forward (backward needs them at once), as in torchtitan. `model.embed`, which the block-diffusion objectives
    call before the forward (embedding noise on [x_t ; x0]), is registered as a forward method so it gathers the
    root's weights too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=fsdp_param_dtype(cfg, device), reduce_dtype=torch.float32)
    layers = blocks(model)
    for i, block in enumerate(layers):
        reshard = cfg.reshard_after_forward and i < len(layers) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    if hasattr(model, "embed"):
        register_fsdp_forward_method(model, "embed")
    return model


def parallelize(model: nn.Module, cfg: ParallelConfig, dist: Distributed) -> nn.Module:
    """AC, then compile, then FSDP2 when the run is sharded (torchtitan's order: FSDP wraps the checkpointed,
    compiled blocks)."""
    apply_ac(model, cfg)
    apply_compile(model, cfg)
    if dist.sharded:
        apply_fsdp(model, dist.mesh, cfg, dist.device)
    return model


def parallelize_task(model: nn.Module, task, recipe, dist: Distributed) -> None:
    """The trained model, and a task's frozen reference model (DPO) with FSDP only: it runs forwards on every
    rank alike, so it can be sharded too instead of held whole by each rank."""
    parallelize(model, recipe.parallel, dist)
    if getattr(task, "ref_model", None) is not None and dist.sharded:
        apply_fsdp(task.ref_model, dist.mesh, recipe.parallel, dist.device)


def save_final(model: nn.Module, folder, tokenizer, dist: Distributed) -> None:
    """The consolidated HF folder of the model (every rank calls this; rank 0 writes)."""
    from ..model.hf_io import save_pretrained

    full = full_state_dict(model, dist)
    if dist.main:
        save_pretrained(single_device_copy(model, full) if dist.sharded else model, folder, tokenizer=tokenizer)
    dist.barrier()


class Discard:
    """The metrics log of ranks other than 0: only rank 0 writes metrics.jsonl."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (clipped to `max_norm`) as a plain tensor on every rank: under FSDP2 the gradients are
    DTensor shards and the norm comes back as a replicated DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    full = getattr(norm, "full_tensor", None)
    return full() if full is not None else norm


class RankShard:
    """This rank's rows of a global batch stream. The wrapped stream serves global batches of
    `per_rank x ranks` rows in its usual deterministic order; rank r keeps rows [r*per_rank, (r+1)*per_rank). So the
    ranks' shards are disjoint, their union is exactly the batch one process would train on, and the data position
    (the wrapped stream's state) is the same on every rank and for every rank count with the same global batch."""

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world
        self.per_rank = stream.batch_size
        stream.batch_size = self.per_rank * world

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.stream.next_batch()
        lo = self.rank * self.per_rank
        return {k: v[lo : lo + self.per_rank] for k, v in batch.items()}

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state) -> None:
        self.stream.load_state_dict(state)


def shard_batches(stream, dist: Distributed):
    """The train batch source of this rank (the stream itself on one rank)."""
    if dist.world == 1:
        return stream
    if getattr(stream, "splits_across_ranks", False):  # RL rollouts: split inside the source (train/rollout.py)
        return stream
    if not hasattr(stream, "batch_size"):
        raise ValueError(f"{type(stream).__name__} cannot be split across {dist.world} ranks "
                         "(it has neither a row batch nor its own split; see docs/distributed.md)")
    return RankShard(stream, dist.rank, dist.world)


def global_eval_batches(batches: list[dict], dist: Distributed) -> list[dict]:
    """Held-out batches regrouped to the global batch (`ranks` consecutive per-rank batches joined). Every rank
    evaluates all of them -- FSDP needs every rank in every forward -- so the validation number is the one a
    single process with the same global batch measures (the ELBO estimate's noise depends on the grouping)."""
    if dist.world == 1 or not batches:
        return batches
    out = []
    for i in range(0, len(batches), dist.world):
        group = batches[i : i + dist.world]
        out.append({k: torch.cat([b[k] for b in group]) for k in group[0]})
    return out


def full_state_dict(model: nn.Module, dist: Distributed) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0's CPU (other ranks get {}); a collective when sharded."""
    if not dist.sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_replica(model: nn.Module, device: torch.device) -> nn.Module:
    """A plain, unsharded copy of an FSDP2 model's current weights on `device`, in eval mode and without
    gradients: RL rollouts decode on it with no collectives (the number of forwards depends on the sampled text,
    so ranks could not keep FSDP's per-forward all-gathers in step). A collective: every rank calls it (one
    all-gather per parameter, in the same order everywhere). Weights stay in their fp32 master dtype."""
    from torch.distributed.tensor import DTensor

    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}
    plain = single_device_copy(model, state).to(device).eval()
    plain.requires_grad_(False)
    return plain


def single_device_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain CPU model with `model`'s config holding `state` (rank 0's export of a sharded model)."""
    from ..model.build import build_model

    from ..model.mask_adapter import copy_attachment

    with torch.device("meta"):
        plain = build_model(model.cfg)
        copy_attachment(model, plain)  # an adapter run: the same adapter modules, so their tensors load too
    plain.load_state_dict(state, assign=True, strict=False)
    if model.cfg.tie_word_embeddings:
        plain.output.weight = plain.tok_embeddings.weight
    for name, buf in plain.named_buffers():  # non-persistent buffers (RoPE frequencies) are not in the state
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            src = model.get_buffer(name)
            (plain.get_submodule(owner) if owner else plain).register_buffer(leaf, src.detach().cpu().clone(),
                                                                             persistent=False)
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export: the gathered state lacks {', '.join(missing[:4])}")
    return plain
