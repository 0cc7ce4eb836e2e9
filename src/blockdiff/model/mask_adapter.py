"""Mask-only low-rank adapters: the diffusion skill in a small file beside a frozen parent (docs/adapter.md).

The idea (I-DLM, 2026): a block-diffusion model needs new behaviour only where a [MASK] token sits -- a clean
token is read exactly as the AR parent reads it. So the parent's weights stay frozen, and each adapted projection
(`q_proj` ... `down_proj`) adds a LoRA term `scale * B A x` only at positions whose *input token* is [MASK]; a
trainable vector is added to the [MASK] token's embedding. Every position whose input is a real token computes
its own projections with the parent's weights alone. Why that keeps the parent exact: the clean stream of
[x_t ; x0] and every causal path of the decoders (AR steps, spec's drafts and verification, committed blocks)
hold real tokens only, and none of them attends to a masked slot (model/masks.py, decode/cache.py). Their hidden
states, logits and KV entries are therefore bit-for-bit the parent's: `spec` on an adapter checkpoint reproduces
the parent's greedy output (tests/test_adapter.py checks it against HF transformers' `generate` on the parent).
Masked slots (and real tokens inside a noisy block, which attend to them) see the adapted model.

How it is wired, keeping the transformer plain (docs STYLE 1): forward hooks, no new module classes in the
decoder. `attach` adds a `mask_lora` child (A [r, in], B [out, r], B = 0 at start, so the adapted model starts
as the parent) to each target `nn.Linear` and hooks it (the hook gathers the [MASK] rows, adapts them and adds the
result back: cost and saved activations scale with the masked tokens); a hook on the token embedding records which positions of
the current forward hold [MASK] (the gate) and adds the [MASK] delta; a pre-hook on the model records the
`logits_slice` (the last layer computes only those rows, so the gate is sliced the same way). The adapter's
parameters live inside the blocks, so FSDP2 shards them with their block and DCP saves them as usual.

Checkpoint format (what `save` writes instead of config.json + model.safetensors):

    blockdiff_adapter.json          format, version, the [adapter] settings, the base (path relative to this folder
                                    and absolute, SHA-256 of each of its weight files), the vocabulary size after
                                    the [MASK] token was added, the `blockdiff` diffusion facts
    blockdiff_adapter.safetensors   the LoRA A / B of every adapted projection, the [MASK] delta, and the embedding
                                    (and untied head) rows the [MASK] token added beyond the base's table
    tokenizer files                 the base's tokenizer with the [MASK] token

Why not config.json + merged weights: a mask-gated term cannot be merged into a weight (it depends on the input
token), and a folder with config.json would load in transformers, vLLM or PEFT as the *parent* -- silently the
wrong model. Why not PEFT's `adapter_config.json` / `adapter_model.safetensors` names: PEFT would apply the
LoRA at every position. With our own names, a tool that does not know the format finds no config.json and
refuses the folder loudly. The parent's folder is never written to. `load` verifies the base's hashes (a
mismatch is refused naming both folders) and rebuilds the model; `hf_io.load_pretrained` / `save_pretrained`
call it, so every verb that opens or writes a checkpoint handles adapter folders.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ADAPTER_JSON = "blockdiff_adapter.json"
ADAPTER_WEIGHTS = "blockdiff_adapter.safetensors"
FORMAT = "blockdiff-mask-adapter"
VERSION = 1
KINDS = ("none", "lora")
# HF projection names (what users know) -> our module path inside a decoder block.
TARGETS = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
           "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}


@dataclass
class AdapterConfig:
    """The recipe section [adapter]: a mask-only LoRA over a frozen parent (kind "none" = full-weight training)."""

    kind: str = "none"  # "none" (train the weights themselves) or "lora" (frozen parent + mask-only adapters)
    rank: int = 16  # r, the LoRA rank
    alpha: float = 32.0  # the LoRA scale is alpha / rank
    targets: list[str] = field(default_factory=lambda: list(TARGETS))  # projections adapted in every block
    dropout: float = 0.0  # dropout on the adapter's input (training only), a probability in [0, 1)
    mask_embedding: bool = True  # also train a vector added to the [MASK] token's embedding

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be {' or '.join(KINDS)}, got {self.kind!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be distinct names among {', '.join(TARGETS)}, got {self.targets!r}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def settings(self) -> dict:
        return asdict(self)


class MaskGate:
    """Which positions of the current forward hold [MASK] (set by the embedding hook, read by every adapter)."""

    def __init__(self, mask_id: int):
        self.mask_id = mask_id
        self.gate: Tensor | None = None  # [b, T, 1] bool
        self.any = False
        self.logits_slice: slice | None = None
        self.fresh = False  # set by an embedding call, consumed by the next forward (inputs_embeds path)
        self._rows: dict[int, Tensor] = {}

    def set_from_ids(self, ids: Tensor) -> Tensor:
        self.restore(((ids == self.mask_id).unsqueeze(-1), None, self.logits_slice))
        self.fresh = True
        return self.gate

    def snapshot(self) -> tuple:
        return self.gate, self.any, self.logits_slice

    def restore(self, snap: tuple) -> None:
        self.gate, any_, self.logits_slice = snap
        self.any = bool(self.gate.any()) if any_ is None else any_
        self._rows = {}

    def rows(self, n: int) -> Tensor | None:
        """Flat indices (into [b * n]) of the [MASK] positions of an activation with `n` positions -- the whole
        forward, or the last layer's logits slice; None when the forward holds no [MASK]. Cached per forward."""
        if not self.any:
            return None
        if n not in self._rows:
            g = self.gate
            if g.shape[1] != n and self.logits_slice is not None:
                g = g[:, self.logits_slice]
            if g.shape[1] != n:
                raise RuntimeError(f"mask adapter: an activation has {n} positions, the forward's tokens "
                                   f"{self.gate.shape[1]}")
            self._rows[n] = g.reshape(-1).nonzero().squeeze(1)
        return self._rows[n]


class MaskLoRA(nn.Module):
    """delta(x) = scale * B A dropout(x), added to one projection's output at [MASK] positions only."""

    def __init__(self, linear: nn.Linear, cfg: AdapterConfig, gate: MaskGate):
        super().__init__()
        w = linear.weight
        self.A = nn.Parameter(torch.empty(cfg.rank, linear.in_features, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(linear.out_features, cfg.rank, device=w.device, dtype=w.dtype))
        if not w.is_meta:
            nn.init.kaiming_uniform_(self.A, a=5**0.5)  # as nn.Linear (and PEFT) initialise A; B = 0
        self.scale = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.__dict__["_gate"] = gate  # a plain attribute, not a submodule (shared by every adapter of the model)

    def hook(self, linear: nn.Linear, args, out: Tensor) -> Tensor:
        idx = self._gate.rows(out.shape[1])
        if idx is None:
            return out
        # only the [MASK] rows: gathered, adapted, added back (compute and saved activations scale with the
        # masked tokens, not the sequence; every other row of `out` is returned untouched)
        x = args[0].reshape(-1, args[0].shape[-1]).index_select(0, idx)
        delta = F.linear(F.linear(self.dropout(x), self.A.to(out.dtype)), self.B.to(out.dtype)) * self.scale
        return out.reshape(-1, out.shape[-1]).index_add(0, idx, delta).view_as(out)


class MaskEmbedding(nn.Module):
    """Records the gate from the token ids and adds a trainable vector to the [MASK] token's embedding."""

    def __init__(self, emb: nn.Embedding, cfg: AdapterConfig, gate: MaskGate):
        super().__init__()
        w = emb.weight
        self.delta = nn.Parameter(torch.zeros(w.shape[1], device=w.device, dtype=w.dtype)) if cfg.mask_embedding else None
        self.__dict__["_gate"] = gate

    def hook(self, emb: nn.Embedding, args, out: Tensor) -> Tensor:
        g = self._gate.set_from_ids(args[0])
        if self.delta is None or not self._gate.any:
            return out
        return out + self.delta.to(out.dtype) * g.to(out.dtype)


@dataclass
class Attachment:
    """What `attach` put on a model (kept as `model.mask_adapter`)."""

    config: AdapterConfig
    gate: MaskGate
    base: dict  # {"path": absolute base folder, "sha256": {file: hash}, "vocab_size": base rows}

    @property
    def mask_id(self) -> int:
        return self.gate.mask_id


def attachment(model) -> Attachment | None:
    return getattr(model, "mask_adapter", None)


def _root_pre_hook(model, args, kwargs):
    gate = model.mask_adapter.gate
    gate.logits_slice = kwargs.get("logits_slice")
    ids = args[0] if args else kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    if ids is None and embeds is not None and not (gate.fresh and gate.gate is not None
                                                   and gate.gate.shape[:2] == embeds.shape[:2]):
        raise RuntimeError("a mask-adapter model needs its token ids: embed them with model.embed (or "
                           "model.tok_embeddings) right before a forward with inputs_embeds")


def _root_post_hook(model, args, kwargs, out):
    model.mask_adapter.gate.fresh = False


def _block_pre_hook(block, args, kwargs):
    """Inside a block: take the gate snapshot an activation-checkpoint wrapper passed (see `snapshot_for_ac`)."""
    snap = kwargs.pop("_mask_gate", None)
    if snap is not None:
        block.__dict__["_mask_gate"].restore(snap)
    return args, kwargs


def snapshot_for_ac(model) -> None:
    """After activation checkpointing wrapped the blocks (train/parallel.py apply_ac): each wrapper passes the
    gate of the forward it runs in as a keyword to its block, so the recomputation in backward -- which may come
    after later forwards changed the gate (DPO's chosen and rejected rows, several timesteps) -- sees the gate of
    its own forward. Without checkpointing nothing is recomputed and the shared gate is read directly."""
    att = attachment(model)
    if att is None:
        return
    gate = att.gate

    def outer(wrapper, args, kwargs):
        return args, {**kwargs, "_mask_gate": gate.snapshot()}

    for layer in model.layers:
        if layer is not getattr(layer, "_checkpoint_wrapped_module", layer):
            layer.register_forward_pre_hook(outer, with_kwargs=True)


def attach(model, cfg: AdapterConfig, mask_id: int, base: dict) -> Attachment:
    """Freeze `model` and add mask-only adapters (see the module docstring). `base` describes the parent folder
    (`fingerprint`). Returns the attachment, also kept as `model.mask_adapter`."""
    if not cfg.enabled:
        raise ValueError("attach: [adapter] kind is \"none\"")
    if attachment(model) is not None:
        raise ValueError("attach: the model already has a mask adapter")
    if model.cfg.moe is not None:
        raise ValueError(f"[adapter]: mask-only adapters support the dense Llama / Qwen family; this checkpoint is "
                         f"{model.cfg.family} (MoE experts are not adapted); train it without [adapter]")
    model.requires_grad_(False)
    gate = MaskGate(mask_id)
    for layer in model.layers:
        layer.__dict__["_mask_gate"] = gate
        layer.register_forward_pre_hook(_block_pre_hook, with_kwargs=True)
        for name in cfg.targets:
            linear = layer.get_submodule(TARGETS[name])
            lora = MaskLoRA(linear, cfg, gate)
            linear.add_module("mask_lora", lora)
            linear.register_forward_hook(lora.hook)
    emb = MaskEmbedding(model.tok_embeddings, cfg, gate)
    model.tok_embeddings.add_module("mask_embedding", emb)
    model.tok_embeddings.register_forward_hook(emb.hook)
    model.register_forward_pre_hook(_root_pre_hook, with_kwargs=True)
    model.register_forward_hook(_root_post_hook, with_kwargs=True)
    att = Attachment(cfg, gate, dict(base))
    model.__dict__["mask_adapter"] = att  # a plain attribute: not a module, not in the state dict
    return att


def adapter_state(model) -> dict[str, Tensor]:
    """The adapter's own tensors (our parameter names), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_param(n)}


def is_adapter_param(name: str) -> bool:
    return ".mask_lora." in name or ".mask_embedding." in name


def adapter_parameters(cfg, adapter: AdapterConfig) -> int:
    """Trainable parameters of `adapter` on a dense model of config `cfg`, counted from the shapes (the plan's)."""
    d, hq, hkv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {"q_proj": (d, hq), "k_proj": (d, hkv), "v_proj": (d, hkv), "o_proj": (hq, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    per_layer = sum(adapter.rank * (i + o) for i, o in (shapes[t] for t in adapter.targets))
    return cfg.num_layers * per_layer + (d if adapter.mask_embedding else 0)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the base's fingerprint ------------------------------------------------------------------------------------

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def fingerprint(folder: str | Path, vocab_size: int) -> dict:
    """The base folder's reference: absolute path, SHA-256 of each weight file, the vocabulary size of its table."""
    folder = Path(folder).resolve()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights to reference as an adapter's base")
    return {"path": str(folder), "sha256": {f.name: _sha256(f) for f in files}, "vocab_size": vocab_size}


def _check_base(adapter_dir: Path, base_dir: Path, want: dict) -> None:
    have_files = {f.name for f in base_dir.glob("*.safetensors")}
    if have_files != set(want):
        raise ValueError(f"{adapter_dir} was trained on a base with weight files {sorted(want)}, but {base_dir} "
                         f"holds {sorted(have_files) or 'none'}: not the same base model")
    for name, digest in sorted(want.items()):
        got = _sha256(base_dir / name)
        if got != digest:
            raise ValueError(f"{adapter_dir} was trained on another base: {base_dir / name} has SHA-256 {got[:16]}..., "
                             f"the adapter recorded {digest[:16]}...; load it with the base it was trained on")


# -- save / load ------------------------------------------------------------------------------------------------

def is_adapter_folder(folder: str | Path) -> bool:
    """An adapter folder: our adapter file and no config.json (`save` writes none)."""
    return (Path(folder) / ADAPTER_JSON).is_file() and not (Path(folder) / "config.json").is_file()


def save(model, tmp: Path, final: Path) -> None:
    """Write the adapter files of `model` into `tmp` (the temporary folder `hf_io.save_pretrained` renames to
    `final`; the base's relative path is computed from `final`)."""
    from safetensors.torch import save_file

    from ..atomic import follow_umask

    att = attachment(model)
    base = att.base
    V0, V = base["vocab_size"], model.cfg.vocab_size
    tensors = {n: t.contiguous().cpu() for n, t in adapter_state(model).items()}
    if V > V0:
        tensors["added.tok_embeddings"] = model.tok_embeddings.weight.detach()[V0:].contiguous().cpu()
        if not model.cfg.tie_word_embeddings:
            tensors["added.output"] = model.output.weight.detach()[V0:].contiguous().cpu()
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
    follow_umask(tmp / ADAPTER_WEIGHTS)
    meta = {"format": FORMAT, "version": VERSION, "adapter": att.config.settings(),
            "base": {"path": os.path.relpath(base["path"], Path(final).resolve()), "abs_path": base["path"],
                     "sha256": base["sha256"], "vocab_size": V0},
            "vocab_size": V, "blockdiff": asdict(model.cfg.diffusion),
            "note": "a blockdiff mask-only adapter: load it with blockdiff (load_checkpoint), not as a plain model"}
    (tmp / ADAPTER_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / ADAPTER_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} version {VERSION} file (format {meta.get('format')!r}, "
                         f"version {meta.get('version')!r})")
    for key in ("adapter", "base", "vocab_size", "blockdiff"):
        if not meta.get(key):
            raise ValueError(f"{path}: field {key!r} is missing")
    return meta


def base_folder(folder: Path, meta: dict, base: str | Path | None = None) -> Path:
    """Where the base is: `base` when given, else the recorded relative path, else the recorded absolute one."""
    if base is not None:
        b = Path(base)
        if not b.is_dir():
            raise FileNotFoundError(f"base model folder {b} not found")
        return b
    for cand in ((folder / meta["base"]["path"]), Path(meta["base"]["abs_path"])):
        if cand.is_dir():
            return cand.resolve()
    raise FileNotFoundError(f"{folder}: its base model is not at {meta['base']['abs_path']} (recorded) nor at "
                            f"{meta['base']['path']} relative to it; pass the base folder (load_checkpoint(..., "
                            "base=...))")


def load_config(folder: str | Path, base: str | Path | None = None):
    """The ModelConfig of an adapter folder: the base's, with the grown vocabulary and the diffusion facts."""
    from .config import DiffusionInfo
    from .hf_io import load_config as load_hf_config

    folder = Path(folder)
    meta = read_meta(folder)
    cfg = load_hf_config(base_folder(folder, meta, base))
    cfg.vocab_size = int(meta["vocab_size"])
    cfg.diffusion = DiffusionInfo(**meta["blockdiff"])
    return cfg


def load(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         base: str | Path | None = None):
    """The model of an adapter folder: its base (hash-checked), the added vocabulary rows, the adapter."""
    from safetensors import safe_open

    from .config import DiffusionInfo
    from .hf_io import load_pretrained
    from .transformer import resize_vocab

    folder = Path(folder)
    meta = read_meta(folder)
    base_dir = base_folder(folder, meta, base)
    if is_adapter_folder(base_dir):
        raise ValueError(f"{folder}: its base {base_dir} is itself an adapter folder; an adapter's base is a plain "
                         "HF folder")
    _check_base(folder, base_dir, meta["base"]["sha256"])
    model = load_pretrained(base_dir, dtype=dtype, device=device)
    V0, V = int(meta["base"]["vocab_size"]), int(meta["vocab_size"])
    if model.cfg.vocab_size != V0:
        raise ValueError(f"{folder}: the base {base_dir} has {model.cfg.vocab_size} vocabulary rows, the adapter "
                         f"recorded {V0}")
    if V > V0:
        resize_vocab(model, V)
    model.cfg.diffusion = DiffusionInfo(**meta["blockdiff"])
    try:
        cfg = AdapterConfig(**meta["adapter"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / ADAPTER_JSON}: adapter: {e}") from None
    attach(model, cfg, model.cfg.diffusion.mask_token_id,
           {"path": str(base_dir.resolve()), "sha256": meta["base"]["sha256"], "vocab_size": V0})
    params = dict(model.named_parameters())
    wpath = folder / ADAPTER_WEIGHTS
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: file not found")
    expected = set(adapter_state(model))
    seen = set()
    with safe_open(str(wpath), framework="pt") as f, torch.no_grad():
        for key in f.keys():
            t = f.get_tensor(key)
            if key == "added.tok_embeddings":
                target = model.tok_embeddings.weight[V0:]
            elif key == "added.output":
                target = model.output.weight[V0:]
            elif key in expected:
                target = params[key]
                seen.add(key)
            else:
                raise ValueError(f"{wpath}: tensor {key} does not belong to this adapter ({cfg.kind}, targets "
                                 f"{', '.join(cfg.targets)})")
            if tuple(t.shape) != tuple(target.shape):
                raise ValueError(f"{wpath}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
            target.copy_(t)
    missing = sorted(expected - seen)
    if missing:
        raise ValueError(f"{wpath}: lacks tensors {', '.join(missing[:4])}")
    return model


def copy_attachment(src, dst) -> None:
    """Give `dst` (a fresh model of `src`'s config, e.g. rank 0's export of a sharded run) `src`'s adapter
    structure, so that `src`'s state dict loads into it."""
    att = attachment(src)
    if att is not None:
        attach(dst, att.config, att.mask_id, att.base)


@torch.no_grad()
def average(paths: list[Path], out: Path) -> Path:
    """Top-k merge of adapter checkpoints: the mean of their adapter tensors (float64, cast back), over the same
    base (never the base itself: for an 8B parent that would be 64 GB of float64 for nothing); the tokenizer is the
    first folder's."""
    from safetensors.torch import load_file, save_file

    from ..atomic import folder_for_replace, follow_umask
    from ..data.tokenizer import load_tokenizer

    metas = [read_meta(p) for p in paths]
    for p, m in zip(paths[1:], metas[1:]):
        if m["base"]["sha256"] != metas[0]["base"]["sha256"] or m["adapter"] != metas[0]["adapter"]:
            raise ValueError(f"{p}: adapter or base differs from {paths[0]}; only adapters of one run are averaged")
    states = [load_file(str(Path(p) / ADAPTER_WEIGHTS)) for p in paths]
    keys = states[0].keys()
    for p, s in zip(paths[1:], states[1:]):
        if s.keys() != keys:
            raise ValueError(f"{p}: tensors differ from {paths[0]}")
    mean = {k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype) for k in keys}
    out = Path(out)
    with folder_for_replace(out) as tmp:
        load_tokenizer(paths[0]).save(tmp)
        meta = dict(metas[0])
        base_abs = Path(meta["base"]["abs_path"])
        meta["base"] = {**meta["base"], "path": os.path.relpath(base_abs, out.resolve())}
        (tmp / ADAPTER_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        save_file(mean, str(tmp / ADAPTER_WEIGHTS), metadata={"format": FORMAT})
        follow_umask(tmp / ADAPTER_WEIGHTS)
    return out
