"""Published model shapes (the decoder fields of their config.json, read by the project's own reader), for the
benchmarks that need real-size models without their weights: random init is enough to measure memory and time.
Each entry says what was cut from the published shape, and why, when the bench runs a smaller copy."""

from __future__ import annotations

# Qwen/Qwen2.5-0.5B (494M parameters; tied embeddings, q/k/v biases, GQA 14/2).
QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
              "tie_word_embeddings": True}
# Qwen/Qwen2.5-1.5B (1.54B; the docs/distributed.md conversion example).
QWEN25_15B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536,
              "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
              "tie_word_embeddings": True}
# Qwen/Qwen3-0.6B (596M; q/k norms, head_dim 128 with hidden 1024, GQA 16/8).
QWEN3_06B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
             "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
             "tie_word_embeddings": True}
# meta-llama/Llama-3.2-1B (1.24B; llama3 RoPE scaling, 131,072 positions, GQA 32/8).
LLAMA32_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192},
              "tie_word_embeddings": True}
# inclusionAI/LLaDA2.0-flash (100B total, 6.1B active; 32 layers at width 4096).
LLADA2_FLASH = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184,
                "hidden_size": 4096, "intermediate_size": 9216, "moe_intermediate_size": 1024, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "partial_rotary_factor": 0.5,
                "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1, "n_group": 8, "topk_group": 4,
                "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "rope_theta": 600000,
                "max_position_embeddings": 32768}
# inclusionAI/LLaDA2.0-mini (16B total, 1.4B active; 256 experts, 8 routed + 1 shared, first layer dense).
LLADA2_MINI = {"architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184,
               "hidden_size": 2048, "intermediate_size": 5120, "moe_intermediate_size": 512, "num_hidden_layers": 20,
               "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "partial_rotary_factor": 0.5,
               "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1, "n_group": 8, "topk_group": 4,
               "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "rope_theta": 600000,
               "max_position_embeddings": 32768}

# What bench/plan_shapes.py runs ("published": the uncut config, where the entry is cut): the two Qwen shapes whole; Llama-3.2-1B with 4 of its 16 layers (every layer is
# alike: fewer layers keep the per-layer and head terms, the part the plan counts); LLaDA2.0-mini with its dense
# first layer and 2 MoE layers of 16 experts (each expert keeps its 2048 x 512 shape and 8 are routed per token as
# in the real model, so the routed activations are the real ones; 256 experts x 20 layers is 16B parameters,
# 256 GB of fp32 training state).
SHAPES = {
    "qwen2.5-0.5b": {"config": QWEN25_05B, "cut": "none"},
    "qwen3-0.6b": {"config": QWEN3_06B, "cut": "none"},
    "llama-3.2-1b": {"config": LLAMA32_1B | {"num_hidden_layers": 4}, "cut": "4 of 16 layers", "published": LLAMA32_1B},
    "llada2.0-mini": {"config": LLADA2_MINI | {"num_hidden_layers": 3, "num_experts": 16},
                      "cut": "3 of 20 layers, 16 of 256 experts (8 routed, as published)", "published": LLADA2_MINI},
}
# The same Qwen2 family at the smallest size that still has GQA, RoPE, biases and tied embeddings: the benches'
# smoke runs (tests/test_bench_realsize.py), never a measurement.
MINIATURE = {"qwen2-miniature": {"config": QWEN25_05B | {"vocab_size": 1100, "hidden_size": 64, "intermediate_size": 128,
                                                        "num_hidden_layers": 2, "num_attention_heads": 4,
                                                        "num_key_value_heads": 2},
                                 "cut": "miniature (smoke runs only)"}}

