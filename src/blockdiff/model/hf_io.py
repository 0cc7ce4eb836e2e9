"""Load and save models in the HF folder layout: config.json + model.safetensors (or sharded shards with
model.safetensors.index.json) + tokenizer files.

Loading is memory-frugal: the model is built on the meta device, materialised empty, and each tensor is read
lazily from safetensors straight into its parameter (no second full copy of the state dict in RAM).
Saving is atomic: everything is written to a temporary sibling folder that is renamed into place at the end,
so an interrupted save never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapters import IGNORED_HF_KEYS, hf_to_ours, ours_to_hf
from .attention import rope_inv_freq
from .config import ModelConfig
from .transformer import Transformer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    _chmod_default(Path(tmp), 0o666)  # mkstemp makes 0600; match what open() would create
    os.replace(tmp, path)


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
    """Build our Transformer from an HF folder (Llama / Qwen2 / Qwen3 dense, AR or blockdiff-converted)."""
    folder = Path(folder)
    cfg = load_config(folder)
    files = _weight_files(folder)
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


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        _chmod_default(tmp, 0o777)  # mkdtemp makes 0700; give the folder the permissions mkdir would
        sd = hf_state_dict(model, dtype)
        hf_cfg = model.cfg.to_hf()
        # transformers >= 4.56 reads `dtype` before `torch_dtype`: overwrite both, or a `dtype` kept in hf_extra
        # from the source folder would mislabel the weights we write.
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
        write_json_atomic(tmp / "config.json", hf_cfg)
        _write_weights(sd, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, obj in (extra_files or {}).items():
            write_json_atomic(tmp / name, obj)
        if write_extra is not None:
            write_extra(tmp)
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_weights(sd: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / WEIGHTS_NAME), metadata=meta)
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    write_json_atomic(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _chmod_default(path: Path, mode: int) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace `folder` by `tmp` with renames only (the old folder survives until the new one is in place)."""
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            os.replace(old, folder)  # put the good checkpoint back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
