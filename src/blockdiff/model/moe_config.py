"""The MoE part of the model config for the LLaDA2-MoE / Ling 2.0 (BailingMoeV2) family, and how those
families' `config.json` maps to `ModelConfig` and back.

Field names follow the official configs (inclusionAI LLaDA2.0-mini / -flash, Ling-mini-2.0 `config.json` and
their `configuration_*.py` remote code): `num_experts`, `num_experts_per_tok`, `n_group`, `topk_group`,
`moe_intermediate_size`, `num_shared_experts`, `first_k_dense_replace`, `routed_scaling_factor`,
`norm_topk_prob`, `score_function`, `moe_router_enable_expert_bias`, `use_qk_norm`, `partial_rotary_factor`,
`use_qkv_bias`, `use_bias`. Keys we do not model (`auto_map`, `architectures`, token ids,
`num_nextn_predict_layers`, `output_router_logits`, `moe_shared_expert_intermediate_size`, ...) stay in
`ModelConfig.hf_extra` and are written back unchanged.

This module imports nothing from `config.py` (config.py imports it); functions that build a `ModelConfig`
take the class as an argument.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

MOE_FAMILIES = ("llada2_moe", "bailing_moe_v2")
MOE_ARCHITECTURES = {"llada2_moe": "LLaDA2MoeModelLM", "bailing_moe_v2": "BailingMoeV2ForCausalLM"}

# config.json keys the MoE families' reader owns; everything else goes to hf_extra.
MOE_OWNED_KEYS = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    "tie_word_embeddings", "hidden_act", "use_qkv_bias", "use_bias", "use_qk_norm", "partial_rotary_factor",
    "num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_shared_experts", "n_group", "topk_group",
    "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob", "score_function",
    "moe_router_enable_expert_bias", "blockdiff",
}


@dataclass
class MoEConfig:
    num_experts: int = 8  # routed experts E
    num_experts_per_tok: int = 2  # experts k chosen per token
    moe_intermediate_size: int = 64  # SwiGLU width of one routed expert
    num_shared_experts: int = 1  # always-on experts, fused into one SwiGLU of width num_shared * moe_intermediate; 0: none
    n_group: int = 1  # expert groups for group-limited routing (experts per group = E / n_group)
    topk_group: int = 1  # groups kept per token
    first_k_dense_replace: int = 0  # the first this-many layers use a dense SwiGLU of intermediate_size
    routed_scaling_factor: float = 1.0  # multiplies the (normalised) routing weights
    # The next two are read and written back unchanged, but, as in the official LLaDA2 / BailingMoeV2 gate, they
    # change nothing: the k chosen weights are always normalised to sum 1, and selection always adds expert_bias.
    norm_topk_prob: bool = True  # config.json norm_topk_prob (unused by the gate, see above)
    score_function: str = "sigmoid"  # only sigmoid is used by the family
    expert_bias: bool = True  # config.json moe_router_enable_expert_bias (unused by the gate, see above)

    @property
    def shared_intermediate_size(self) -> int:
        # As the official modeling code sizes it (moe_intermediate_size * num_shared_experts).
        return self.moe_intermediate_size * self.num_shared_experts

    def validate(self, num_layers: int) -> None:
        """Raise ValueError naming the config.json field for values the router cannot use."""
        E, G = self.num_experts, self.n_group
        if E < 1:
            raise ValueError(f"num_experts must be >= 1, got {E}")
        if G < 1 or E % G:
            raise ValueError(f"num_experts ({E}) must be divisible by n_group ({G})")
        if not 1 <= self.topk_group <= G:
            raise ValueError(f"topk_group ({self.topk_group}) must be in [1, n_group={G}]")
        per_group = E // G
        if G > 1 and per_group < 2:
            # A group's score is the sum of its top-2 expert scores (official router), so a group needs 2.
            raise ValueError(f"num_experts / n_group = {per_group}: group-limited routing needs >= 2 experts per group")
        if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, topk_group * num_experts / n_group"
                f" = {self.topk_group * per_group}]"
            )
        if self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if not 0 <= self.first_k_dense_replace <= num_layers:
            raise ValueError(f"first_k_dense_replace ({self.first_k_dense_replace}) must be in [0, num_hidden_layers={num_layers}]")
        if self.score_function != "sigmoid":
            raise ValueError(f"score_function {self.score_function!r} is not supported; allowed: sigmoid")


def moe_config_from_hf(cls, hf: dict[str, Any], source: str, decoder_fields):
    """Build `cls` (ModelConfig) from a llada2_moe / bailing_moe_v2 config.json dict; `decoder_fields(hf)` reads
    the fields shared with the dense families (config.decoder_fields_from_hf)."""
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_experts", "num_experts_per_tok", "moe_intermediate_size"]
    missing = [k for k in required if hf.get(k) is None]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
    if hf.get("norm_head"):
        # Ling 1.x normalised the head rows; 2.0 / LLaDA2 configs set false. Refuse rather than silently differ.
        raise ValueError(f"{source}: norm_head=true is not supported (LLaDA2 / Ling 2.0 checkpoints use false)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported; allowed: silu")
    common = decoder_fields(hf)
    head_dim = common["head_dim"]
    factor = float(hf.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * factor)  # the modeling code's int(head_dim * partial_rotary_factor)
    if not 0 < rotary_dim <= head_dim or rotary_dim % 2:
        raise ValueError(f"{source}: partial_rotary_factor {factor} gives rotary dim {rotary_dim}; need an even "
                         f"number in (0, head_dim={head_dim}]")
    if hf.get("rotary_dim") is not None and int(hf["rotary_dim"]) != rotary_dim:
        raise ValueError(f"{source}: rotary_dim ({hf['rotary_dim']}) disagrees with head_dim * partial_rotary_factor "
                         f"({head_dim} * {factor} = {rotary_dim})")
    moe = MoEConfig(
        num_experts=int(hf["num_experts"]),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        num_shared_experts=int(hf.get("num_shared_experts") or 0),
        n_group=int(hf.get("n_group") or 1),
        topk_group=int(hf.get("topk_group") or 1),
        first_k_dense_replace=int(hf.get("first_k_dense_replace") or 0),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        score_function=str(hf.get("score_function") or "sigmoid"),
        expert_bias=bool(hf.get("moe_router_enable_expert_bias", True)),
    )
    try:
        return cls(
            family=hf["model_type"],
            **common,
            qkv_bias=bool(hf.get("use_qkv_bias", False)),
            o_bias=bool(hf.get("use_bias", False)),
            qk_norm=bool(hf.get("use_qk_norm", True)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rotary_dim=rotary_dim,
            moe=moe,
            hf_extra={k: copy.deepcopy(v) for k, v in hf.items() if k not in MOE_OWNED_KEYS},
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def moe_config_to_hf(cfg) -> dict[str, Any]:
    """config.json dict for a MoE-family ModelConfig (spelling of the official configs)."""
    from .config import decoder_fields_to_hf  # config.py imports this module

    m: MoEConfig = cfg.moe
    out: dict[str, Any] = copy.deepcopy(cfg.hf_extra)
    out.setdefault("architectures", [MOE_ARCHITECTURES[cfg.family]])
    out.update(decoder_fields_to_hf(cfg))
    out.update(
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_act="silu",
        tie_word_embeddings=cfg.tie_word_embeddings,
        use_qkv_bias=cfg.qkv_bias,
        use_bias=cfg.o_bias,
        use_qk_norm=cfg.qk_norm,
        partial_rotary_factor=cfg.rotary_dim / cfg.head_dim,
        num_experts=m.num_experts,
        num_experts_per_tok=m.num_experts_per_tok,
        moe_intermediate_size=m.moe_intermediate_size,
        num_shared_experts=m.num_shared_experts,
        n_group=m.n_group,
        topk_group=m.topk_group,
        first_k_dense_replace=m.first_k_dense_replace,
        routed_scaling_factor=m.routed_scaling_factor,
        norm_topk_prob=m.norm_topk_prob,
        score_function=m.score_function,
        moe_router_enable_expert_bias=m.expert_bias,
    )
    if cfg.diffusion is not None:
        out["blockdiff"] = asdict(cfg.diffusion)
    return out


def moe_num_parameters(cfg, *, active: bool = False, embeddings: bool = True) -> int:
    """Parameters of a MoE-family model (router bias buffers excluded). `active`: per token, counting only the
    k routed experts it uses; `embeddings=False` leaves out the embedding and head (Ling's "non-embedding")."""
    m: MoEConfig = cfg.moe
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * hd * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * hd * cfg.qkv_bias + d * cfg.o_bias
    attn += 2 * hd * cfg.qk_norm
    dense = 3 * d * cfg.intermediate_size
    experts = m.num_experts_per_tok if active else m.num_experts
    moe = experts * 3 * d * m.moe_intermediate_size + 3 * d * m.shared_intermediate_size + m.num_experts * d
    n_dense = m.first_k_dense_replace
    layers = cfg.num_layers * (attn + 2 * d) + n_dense * dense + (cfg.num_layers - n_dense) * moe
    emb = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    return layers + d + (emb if embeddings else 0)


# Ling-only config keys: multi-token prediction (LLaDA2 has no MTP layers; the loader drops their tensors).
_LING_ONLY_KEYS = ("num_nextn_predict_layers", "mtp_loss_scaling_factor")


def as_llada2_moe(cfg) -> None:
    """Relabel a bailing_moe_v2 (Ling 2.0) config as llada2_moe, in place, for block-diffusion conversion: the
    weights are the same architecture (docs/design.md 5: LLaDA2 = BailingMoeV2 minus causality and MTP).

    `architectures` becomes ["LLaDA2MoeModelLM"] and `auto_map` points at LLaDA2's remote-code file and class
    names (configuration_llada2_moe.LLaDA2MoeConfig, modeling_llada2_moe.LLaDA2MoeModel / LLaDA2MoeModelLM):
    we cannot ship inclusionAI's code, so HF `trust_remote_code` loading of the converted folder needs those two
    .py files copied from an official LLaDA2 folder; our own loader needs nothing. A Ling auto_map entry we do
    not know is dropped rather than left pointing at Bailing code that would build a causal model."""
    if cfg.family == "llada2_moe":
        return
    if cfg.family != "bailing_moe_v2":
        raise ValueError(f"as_llada2_moe: expected a bailing_moe_v2 config, got {cfg.family!r}")
    cfg.family = "llada2_moe"
    cfg.hf_extra["architectures"] = [MOE_ARCHITECTURES["llada2_moe"]]
    if "auto_map" in cfg.hf_extra:
        names = {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                 "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                 "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"}
        cfg.hf_extra["auto_map"] = {k: v for k, v in names.items() if k in cfg.hf_extra["auto_map"]}
    for key in _LING_ONLY_KEYS:
        cfg.hf_extra.pop(key, None)
