"""Memory plan: what one device needs for a training recipe on N devices, from config.json and the recipe alone
(no weights read), printed by `blockdiff plan` and by each training verb before it starts (docs/distributed.md).

Per device, in bytes:
- weights: fp32 master parameters, sharded over the ranks by FSDP2 (P x 4 / N), plus the gathered copies FSDP
  holds while it computes (the root -- embedding, head, final norm -- and about two blocks, current and prefetched,
  in the compute dtype, bf16 on CUDA);
- gradients: fp32, sharded like the weights (P x 4 / N), plus the gathered gradients of the blocks in flight;
- optimizer: AdamW's two fp32 moments (P x 8 / N);
- activations: what autograd keeps for backward for one micro-batch of `batch_size` rows. The forward sequence is
  T = 2L for block diffusion with B < L ([x_t ; x0], the clean copy beside the noisy one) and T = L for AR and for
  B >= L (MDLM). Per layer and token: the block's saved tensors (norm inputs, q / k / v, the attention output,
  the SwiGLU inputs and products);
  both fused SDPA (CPU) and FlexAttention (CUDA) keep only the output and log-sum-exp; on CPU the dense bool
  mask (b x T x T) and the one additive float mask all layers share come on top. MoE layers keep the k routed
  experts' SwiGLU per token.
  Activation checkpointing keeps only each block's input, plus one block recomputed in backward. The loss head
  (objectives/chunked_ce.py) keeps the fp32 log-softmax of its scored tokens when they fit one chunk (one per
  cross-entropy: the AR loss beside the diffusion loss is a second) and nothing V-wide when chunks are recomputed;
- transient: the largest temporary on top of the rest: in backward, a chunk's logits, log-softmax and their
  gradients plus the head's [V, d] weight gradient before it is accumulated; at the optimizer step, when the
  activations are gone, torch's foreach AdamW update buffer (one fp32 tensor per parameter of its larger group);
- KV cache for decoding: 2 x layers x kv_heads x head_dim x bytes per token, for `decode_batch` rows of the
  model's context (max_position_embeddings) -- what serving the trained model on one device needs.

Everything is counted from the model code except CPU_ALLOCATOR_FACTOR (fitted, see below). tests/test_plan.py
checks the counted activations against the bytes autograd keeps (within 12%) and the total against the measured
peak of the bundled model and two shapes the factor was not fitted on (within 25%); bench/plan_shapes.py checks four
real-size shapes (within 15%).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..model.config import ModelConfig, effective_block_size

GIB = 1024**3
# CPU, fitted (not counted): the layers' saved activations x this factor is what the process's peak RSS grows by for
# them. It covers a layer's backward working set (the gradients of its activations, live while they are computed)
# and what glibc's allocator keeps after a free (freed heap memory stays resident and the next step's tensors do not
# fit it exactly). Small models need more (1.35-1.95 over the runs of tests/test_plan.py's shapes, which move by
# ~20% from run to run), real-size ones less (1.0-1.3: bench/plan_shapes.py); 1.3 keeps both within the tests'
# bounds (dev/LOG.md 2026-12-07). Everything else in the plan is counted, and tests/test_plan.py checks the count
# against autograd's saved tensors.
CPU_ALLOCATOR_FACTOR = 1.3
# Per-device memory of common accelerators (GiB); `--device-memory` overrides.
DEVICE_MEMORY_GIB = {"h100": 80, "h200": 141, "a100": 80, "a100-40gb": 40, "l40s": 48, "a10g": 24, "4090": 24,
                     "b200": 180, "mi300x": 192}
DEVICE_RE = re.compile(r"^(cpu|cuda|" + "|".join(map(re.escape, DEVICE_MEMORY_GIB)) + r")$")


@dataclass
class MemoryPlan:
    model: str
    devices: int
    device: str  # "cpu", "cuda" or an accelerator name
    device_memory: int | None  # bytes per device, None = unknown (the plan says so instead of fits / does not fit)
    rows: dict[str, int] = field(default_factory=dict)  # component -> bytes per device (training)
    kv_cache: int = 0  # bytes per device for decoding (not part of the training total)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_dict(self) -> dict:
        return {"model": self.model, "devices": self.devices, "device": self.device, "device_memory": self.device_memory,
                **{f"{k}_bytes": v for k, v in self.rows.items()}, "total_bytes": self.total,
                "kv_cache_bytes": self.kv_cache, "fits": self.fits}


def _block_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters of the largest decoder block, parameters outside the blocks: embedding, head, final norm)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 2 * d
    emb = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2) + d
    if cfg.moe is None:
        return attn + 3 * d * cfg.intermediate_size, emb
    m = cfg.moe
    moe = m.num_experts * 3 * d * m.moe_intermediate_size + 3 * d * m.shared_intermediate_size + m.num_experts * d
    return attn + max(moe, 3 * d * cfg.intermediate_size if m.first_k_dense_replace else 0), emb


def _layer_elems_per_token(cfg: ModelConfig, moe_layer: bool) -> int:
    """Elements one block keeps for backward per token of the forward sequence (counted from the block's ops)."""
    d, hq, hkv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    # two RMSNorms (input, normalised, output: 3d each), q k v after RoPE, attention output and o_proj's input
    attn = 6 * d + 3 * hq + 2 * hkv + (2 * hq + 2 * hkv if cfg.qk_norm else 0)
    if moe_layer and cfg.moe is not None:
        m = cfg.moe
        ffn = 4 * m.num_experts_per_tok * m.moe_intermediate_size + 4 * m.shared_intermediate_size
        ffn += 2 * m.num_experts_per_tok * d + 2 * m.num_experts  # routed copies of the token, router scores
    else:
        ffn = 4 * cfg.intermediate_size  # gate, up, silu(gate), silu(gate) * up
    return attn + ffn


def plan_memory(cfg: ModelConfig, *, seq_len: int, batch_size: int, block_size: int, kind: str = "diffusion",
                devices: int = 1, device: str = "cuda", device_memory: int | None = None, fsdp: bool | None = None,
                ac: bool = False, param_bf16: bool | None = None, complementary: bool = False, decode_batch: int = 1,
                model: str = "", adapter=None, loss_chunk_tokens: int | None = None, ar_loss: bool = False,
                clean_causal: bool = True, shift: bool = False) -> MemoryPlan:
    """The per-device plan. `kind`: recipe objective kind ("ar" has no [x_t ; x0] doubling; "dpo" runs chosen and
    rejected plus the frozen reference model); `complementary` masks double the rows. `fsdp` defaults to
    devices > 1. `adapter` (a mask_adapter.AdapterConfig with kind "lora"): the parent is frozen, so gradients
    and AdamW moments exist only for the adapter's parameters; the frozen weights are held as in a full run
    (fp32, sharded under FSDP) and the activations are counted alike (backward still runs through every block to
    reach the adapters of the earlier ones). `loss_chunk_tokens`: tokens per chunk of the loss head (0 = off, None =
    the losses' default, objectives/chunked_ce.py LOSS_CHUNK_TOKENS). `ar_loss`: the AR next-token loss beside the
    diffusion loss ([diffusion] ar_weight > 0), on the same forward when `clean_causal`, else on one more. `shift`:
    shifted labels (the clean half's logits are read, so its last layer runs whole)."""
    if loss_chunk_tokens is None:  # imported here: chunked_ce imports torch, and `blockdiff --help` reads this module
        from ..objectives.chunked_ce import LOSS_CHUNK_TOKENS as loss_chunk_tokens
    cuda = device != "cpu"
    fsdp = devices > 1 if fsdp is None else fsdp
    bf16 = cuda if param_bf16 is None else param_bf16
    act_b = 2 if cuda else 4  # bf16 autocast on CUDA, fp32 on CPU
    P = cfg.num_parameters()
    n = devices if fsdp else 1
    block_p, root_p = _block_params(cfg)
    plan = MemoryPlan(model=model or cfg.family, devices=devices, device=device, device_memory=device_memory)

    gathered = (root_p + 2 * block_p) * (2 if bf16 else 4) if fsdp and devices > 1 else 0
    if adapter is not None and adapter.enabled:
        from ..model.mask_adapter import adapter_parameters

        A = adapter_parameters(cfg, adapter)
        plan.rows["weights"] = (P + A) * 4 // n + gathered
        plan.rows["gradients"] = A * 4 // n
        plan.rows["optimizer"] = A * 8 // n
        plan.notes.append(f"mask-only adapter (rank {adapter.rank}, {len(adapter.targets)} projections): {A:,} "
                          f"trainable parameters ({100 * A / P:.2f}% of {P:,}); gradients and AdamW state for "
                          "those only")
    else:
        plan.rows["weights"] = P * 4 // n + gathered
        plan.rows["gradients"] = P * 4 // n + gathered
        plan.rows["optimizer"] = P * 8 // n

    L, b = seq_len, batch_size
    B = effective_block_size(block_size, seq_len=L)
    T = L if kind == "ar" or B >= L else 2 * L
    rows = b * (2 if kind == "dpo" else 1) * (2 if complementary else 1)  # DPO: chosen + rejected
    n_moe = 0 if cfg.moe is None else cfg.num_layers - cfg.moe.first_k_dense_replace
    per_tok = [(_layer_elems_per_token(cfg, i >= cfg.num_layers - n_moe)) for i in range(cfg.num_layers)]
    # SDPA is a fused kernel on CPU and CUDA alike (measured: CPU memory grows linearly in T): it keeps its output
    # and log-sum-exp, not the T x T probabilities
    if ac:
        layers = rows * T * cfg.hidden_size * act_b * cfg.num_layers + rows * T * max(per_tok) * act_b
    else:
        layers = rows * T * sum(per_tok) * act_b
    # The last layer runs only the noisy half's queries and FFN when nothing reads the clean half's logits (same-
    # position labels and no AR loss from this forward: transformer.py's fused last layer)
    if T == 2 * L and not ac and not (shift or (ar_loss and clean_causal)):
        layers -= rows * L * per_tok[-1] * act_b
    # The AR loss on the clean stream (ar_weight > 0) comes from the same forward when the clean half is causal,
    # else from one more forward of the clean rows alone (its activations are kept too)
    extra_ar_forward = ar_loss and kind != "ar" and T == 2 * L and not clean_causal
    if extra_ar_forward:
        layers += rows * L * sum(per_tok) * act_b
    # The loss head (objectives/chunked_ce.py). Each cross-entropy call -- the diffusion loss over the masked tokens,
    # the AR loss over the clean stream -- scores up to rows x L tokens. At most one chunk of them: one pass, and
    # autograd keeps the fp32 log-softmax [n, V]. More: each chunk is recomputed in backward, nothing V-wide is kept.
    V, d = cfg.vocab_size, cfg.hidden_size
    calls = 2 if ar_loss and kind != "ar" else 1
    scored = rows * L
    recompute = 0 < loss_chunk_tokens < scored
    c = loss_chunk_tokens if recompute else scored  # tokens whose logits exist at once
    head_saved = 0 if recompute else calls * scored * V * 4
    layers += rows * T * d * act_b * 2  # + embedding output, final norm
    acts = int(layers * (1.0 if cuda else CPU_ALLOCATOR_FACTOR)) + head_saved
    mask = 0 if cuda else rows * T * T * 5  # CPU: the dense bool mask and the additive float mask made from it once
    plan.rows["activations"] = acts + mask
    # The largest temporaries on top: in backward, a chunk's logits and log-softmax (when recomputed), the gradients
    # of the cross-entropy and of the log-softmax ([c, V] fp32 each), and the head's weight gradient [V, d] before it
    # is added to the accumulated one (fp32 like the master weights); at the optimizer step, when the activations
    # are gone, AdamW's update buffer (torch's foreach AdamW: one fp32 tensor per parameter of its largest group:
    # train/optim.py puts the embeddings in one group, every other matrix in the other)
    backward_tmp = c * V * ((act_b + 4) if recompute else 0) + 2 * c * V * 4 + V * d * 4
    trained = A if adapter is not None and adapter.enabled else P
    group = trained if trained != P else max(P - V * d, V * d)
    plan.rows["transient"] = max(backward_tmp, group * 4 // n - plan.rows["activations"])
    if kind == "dpo":
        plan.rows["reference model"] = P * (2 if bf16 else 4) // n
        plan.notes.append("dpo: the frozen reference model is held too (sharded like the weights under FSDP)")
    plan.kv_cache = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (2 if cuda else 4) \
        * cfg.max_position_embeddings * decode_batch
    if not cuda:
        plan.notes.append(f"cpu: fp32 activations, the layers' x {CPU_ALLOCATOR_FACTOR} (backward working set and "
                          "allocator, fitted), dense attention mask")
    if T == 2 * L:
        plan.notes.append(f"block diffusion B={B} < L={L}: the forward runs [x_t ; x0], T = 2L = {T}")
    if recompute:
        plan.notes.append(f"loss head in chunks of {c} tokens (logits recomputed in backward) instead of all {scored}")
    if calls == 2:
        plan.notes.append("AR loss beside the diffusion loss: two cross-entropy calls"
                          + (", and one more forward of the clean rows" if extra_ar_forward else ""))
    return plan


def plan_for_recipe(recipe, cfg: ModelConfig, *, devices: int, device: str, device_memory: int | None = None,
                    model: str = "") -> MemoryPlan:
    """The plan of a recipe's largest phase (the largest block-diffusion sequence: any phase with B < L)."""
    L = recipe.data.seq_len
    blocks = [p.block_size for p in recipe.phases] or [L]
    smallest = min(blocks)
    par = recipe.parallel
    fsdp = par.fsdp == "on" or (par.fsdp == "auto" and devices > 1)
    diffusion = recipe.objective.kind in ("diffusion", "sft")
    return plan_memory(cfg, seq_len=L, batch_size=recipe.train.batch_size, block_size=smallest,
                       kind=recipe.objective.kind, devices=devices, device=device, device_memory=device_memory,
                       fsdp=fsdp, ac=par.ac == "full", complementary=diffusion and recipe.diffusion.complementary,
                       param_bf16=None if par.param_dtype == "auto" else par.param_dtype == "bfloat16", model=model,
                       adapter=recipe.adapter, loss_chunk_tokens=recipe.diffusion.loss_chunk_tokens
                       if diffusion else None, ar_loss=diffusion and recipe.diffusion.ar_weight > 0,
                       clean_causal=recipe.objective.clean_stream == "causal", shift=recipe.objective.labels == "shift")


def device_memory_bytes(device: str, memory_gib: float | None) -> int | None:
    """Bytes per device: the given GiB, a named accelerator's, the visible CUDA device's, or None (unknown)."""
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ValueError(f"--device-memory must be > 0 GiB, got {memory_gib}")
        return int(memory_gib * GIB)
    if device in DEVICE_MEMORY_GIB:
        return DEVICE_MEMORY_GIB[device] * GIB
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
        return None
    if device == "cpu":
        try:
            with open("/proc/meminfo") as f:
                kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            return kib * 1024  # all ranks of a node share it: the plan divides it below
        except (OSError, StopIteration, ValueError):
            return None
    return None


def print_run_plan(recipe, cfg: ModelConfig, dist) -> None:
    """The plan of the run about to start (rank 0 prints it; `dist`: train/parallel.py Distributed)."""
    if not dist.main:
        return
    kind = dist.device.type
    mem = device_memory_bytes(kind, None)
    if kind == "cpu" and mem is not None:
        mem //= dist.world
    elif kind == "cuda":
        import torch

        mem = torch.cuda.get_device_properties(dist.device).total_memory
    print(format_plan(plan_for_recipe(recipe, cfg, devices=dist.world, device=kind, device_memory=mem,
                                      model=recipe.model.path)))


def _gib(x: int) -> str:
    return f"{x / GIB:.2f} GiB" if x >= GIB / 100 else f"{x / 1024**2:.1f} MiB"


def format_plan(plan: MemoryPlan) -> str:
    lines = [f"memory plan: {plan.model} on {plan.devices} x {plan.device} (per device)"]
    for k, v in plan.rows.items():
        lines.append(f"  {k:<16} {_gib(v):>12}")
    lines.append(f"  {'total (training)':<16} {_gib(plan.total):>12}")
    lines.append(f"  {'KV cache (decode)':<16} {_gib(plan.kv_cache):>11}  (one row of the full context, not in the total)")
    if plan.device_memory is None:
        lines.append("  fits: unknown device memory (give --device-memory GiB)")
    else:
        verdict = "yes" if plan.fits else "NO: shard over more devices, lower batch_size, or set [parallel] ac = \"full\""
        lines.append(f"  device memory    {_gib(plan.device_memory):>12}  fits: {verdict}")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def cmd_plan(args) -> int:
    """`blockdiff plan`: the memory plan of a recipe (or of a config alone) on N devices."""
    import json

    from ..model.hf_io import load_config
    from .recipe import load_recipe

    if not DEVICE_RE.match(args.device):
        raise ValueError(f"--device must be cpu, cuda or one of {', '.join(DEVICE_MEMORY_GIB)}, got {args.device!r}")
    for flag, v in (("--devices", args.devices), ("--seq-len", args.seq_len), ("--batch-size", args.batch_size),
                    ("--block-size", args.block_size)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if args.loss_chunk_tokens is not None and args.loss_chunk_tokens < 0:
        raise ValueError(f"--loss-chunk-tokens must be >= 0 (0 = off), got {args.loss_chunk_tokens}")
    if args.adapter_rank < 0:
        raise ValueError(f"--adapter-rank must be >= 1 (0 = no adapter), got {args.adapter_rank}")
    recipe = None
    if args.recipe:
        overrides = {"model.path": str(Path(args.model).resolve())} if args.model else {}
        recipe = load_recipe(args.recipe, overrides)
    folder = Path(args.model or (recipe.model.path if recipe else ""))
    if not str(folder) or not (folder / "config.json").is_file() and not folder.name.endswith(".json"):
        raise ValueError(f"--model {folder}: no config.json there (give an HF folder or a config.json file)")
    if folder.suffix == ".json":
        cfg = ModelConfig.from_hf(json.loads(folder.read_text()), source=str(folder))
    else:
        cfg = load_config(folder)
    mem = device_memory_bytes(args.device, args.device_memory)
    if args.device == "cpu" and args.device_memory is None and mem is not None:
        mem //= args.devices  # the ranks of one machine share its memory
    if recipe is not None:
        if args.adapter_rank:
            raise ValueError("--adapter-rank is for plans without --recipe; a recipe says it in its [adapter] section")
        plan = plan_for_recipe(recipe, cfg, devices=args.devices, device=args.device, device_memory=mem,
                               model=str(folder))
        full = None
    else:
        kw = dict(seq_len=args.seq_len, batch_size=args.batch_size, block_size=args.block_size, devices=args.devices,
                  device=args.device, device_memory=mem, model=str(folder), ac=args.ac,
                  loss_chunk_tokens=args.loss_chunk_tokens)
        full = plan = plan_memory(cfg, **kw)
        if args.adapter_rank:
            from ..model.mask_adapter import AdapterConfig

            plan = plan_memory(cfg, **kw, adapter=AdapterConfig(kind="lora", rank=args.adapter_rank))
    print(format_plan(plan))
    if full is not None and full is not plan:
        verdict = "" if full.fits is None else f" (fits: {'yes' if full.fits else 'no'})"
        print(f"  full-weight training of the same run: {_gib(full.total)}{verdict}")
    out = plan.to_dict()
    if full is not None and full is not plan:
        out["full_total_bytes"], out["full_fits"] = full.total, full.fits
    print(json.dumps(out))
    return 0


def add_plan_parser(sub, formatter_class) -> None:
    """Register `blockdiff plan` (cli.build_parser calls this once)."""
    p = sub.add_parser("plan", help="per-device memory of a training run on N devices", formatter_class=formatter_class,
                       description="Print the per-device memory of training (weights, gradients, AdamW state, "
                                   "activations of the [x_t ; x0] layout) and of the decoding KV cache, from "
                                   "config.json and the recipe alone, and whether it fits the device.")
    p.add_argument("--recipe", help="recipe TOML (seq_len, batch_size per rank, phases, [parallel]); without it "
                                    "--seq-len / --batch-size / --block-size describe the run")
    p.add_argument("--model", help="HF folder or config.json (default: the recipe's [model] path)")
    p.add_argument("--devices", type=int, default=1, help="number of devices (torchrun ranks in all)")
    p.add_argument("--device", default="cuda", help="cpu, cuda (the visible GPU's memory) or an accelerator name: "
                                                    + ", ".join(DEVICE_MEMORY_GIB))
    p.add_argument("--device-memory", type=float, default=None, help="memory per device (GiB); overrides --device's")
    p.add_argument("--seq-len", type=int, default=4096, help="L, tokens per row, without --recipe")
    p.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch per device, without --recipe")
    p.add_argument("--block-size", type=int, default=32, help="block size B, without --recipe")
    p.add_argument("--adapter-rank", type=int, default=0, help="plan a mask-only adapter conversion of this LoRA "
                                                               "rank (every projection) beside the full one, without --recipe")
    p.add_argument("--ac", action="store_true", help="full activation checkpointing, without --recipe")
    p.add_argument("--loss-chunk-tokens", type=int, default=None,
                   help="tokens per chunk of the loss head (0 = all logits at once; default: the losses' own, "
                        "objectives/chunked_ce.py), without --recipe (a recipe says it in [diffusion] loss_chunk_tokens)")
    p.set_defaults(func=cmd_plan)
