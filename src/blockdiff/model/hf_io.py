"""Load and save models in the HF folder layout: config.json + model.safetensors (or sharded shards with
model.safetensors.index.json) + tokenizer files.

Loading is memory-frugal: the model is built on the meta device, materialised empty, and each tensor is read
lazily from safetensors straight into its parameter (no second full copy of the state dict in RAM).
Saving is atomic: everything is written to a temporary sibling folder that is renamed into place at the end,
so an interrupted save never leaves a half-written checkpoint where a good one was.

MoE families (llada2_moe, bailing_moe_v2; `moe_adapter.py`): each official per-expert tensor is read lazily
into its slice of our stacked expert tensor, and saving writes per-expert views of the stacked tensors (no
copy unless a dtype cast is asked for, and then shard by shard). `expert_bias` stays fp32 in memory and on
disk whatever `dtype` is: selection compares biased scores that differ by ~1e-3, which bf16 would blur.
"""

from __future__ import annotations

import json
import os  # noqa: F401  (tests/test_hf_io.py patches hf_io.os.replace; the folder swap is atomic.py)
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import folder_for_replace, write_json
from . import moe_adapter
from .adapters import IGNORED_HF_KEYS, hf_to_ours, ours_to_hf
from .attention import rope_inv_freq
from .build import build_model
from .config import DiffusionInfo, ModelConfig
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
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} (found: {', '.join(found) or 'nothing'}); "
        "only safetensors checkpoints are supported"
    )


def load_pretrained(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Build our model from an HF folder: Llama / Qwen2 / Qwen3 dense (AR or blockdiff-converted), or
    LLaDA2-MoE / Ling 2.0 (BailingMoeV2) with per-expert tensors."""
    folder = Path(folder)
    cfg = load_config(folder)
    files = _weight_files(folder)
    if cfg.moe is not None:
        return _load_moe(folder, cfg, files, dtype, device)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)  # non-persistent buffer: meta init left it empty
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        by_file.setdefault(f, []).append(key)
    unexpected = []
    for f, keys in sorted(by_file.items()):
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for key in keys:
                ours = hf_to_ours(key)
                if ours is None:
                    if not IGNORED_HF_KEYS.search(key):
                        unexpected.append(key)
                    continue
                if ours == "output.weight" and cfg.tie_word_embeddings:
                    continue  # tied head: the embedding is the weight
                p = params.get(ours)
                if p is None:
                    unexpected.append(key)
                    continue
                t = handle.get_tensor(key)
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{f}: tensor {key} has shape {tuple(t.shape)}, config.json implies {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t.to(dtype))
                loaded.add(ours)
    if unexpected:
        raise ValueError(f"{folder}: checkpoint has tensors this {cfg.family} config does not use: {', '.join(unexpected[:8])}")
    expected = {n for n in params if not (n == "output.weight" and cfg.tie_word_embeddings)}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks tensors: {', '.join(ours_to_hf(m) for m in missing[:8])}")
    return model


def _load_moe(folder: Path, cfg: ModelConfig, files: dict[str, Path], dtype: torch.dtype, device) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(cfg, cfg.rotary_dim).to(device)
    tensors = dict(model.named_parameters())
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            buf.data = torch.zeros(buf.shape, dtype=torch.float32, device=device)  # fp32: see module docstring
            tensors[name] = buf
    expected = set(_moe_hf_tensors(model))
    loaded: set[str] = set()
    unexpected, mtp = [], []
    by_file: dict[Path, list[str]] = {}
    for key, f in files.items():
        by_file.setdefault(f, []).append(key)
    for f, keys in sorted(by_file.items()):
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for key in keys:
                if moe_adapter.is_mtp_key(key, cfg.num_layers):
                    mtp.append(key)
                    continue
                mapped = moe_adapter.hf_to_ours(key)
                if mapped is not None and mapped[0] == "output.weight" and cfg.tie_word_embeddings:
                    continue  # tied head: the embedding is the weight
                if (mapped is not None and ".shared." in mapped[0] and not cfg.moe.num_shared_experts
                        and 0 in handle.get_slice(key).get_shape()):
                    continue  # num_shared_experts=0: Ling's code saves a zero-width shared expert; nothing to load
                if mapped is None or mapped[0] not in tensors or key not in expected:
                    if not (mapped is None and moe_adapter.IGNORED_MOE_HF_KEYS.search(key)):
                        unexpected.append(key)
                    continue
                name, expert = mapped
                target = tensors[name] if expert is None else tensors[name][expert]
                t = handle.get_slice(key)
                if tuple(t.get_shape()) != tuple(target.shape):
                    raise ValueError(f"{f}: tensor {key} has shape {tuple(t.get_shape())}, config.json implies {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(handle.get_tensor(key))  # copy_ casts to the target dtype
                loaded.add(key)
    if mtp:
        n = len({moe_adapter.layer_of(k) for k in mtp})
        print(f"[blockdiff] {folder}: skipped {n} multi-token-prediction layer(s) ({len(mtp)} tensors) after layer "
              f"{cfg.num_layers - 1}: they are not part of the decoder", file=sys.stderr)
        cfg.hf_extra["num_nextn_predict_layers"] = 0  # a folder we save holds no MTP layers
    if unexpected:
        raise ValueError(f"{folder}: checkpoint has tensors this {cfg.family} config does not use: {', '.join(unexpected[:8])}")
    missing = sorted(expected - loaded)
    if missing:
        if missing == [k for k in missing if k.endswith("mlp.gate.expert_bias")] and not cfg.moe.expert_bias:
            pass  # moe_router_enable_expert_bias=false: an absent bias is zero (the official buffer's init)
        else:
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


def _moe_hf_tensors(model) -> dict[str, torch.Tensor]:
    """Official key -> tensor (views of our parameters and buffers; stacked experts split per expert)."""
    out: dict[str, torch.Tensor] = {}
    tied = model.output.weight is model.tok_embeddings.weight
    for name, t in model.state_dict(keep_vars=True).items():
        if tied and name == "output.weight":
            continue
        t = t.detach()
        if moe_adapter.is_stacked(name):
            for e in range(t.shape[0]):
                out[moe_adapter.ours_to_hf(name, e)] = t[e]
        else:
            out[moe_adapter.ours_to_hf(name)] = t
    return out


class _Cast:
    """A tensor to write in another dtype, cast only when its shard is written (keeps saving frugal)."""

    def __init__(self, t: torch.Tensor, dtype: torch.dtype):
        self.t, self.dtype = t, dtype

    def nbytes(self) -> int:
        return self.t.numel() * torch.empty(0, dtype=self.dtype).element_size()

    def materialize(self) -> torch.Tensor:
        return self.t.to(dtype=self.dtype, device="cpu").contiguous()


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    if getattr(model.cfg, "moe", None) is not None:
        out = {}
        for k, t in _moe_hf_tensors(model).items():
            want = torch.float32 if k.endswith("expert_bias") else (dtype or t.dtype)
            out[k] = t if want == t.dtype and t.device.type == "cpu" else _Cast(t, want)
        return out
    out = {}
    tied = model.output.weight is model.tok_embeddings.weight
    for name, p in model.named_parameters():
        if tied and name == "output.weight":
            continue
        t = p.detach()
        out[ours_to_hf(name)] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
    if tied and "lm_head.weight" in out:
        del out["lm_head.weight"]
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
        sd = hf_state_dict(model, dtype)
        hf_cfg = model.cfg.to_hf()
        # transformers >= 4.56 reads `dtype` before `torch_dtype`: overwrite both, or a `dtype` kept in hf_extra
        # from the source folder would mislabel the weights we write.
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
        write_json(tmp / "config.json", hf_cfg)
        _write_weights(sd, tmp, max_shard_bytes)
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
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = materialize(shard)
        save_file(shard, str(folder / name), metadata=meta)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

