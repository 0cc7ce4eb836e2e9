"""Load and save models in the HF folder layout: config.json + model.safetensors (or sharded shards with
model.safetensors.index.json) + tokenizer files.

Loading is memory-frugal: the model is built on the meta device, materialised empty, and each tensor is read
lazily from safetensors straight into its parameter (no second full copy of the state dict in RAM).
Saving is atomic: everything is written to a temporary sibling folder that is renamed into place at the end,
so an interrupted save never leaves a half-written checkpoint where a good one was.

One load path and one save path serve every family; what differs (key names, stacked experts, fp32 buffers,
tensors that may be absent or skipped) is asked of the family's state-dict adapter (`adapters.DENSE`,
`moe_adapter.MOE`). A stacked expert tensor is loaded expert by expert from the official per-expert tensors,
straight into its slice, and saved as per-expert views. Saving copies nothing unless a dtype cast is asked
for, and then shard by shard.
"""

from __future__ import annotations

import contextlib
import json
import os  # noqa: F401  (tests/test_hf_io.py patches hf_io.os.replace; the folder swap is atomic.py)
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import folder_for_replace, follow_umask, write_json
from . import mask_adapter
from .adapters import DENSE, StateDictAdapter
from .attention import rope_inv_freq
from .build import build_model
from .config import DiffusionInfo, ModelConfig
from .moe_adapter import MOE
from .transformer import Transformer

# Block size assumed for an official LLaDA2 checkpoint (config.json has no block size): its training and
# reference decoding block length, 32 tokens (LLaDA2.0 report; also the SGLang dLLM default for LLaDA2).
LLADA2_DEFAULT_BLOCK_SIZE = 32

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def load_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found")
    if mask_adapter.is_adapter_folder(folder):
        return mask_adapter.load_config(folder)
    path = folder / "config.json"
    return ModelConfig.from_hf(read_json(path), source=str(path))


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map HF key -> safetensors file holding it."""
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing 'weight_map' object")
        files = {k: folder / v for k, v in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index.name} not found")
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        with _open(single) as f:
            return {k: single for k in f.keys()}
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} (found: {', '.join(found) or 'nothing'}); "
        "only safetensors checkpoints are supported"
    )


@contextlib.contextmanager
def _open(path: Path):
    """safe_open with its errors (bad header, truncated or random bytes) turned into one line naming the file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); re-save or re-download it") from None


def _adapter(cfg: ModelConfig) -> StateDictAdapter:
    return MOE if cfg.moe is not None else DENSE


def _empty_model(cfg: ModelConfig, adapter: StateDictAdapter, dtype: torch.dtype, device) -> torch.nn.Module:
    """The model with uninitialised weights in `dtype` (built on meta, no init cost); fp32 buffers zeroed."""
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(cfg, cfg.rotary_dim).to(device)  # non-persistent buffer: meta init left it empty
    for name, buf in model.named_buffers():
        if adapter.fp32_buffer(name):
            buf.data = torch.zeros(buf.shape, dtype=torch.float32, device=device)
    return model


def load_pretrained(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Build our model from an HF folder: Llama / Qwen2 / Qwen3 dense (AR or blockdiff-converted), or
    LLaDA2-MoE / Ling 2.0 (BailingMoeV2) with per-expert tensors; or a mask-only adapter folder over its base
    (`mask_adapter.load`)."""
    folder = Path(folder)
    if mask_adapter.is_adapter_folder(folder):
        return mask_adapter.load(folder, dtype=dtype, device=device)
    cfg = load_config(folder)
    files = _weight_files(folder)
    adapter = _adapter(cfg)
    model = _empty_model(cfg, adapter, dtype, device)
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if adapter.fp32_buffer(n))
    expected = {key for key, _, _ in _hf_views(model, adapter)}
    loaded: set[str] = set()
    unexpected, extra = [], []
    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        by_file.setdefault(f, []).append(key)
    for f, keys in sorted(by_file.items()):
        with _open(f) as handle:
            for key in keys:
                if adapter.is_extra_layer(key, cfg.num_layers):
                    extra.append(key)
                    continue
                mapped = adapter.hf_to_ours(key)
                if mapped is not None and mapped[0] == "output.weight" and cfg.tie_word_embeddings:
                    continue  # tied head: the embedding is the weight
                shape = tuple(handle.get_slice(key).get_shape())  # header only, no data read
                if mapped is not None and adapter.absent_on_load(mapped[0], shape, cfg):
                    continue
                if mapped is None or mapped[0] not in tensors or key not in expected:
                    if not (mapped is None and adapter.ignored.search(key)):
                        unexpected.append(key)
                    continue
                name, expert = mapped
                target = tensors[name] if expert is None else tensors[name][expert]
                if shape != tuple(target.shape):
                    raise ValueError(f"{f}: tensor {key} has shape {shape}, config.json implies {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(handle.get_tensor(key))  # copy_ casts to the target dtype
                if target.is_floating_point() and not torch.isfinite(target).all():
                    bad = int((~torch.isfinite(target)).sum())
                    raise ValueError(f"{f}: tensor {key} holds {bad} NaN/inf value(s) of {target.numel()}; the "
                                     "checkpoint is corrupt (a diverged run saves none: use an earlier checkpoint)")
                loaded.add(key)
    if extra:
        adapter.skipped_extra_layers(extra, cfg, folder)
    if unexpected:
        raise ValueError(f"{folder}: checkpoint has tensors this {cfg.family} config does not use: {', '.join(unexpected[:8])}")
    missing = sorted(expected - loaded)
    if missing and not all(adapter.may_be_missing(k, cfg) for k in missing):
        raise ValueError(f"{folder}: checkpoint lacks tensors: {', '.join(missing[:8])}")
    if cfg.family == "llada2_moe" and cfg.diffusion is None:
        cfg.diffusion = _llada2_diffusion_info(folder)
    return model


def _llada2_diffusion_info(folder: Path) -> DiffusionInfo | None:
    """An official LLaDA2 folder has no `blockdiff` key: take [MASK] from its tokenizer (`<|mask|>`) or a
    `mask_token_id` in config.json, and the LLaDA2 block size. None when neither names a mask token."""
    cfg_json = read_json(folder / "config.json")
    mask_id = cfg_json.get("mask_token_id")
    if not isinstance(mask_id, int) and (folder / "tokenizer.json").is_file():
        from ..data.tokenizer import load_tokenizer  # lazy: only this path reads tokenizer files

        mask_id = load_tokenizer(folder).mask_id
    if not isinstance(mask_id, int):
        print(f"[blockdiff] {folder}: llada2_moe checkpoint without a mask token in its tokenizer or config.json; "
              "diffusion decoding needs one", file=sys.stderr)
        return None
    return DiffusionInfo(mask_token_id=mask_id, block_size=LLADA2_DEFAULT_BLOCK_SIZE)


def _hf_views(model, adapter: StateDictAdapter):
    """(HF key, our name, tensor) for every tensor a folder holds: views of our parameters and persistent buffers,
    stacked experts split per expert, the tied head left out."""
    tied = model.output.weight is model.tok_embeddings.weight
    for name, t in model.state_dict(keep_vars=True).items():
        if tied and name == "output.weight":
            continue
        t = t.detach()
        if adapter.is_stacked(name):
            for e in range(t.shape[0]):
                yield adapter.ours_to_hf(name, e), name, t[e]
        else:
            yield adapter.ours_to_hf(name), name, t


class _Cast:
    """A tensor to write in another dtype, cast only when its shard is written (keeps saving frugal)."""

    def __init__(self, t: torch.Tensor, dtype: torch.dtype):
        self.t, self.dtype = t, dtype

    def nbytes(self) -> int:
        return self.t.numel() * torch.empty(0, dtype=self.dtype).element_size()

    def materialize(self) -> torch.Tensor:
        return self.t.to(dtype=self.dtype, device="cpu").contiguous()


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor | _Cast]:
    """HF key -> tensor to write: a view of ours when it is on the CPU in the wanted dtype, else a `_Cast`
    materialised when its shard is written. Wanted dtype: `dtype` (None = as in memory), fp32 for the
    adapter's fp32 buffers."""
    adapter = _adapter(model.cfg)
    out: dict[str, torch.Tensor | _Cast] = {}
    for key, name, t in _hf_views(model, adapter):
        want = torch.float32 if adapter.fp32_buffer(name) else (dtype or t.dtype)
        out[key] = t if want == t.dtype and t.device.type == "cpu" else _Cast(t, want)
    return out


def save_pretrained(
    model: Transformer,
    folder: str | Path,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    extra_files: dict[str, object] | None = None,
    write_extra=None,
) -> Path:
    """Write `folder` atomically in the HF layout. `extra_files` maps file name -> JSON-able object;
    `write_extra(tmp_folder)` may write further files (optimizer state, ...) inside the same atomic swap."""
    folder = Path(folder)
    with folder_for_replace(folder) as tmp:
        if mask_adapter.attachment(model) is not None:  # the adapter files beside a reference to the frozen base
            mask_adapter.save(model, tmp, folder)
        else:
            hf_cfg = model.cfg.to_hf()
            # transformers >= 4.56 reads `dtype` before `torch_dtype`: overwrite both, or a `dtype` kept in hf_extra
            # from the source folder would mislabel the weights we write.
            hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
            write_json(tmp / "config.json", hf_cfg)
            _write_weights(hf_state_dict(model, dtype), tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, obj in (extra_files or {}).items():
            write_json(tmp / name, obj)
        if write_extra is not None:
            write_extra(tmp)
    return folder


def _write_weights(sd: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.nbytes() if isinstance(t, _Cast) else t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    meta = {"format": "pt"}

    def materialize(shard: dict) -> dict[str, torch.Tensor]:
        return {k: t.materialize() if isinstance(t, _Cast) else t for k, t in shard.items()}

    if len(shards) == 1:
        save_file(materialize(shards[0]), str(folder / WEIGHTS_NAME), metadata=meta)
        follow_umask(folder / WEIGHTS_NAME)
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = materialize(shard)
        save_file(shard, str(folder / name), metadata=meta)
        follow_umask(folder / name)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

