"""Model configuration: one dataclass for the dense Llama / Qwen2 / Qwen3 family and the LLaDA2-MoE / Ling 2.0
(BailingMoeV2) MoE family (its MoE fields and config.json spelling live in `moe_config.py`), read from and
written to HF `config.json` dictionaries.

Derive, don't re-enter: every architectural number comes from the checkpoint's config.json. Keys we do not
model (token ids, `torch_dtype`, `auto_map`, ...) are kept in `hf_extra` and written back unchanged so a saved
folder still loads in HF transformers.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from .moe_config import MOE_ARCHITECTURES, MOE_FAMILIES, MoEConfig, moe_config_from_hf, moe_config_to_hf, moe_num_parameters

DENSE_FAMILIES = ("llama", "qwen2", "qwen3")
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES
ROPE_TYPES = ("default", "linear", "llama3")

# HF architectures string per family, used when saving a folder that had none.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                    **MOE_ARCHITECTURES}

# config.json keys that ModelConfig owns; everything else goes to hf_extra.
_OWNED_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "max_position_embeddings", "attention_bias", "mlp_bias",
    "tie_word_embeddings", "hidden_act", "blockdiff",
}


# Label alignment of a block-diffusion checkpoint (docs/alignment.md):
#   "same":  logit i predicts token i (LLaDA2.0/2.1, dFactory `same_token_labels`); official folders are "same".
#   "shift": logit i predicts token i + 1, as in the AR parent (Dream, Fast-dLLM v2): a block's first slot is read
#            from the last logit of the finished previous block (an ordinary AR step).
LABELS = ("same", "shift")
# How finished (clean) blocks are encoded, in training's clean half and in the decoder's cache-writing forwards:
#   "block_causal": a token sees its whole block (LLaDA2.0 eq. 3);
#   "causal":       a token sees only itself and earlier tokens (NBDiff): the cached prefix is the AR parent's.
CLEAN_STREAMS = ("block_causal", "causal")


# Block size assumed for an official LLaDA2 checkpoint (its config.json has no block size): its training and
# reference decoding block length, 32 tokens (LLaDA2.0 report; also the SGLang dLLM default for LLaDA2).
DEFAULT_BLOCK_SIZE = 32


def effective_block_size(requested: int | None = None, *, info: "DiffusionInfo | None" = None,
                         seq_len: int | None = None) -> int:
    """The block size B actually used, in tokens: the one owner of that rule for checkpoints, phases and decoding.

    `requested` (a phase's B, or a user's --block-size; None or 0 = not given) else the checkpoint's trained B
    (`info.block_size`) else DEFAULT_BLOCK_SIZE; capped at `seq_len` when given, because a block cannot be longer
    than a training row (B >= L trains MDLM over the whole row, and that model decodes with B = L)."""
    B = requested or (info.block_size if info is not None else DEFAULT_BLOCK_SIZE)
    if B < 1:
        raise ValueError(f"block size must be >= 1, got {B}")
    return min(B, seq_len) if seq_len else B


@dataclass
class DiffusionInfo:
    """Block-diffusion facts stored under the `blockdiff` key of config.json (absent for AR checkpoints).
    Every consumer (objectives, decoders, evaluation) reads `labels` and `clean_stream` from here."""

    mask_token_id: int  # id of [MASK] in the vocabulary
    block_size: int  # B the model was last trained with, already capped at its seq_len (decoding default)
    labels: str = "same"  # label alignment, one of LABELS
    clean_stream: str = "block_causal"  # encoding of finished blocks, one of CLEAN_STREAMS

    def __post_init__(self) -> None:
        if self.labels not in LABELS:
            raise ValueError(f"blockdiff.labels must be one of {LABELS}, got {self.labels!r}")
        if self.clean_stream not in CLEAN_STREAMS:
            raise ValueError(f"blockdiff.clean_stream must be one of {CLEAN_STREAMS}, got {self.clean_stream!r}")

    @property
    def shift(self) -> bool:
        return self.labels == "shift"

    @property
    def causal_clean(self) -> bool:
        return self.clean_stream == "causal"


def decoder_fields_to_hf(cfg: "ModelConfig") -> dict[str, Any]:
    """The config.json keys every family spells the same way (the inverse of `decoder_fields_from_hf`), in the
    order they are written; family writers add their own after them."""
    return dict(model_type=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta)


def decoder_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields every family spells the same way in config.json (sizes, heads, RoPE, norm eps, the
    blockdiff section); family readers add their own. Required keys are checked by the caller."""
    heads = int(hf["num_attention_heads"])
    # transformers >= 5 writes `rope_parameters` (theta inside); older versions `rope_theta` + `rope_scaling`.
    rope_params = dict(hf.get("rope_parameters") or {})
    theta = float(rope_params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or None
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = rope_params
    diffusion = None
    if isinstance(hf.get("blockdiff"), dict) and "mask_token_id" in hf["blockdiff"]:
        bd = hf["blockdiff"]
        diffusion = DiffusionInfo(int(bd["mask_token_id"]), int(bd["block_size"]), str(bd.get("labels", "same")),
                                  str(bd.get("clean_stream", "block_causal")))
    return dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        diffusion=diffusion,
    )


@dataclass
class ModelConfig:
    family: str = "llama"  # one of FAMILIES
    vocab_size: int = 1024  # rows of the embedding / head
    hidden_size: int = 256  # model width d
    intermediate_size: int = 688  # SwiGLU inner width
    num_layers: int = 4
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA when < num_heads)
    head_dim: int = 64  # per-head width (Qwen3 sets it independently of hidden_size)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope parameters beyond theta (type "linear" / "llama3")
    max_position_embeddings: int = 4096  # positions the model was trained for (tokens)
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Llama attention_bias=True also biases the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    tie_word_embeddings: bool = False
    rotary_dim: int | None = None  # channels per head that RoPE rotates (partial RoPE); None = head_dim
    moe: MoEConfig | None = None  # routed experts (llada2_moe / bailing_moe_v2 families only)
    diffusion: DiffusionInfo | None = None
    hf_extra: dict[str, Any] = field(default_factory=dict)  # unmodelled config.json keys, written back as-is

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model family {self.family!r} is not supported; allowed: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported; allowed: {', '.join(ROPE_TYPES)}")
        if (self.moe is not None) != (self.family in MOE_FAMILIES):
            raise ValueError(f"model family {self.family!r}: the moe section must be set exactly for {', '.join(MOE_FAMILIES)}")
        if self.moe is not None:
            self.moe.validate(self.num_layers)
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim ({self.rotary_dim}) must be even and in (0, head_dim={self.head_dim}]")

    @property
    def rope_type(self) -> str:
        s = self.rope_scaling or {}
        return s.get("rope_type", s.get("type", "default"))

    @property
    def is_diffusion(self) -> bool:
        return self.diffusion is not None

    def num_parameters(self, *, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count. For MoE families `active=True` counts only the experts one token uses and
        `embeddings=False` drops embedding + head; dense models ignore both flags except `embeddings`."""
        if self.moe is not None:
            return moe_num_parameters(self, active=active, embeddings=embeddings)
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * d * self.intermediate_size
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2) if embeddings else 0
        return self.num_layers * (attn + mlp + 2 * d) + emb + d

    # ----------------------------------------------------------------------------------- HF conversion
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read an HF config.json dict. `source` names the file in error messages."""
        model_type = hf.get("model_type")
        if model_type in MOE_FAMILIES:
            return moe_config_from_hf(cls, hf, source, decoder_fields_from_hf)
        if model_type not in FAMILIES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not a supported family; allowed: {', '.join(FAMILIES)}"
            )
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
        attention_bias = bool(hf.get("attention_bias", False))
        family = model_type
        return cls(
            family=family,
            **decoder_fields_from_hf(hf),
            # Qwen2 always has q/k/v bias and no o bias; Llama's attention_bias covers all four projections.
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hf_extra={k: copy.deepcopy(v) for k, v in hf.items() if k not in _OWNED_KEYS},
        )

    def to_hf(self) -> dict[str, Any]:
        """An HF config.json dict (rope written in both the old and the transformers-5 spelling)."""
        if self.moe is not None:
            return moe_config_to_hf(self)
        out: dict[str, Any] = copy.deepcopy(self.hf_extra)
        out.setdefault("architectures", [HF_ARCHITECTURES[self.family]])
        rope_parameters = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope_parameters.update(self.rope_scaling)
        out.update(decoder_fields_to_hf(self))
        out.update(
            rope_parameters=rope_parameters,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
            mlp_bias=self.mlp_bias,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        if self.family == "llama":
            out["attention_bias"] = self.o_bias or self.qkv_bias
        elif self.family == "qwen3":
            out["attention_bias"] = self.qkv_bias
        if self.diffusion is not None:
            out["blockdiff"] = asdict(self.diffusion)
        return out
