"""The LLaDA2-MoE / Ling 2.0 decoder on tiny random configs (hidden 64, 3 layers with layer 0 dense, 8 experts in
2 groups, top-2, partial rotary 0.5): the router equals a brute-force per-token reference (expert_bias steers
selection, never the weights); the grouped MoE layer equals a per-token loop; the whole forward equals a slow
hand-written reference that reads the official HF tensors by name; cached block decoding equals uncached;
training steps move the weights and leave expert_bias alone; bad configs fail naming field and file."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from moe_helpers import official_config, official_tensors, write_official_folder

from blockdiff.decode.cache import KVCache
from blockdiff.decode.engine import BlockDecodeConfig, block_generate
from blockdiff.decode.reference import reference_generate
from blockdiff.model.build import build_model
from blockdiff.model.config import ModelConfig
from blockdiff.model.hf_io import load_config, load_pretrained
from blockdiff.model.masks import dense_mask
from blockdiff.model.moe import MoE, route
from blockdiff.model.moe_config import MoEConfig
from blockdiff.objectives.diffusion import DiffusionLossConfig, diffusion_loss


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(folder, config dict, official tensors) for a tiny llada2_moe checkpoint."""
    hf = official_config()
    tensors = official_tensors(hf, seed=3)
    folder = write_official_folder(tmp_path_factory.mktemp("moe") / "llada2", hf, tensors)
    return folder, hf, tensors


# ------------------------------------------------------------------------------------------------ router
def ref_route_token(logits: list[float], bias: list[float], m: MoEConfig) -> dict[int, float]:
    """One token, straight from the description in docs/design.md 5: {expert: weight}."""
    scores = [1 / (1 + math.exp(-x)) for x in logits]
    biased = [s + b for s, b in zip(scores, bias)]
    size = m.num_experts // m.n_group
    groups = [list(range(g * size, (g + 1) * size)) for g in range(m.n_group)]
    group_score = [sum(sorted((biased[e] for e in grp), reverse=True)[:2]) for grp in groups]
    kept = sorted(range(m.n_group), key=lambda g: -group_score[g])[: m.topk_group]
    candidates = [e for g in kept for e in groups[g]]
    chosen = sorted(candidates, key=lambda e: -biased[e])[: m.num_experts_per_tok]
    total = sum(scores[e] for e in chosen)
    return {e: scores[e] / total * m.routed_scaling_factor for e in chosen}


@pytest.mark.parametrize("topk_group", [1, 2])
@pytest.mark.parametrize("n_group,E,k", [(2, 8, 2), (4, 16, 3)])
def test_router_matches_bruteforce(n_group, E, k, topk_group):
    m = MoEConfig(num_experts=E, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5)
    g = torch.Generator().manual_seed(E + k + topk_group)
    logits = torch.randn(64, E, generator=g) * 2
    bias = torch.randn(E, generator=g) * 0.3
    idx, w = route(logits, bias, m)
    for n in range(logits.shape[0]):
        ref = ref_route_token(logits[n].tolist(), bias.tolist(), m)
        got = dict(zip(idx[n].tolist(), w[n].tolist()))
        assert got.keys() == ref.keys(), n
        for e in ref:
            assert got[e] == pytest.approx(ref[e], rel=1e-5)


def test_expert_bias_steers_selection_not_weights():
    m = MoEConfig(num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.0)
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    bias = torch.zeros(8)
    bias[5] = 10.0  # expert 5 wins every token's selection (and its group, experts 4-7)
    idx, w = route(logits, bias, m)
    assert (idx == 5).any(-1).all()
    assert ((idx >= 4) & (idx < 8)).all()
    scores = torch.sigmoid(logits)
    picked = scores.gather(1, idx)
    torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True))  # unbiased scores, normalised
    idx0, _ = route(logits, None, m)
    assert not torch.equal(idx0, idx), "the bias changed no selection"


def test_norm_topk_prob_false_still_normalises(official, tmp_path):
    """The official gate normalises the k weights whatever norm_topk_prob says: a folder that sets it false gives
    the same logits as the same weights with true, and each token's weights sum to routed_scaling_factor."""
    folder, hf, tensors = official
    m = MoEConfig(num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                  norm_topk_prob=False)
    logits = torch.randn(32, 8, generator=torch.Generator().manual_seed(4)) * 2
    idx, w = route(logits, torch.zeros(8), m)
    torch.testing.assert_close(w.sum(-1), torch.full((32,), 2.5))
    off = write_official_folder(tmp_path / "off", official_config(norm_topk_prob=False), tensors)
    ids = torch.randint(2, hf["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = load_pretrained(folder).eval()(ids)
        got = load_pretrained(off).eval()(ids)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------- MoE layer
def swiglu(x, w1, w3, w2):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


@pytest.mark.parametrize("n_tokens", [1, 7, 40])
def test_moe_layer_matches_per_token_loop(n_tokens):
    m = MoEConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
                  routed_scaling_factor=2.5)
    torch.manual_seed(0)
    layer = MoE(64, m)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
        layer.router.expert_bias.normal_(0, 0.05)
    x = torch.randn(n_tokens, 64)
    with torch.no_grad():
        got = layer(x[None])[0]
        logits = x @ layer.router.weight.T
        ex = layer.experts
        for n in range(n_tokens):
            sel = ref_route_token(logits[n].tolist(), layer.router.expert_bias.tolist(), m)
            y = swiglu(x[n], layer.shared.w1.weight, layer.shared.w3.weight, layer.shared.w2.weight)
            for e, weight in sel.items():
                y = y + weight * swiglu(x[n], ex.w1[e], ex.w3[e], ex.w2[e])
            torch.testing.assert_close(got[n], y, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- full forward vs reference
def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_forward(hf: dict, t: dict[str, torch.Tensor], ids: list[int], mask: torch.Tensor | None) -> torch.Tensor:
    """Slow, literal forward of one sequence from the official tensors: logits [T, V]."""
    H, Hkv, hd = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    eps, rd = hf["rms_norm_eps"], int(hf["head_dim"] * hf["partial_rotary_factor"])
    m = MoEConfig(num_experts=hf["num_experts"], num_experts_per_tok=hf["num_experts_per_tok"], n_group=hf["n_group"],
                  topk_group=hf["topk_group"], routed_scaling_factor=hf["routed_scaling_factor"])
    T = len(ids)
    x = t["model.word_embeddings.weight"][ids]  # [T, d]
    inv = [hf["rope_theta"] ** (-2 * i / rd) for i in range(rd // 2)]

    def rope(v, pos):  # v [hd]: rotate pairs (i, i + rd/2) of the first rd channels by pos * inv[i]
        out = v.clone()
        for i, f in enumerate(inv):
            c, s = math.cos(pos * f), math.sin(pos * f)
            a, b = v[i], v[i + rd // 2]
            out[i], out[i + rd // 2] = a * c - b * s, b * c + a * s
        return out

    for L in range(hf["num_hidden_layers"]):
        p = f"model.layers.{L}."
        h = rms(x, t[p + "input_layernorm.weight"], eps)
        qkv = (h @ t[p + "attention.query_key_value.weight"].T).view(T, H + 2 * Hkv, hd)
        q, k, v = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
        q, k = rms(q, t[p + "attention.query_layernorm.weight"], eps), rms(k, t[p + "attention.key_layernorm.weight"], eps)
        q = torch.stack([torch.stack([rope(q[i, j], i) for j in range(H)]) for i in range(T)])
        k = torch.stack([torch.stack([rope(k[i, j], i) for j in range(Hkv)]) for i in range(T)])
        att = torch.zeros(T, H, hd)
        for j in range(H):
            kv = j // (H // Hkv)
            s = q[:, j] @ k[:, kv].T / math.sqrt(hd)  # [T, T]
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            att[:, j] = torch.softmax(s, -1) @ v[:, kv]
        x = x + att.reshape(T, H * hd) @ t[p + "attention.dense.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"], eps)
        if L < hf["first_k_dense_replace"]:
            x = x + swiglu(h, t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"], t[p + "mlp.down_proj.weight"])
            continue
        logits = h @ t[p + "mlp.gate.weight"].T
        out = swiglu(h, *(t[p + f"mlp.shared_experts.{n}_proj.weight"] for n in ("gate", "up", "down")))
        for n in range(T):
            for e, weight in ref_route_token(logits[n].tolist(), t[p + "mlp.gate.expert_bias"].tolist(), m).items():
                out[n] += weight * swiglu(h[n], *(t[p + f"mlp.experts.{e}.{w}_proj.weight"] for w in ("gate", "up", "down")))
        x = x + out
    return rms(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T


@pytest.mark.parametrize("mode", ["full", "block_causal"])
def test_forward_matches_slow_reference(official, mode):
    folder, hf, tensors = official
    model = load_pretrained(folder).eval()
    T = 12
    ids = torch.randint(2, hf["vocab_size"], (T,), generator=torch.Generator().manual_seed(1)).tolist()
    mask = None if mode == "full" else dense_mask("block_causal", seq_len=T, block_size=4)
    with torch.no_grad():
        got = model(torch.tensor([ids]), positions=torch.arange(T)[None], mask=mask)[0]
        ref = ref_forward(hf, tensors, ids, None if mask is None else mask[0, 0])
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_logits_slice_equals_slicing_after(official):
    folder, hf, _ = official
    model = load_pretrained(folder).eval()
    ids = torch.randint(2, hf["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    mask = dense_mask("block_causal", seq_len=12, block_size=4)
    with torch.no_grad():
        full = model(ids, mask=mask)
        part = model(ids, mask=mask, logits_slice=slice(4, 12))
        emb = model(inputs_embeds=model.embed(ids), mask=mask)
    torch.testing.assert_close(part, full[:, 4:12], atol=1e-5, rtol=0)
    torch.testing.assert_close(emb, full)


# ------------------------------------------------------------------------------------------- decoding
def test_cached_block_forward_equals_block_causal_full(official):
    folder, hf, _ = official
    model = load_pretrained(folder).eval()
    B, n_blocks = 4, 3
    n = B * n_blocks
    canvas = torch.randint(2, hf["vocab_size"], (1, n), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(canvas, positions=torch.arange(n)[None], mask=dense_mask("block_causal", seq_len=n, block_size=B))
        cache = KVCache(model.cfg, 1, n)
        for b in range(n_blocks):
            lo, hi = b * B, (b + 1) * B
            out = model(canvas[:, lo:hi], positions=torch.arange(lo, hi)[None], mask=None, cache=cache)
            cache.commit(B)
            torch.testing.assert_close(out, full[:, lo:hi], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_prompt", [3, 8])
def test_block_generate_equals_no_cache_reference(official, n_prompt):
    folder, hf, _ = official
    model = load_pretrained(folder).eval()
    mask_id = model.cfg.diffusion.mask_token_id  # derived from the tokenizer's <|mask|> (no blockdiff key)
    assert model.cfg.diffusion.block_size == 32
    with torch.no_grad():
        model.norm.weight.mul_(20.0)  # a confident model: distinct confidences, no near-ties
    prompt = torch.randint(2, hf["vocab_size"], (n_prompt,), generator=torch.Generator().manual_seed(n_prompt)).tolist()
    cfg = BlockDecodeConfig(block_size=4, steps=4, threshold=1.0, max_new_tokens=9)
    gen = block_generate(model, prompt, cfg, mask_id=mask_id, eos_ids=[])
    ref = reference_generate(model, prompt, cfg, mask_id=mask_id, eos_ids=[], early_exit=True)
    assert gen.tokens == ref.tokens and gen.steps_per_block == ref.steps_per_block
    assert mask_id not in gen.tokens


# ------------------------------------------------------------------------------------------- training
def test_training_step_moves_weights_and_freezes_expert_bias(official):
    folder, hf, _ = official
    model = load_pretrained(folder).train()
    bias0 = {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")}
    assert bias0 and all(not isinstance(b, torch.nn.Parameter) for b in bias0.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mask_id = model.cfg.diffusion.mask_token_id
    x0 = torch.randint(2, hf["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": x0, "doc_ids": torch.zeros_like(x0)}
    loss, _ = diffusion_loss(model, batch, DiffusionLossConfig(mask_token_id=mask_id, block_size=4),
                             generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.layers[1].feed_forward.router.weight.grad.abs().sum() > 0
    assert model.layers[2].feed_forward.experts.w2.grad.abs().sum() > 0
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "layers.1.feed_forward.router.weight" in moved and "layers.2.feed_forward.experts.w1" in moved
    for n, b in model.named_buffers():
        if n in bias0:
            assert torch.equal(b, bias0[n]), n


# --------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("field,value,match", [
    ("n_group", 3, r"num_experts \(8\) must be divisible by n_group \(3\)"),
    ("topk_group", 3, r"topk_group \(3\) must be in \[1, n_group=2\]"),
    ("num_experts_per_tok", 5, r"num_experts_per_tok \(5\)"),
    ("first_k_dense_replace", 4, r"first_k_dense_replace \(4\)"),
    ("score_function", "softmax", r"score_function 'softmax'"),
    ("partial_rotary_factor", 0.1, r"partial_rotary_factor 0.1 gives rotary dim 1"),
    ("rotary_dim", 6, r"rotary_dim \(6\) disagrees"),
    ("norm_head", True, r"norm_head"),
])
def test_bad_config_names_field_and_file(tmp_path, field, value, match):
    import json

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(official_config(**{field: value})))
    with pytest.raises(ValueError, match=match) as e:
        load_config(folder)
    assert str(folder / "config.json") in str(e.value)


def test_missing_moe_field_is_named(tmp_path):
    import json

    hf = official_config()
    del hf["moe_intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="config.json: missing required field.*moe_intermediate_size"):
        load_config(tmp_path)


# Values the official gate ignores (docs/moe.md): they must still be written back as read.
IGNORED_BY_THE_GATE = {"norm_topk_prob": False, "moe_router_enable_expert_bias": False, "num_shared_experts": 0}


@pytest.mark.parametrize("overrides", [{}, IGNORED_BY_THE_GATE], ids=["official", "ignored-by-gate"])
@pytest.mark.parametrize("family", ["llada2_moe", "bailing_moe_v2"])
def test_config_round_trip(family, overrides):
    hf = official_config(family, **overrides)
    cfg = ModelConfig.from_hf(hf)
    out = cfg.to_hf()
    for k, v in hf.items():
        assert out[k] == v, k
    assert ModelConfig.from_hf(out) == cfg
    assert cfg.rotary_dim == 8 and cfg.moe.num_experts == 8 and cfg.moe.first_k_dense_replace == 1
    assert type(build_model(cfg)).__name__ == "MoETransformer"


# docs/design.md 5: LLaDA2.0-mini is 16B total / ~1.4B active; flash 100B / ~6B active.
# name -> (config.json fields that differ between the two, total range, active range)
OFFICIAL_SHAPES = {
    "mini": (dict(hidden_size=2048, intermediate_size=5120, num_hidden_layers=20, num_attention_heads=16,
                  moe_intermediate_size=512), (15.5e9, 16.5e9), (1.3e9, 1.5e9)),
    "flash": (dict(hidden_size=4096, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
                   moe_intermediate_size=1024), (95e9, 105e9), (5e9, 7.5e9)),
}
OFFICIAL_COMMON = dict(vocab_size=157184, num_key_value_heads=4, head_dim=128, num_experts=256, num_experts_per_tok=8,
                       n_group=8, topk_group=4)


@pytest.mark.parametrize("name", OFFICIAL_SHAPES)
def test_parameter_counts_of_official_shapes(name):
    fields, (total_lo, total_hi), (active_lo, active_hi) = OFFICIAL_SHAPES[name]
    cfg = ModelConfig.from_hf(official_config(**OFFICIAL_COMMON, **fields))
    assert total_lo < cfg.num_parameters() < total_hi
    assert active_lo < cfg.num_parameters(active=True) < active_hi


def test_parameter_count_equals_the_tensors_of_the_model():
    cfg = ModelConfig.from_hf(official_config())
    model = build_model(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def expert_inputs(*, N: int, d: int, I: int, E: int, k: int, std: float, seed: int = 0):
    """Random grouped-expert inputs: x [N, d], idx [N, k] (k distinct experts per token), weights [N, k] and the
    stacked (w1, w3, w2) of shapes [E, I, d], [E, I, d], [E, d, I]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
    weights = torch.rand(N, k, generator=g)
    w = [torch.randn(shape, generator=g) * std for shape in ((E, I, d), (E, I, d), (E, d, I))]
    return x, idx, weights, w


@pytest.mark.parametrize("impl", ["sorted", "grouped_mm"])
def test_grouped_expert_gradients_match_masked_loop(impl):
    from blockdiff.model.moe import grouped_expert_forward, grouped_mm_expert_forward

    if impl == "grouped_mm" and not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    fn = grouped_expert_forward if impl == "sorted" else grouped_mm_expert_forward

    E, d = 8, 16
    x, idx, weights, w = expert_inputs(N=24, d=d, I=8, E=E, k=2, std=0.2)
    idx[:, 0] = torch.where(idx[:, 1] == 3, 4, 3)  # one expert gets many tokens; some experts may get none
    for t in (x, weights, *w):
        t.requires_grad_()

    def loop(x, weights, w1, w3, w2):
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, swiglu(x[tok], w1[e], w3[e], w2[e]) * weights[tok, slot, None])
        return out

    grads = []
    for f in (lambda *a: fn(a[0], idx, *a[1:]), loop):
        out = f(x, weights, *w)
        (out * torch.linspace(-1, 1, d)).sum().backward()
        grads.append([t.grad.clone() for t in (x, weights, *w)])
        for t in (x, weights, *w):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_router_logits_stay_fp32_under_autocast():
    m = MoEConfig(num_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    layer = MoE(64, m)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(16, 64)
    ref_idx, ref_w = layer.router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, w = layer.router(x)
    assert w.dtype == torch.float32
    assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_and_cached_decoding_match_cpu(official):
    folder, hf, _ = official
    cpu = load_pretrained(folder).eval()
    gpu = load_pretrained(folder, device="cuda").eval()
    n, B = 12, 4
    canvas = torch.randint(2, hf["vocab_size"], (1, n), generator=torch.Generator().manual_seed(7))
    mask = dense_mask("block_causal", seq_len=n, block_size=B)
    with torch.no_grad():
        ref = cpu(canvas, mask=mask)
        full = gpu(canvas.cuda(), mask=mask.cuda())
        torch.testing.assert_close(full.cpu(), ref, atol=1e-4, rtol=1e-4)
        cache = KVCache(gpu.cfg, 1, n, device="cuda")
        for b in range(n // B):
            lo, hi = b * B, (b + 1) * B
            out = gpu(canvas[:, lo:hi].cuda(), positions=torch.arange(lo, hi, device="cuda")[None], cache=cache)
            cache.commit(B)
            torch.testing.assert_close(out.cpu(), ref[:, lo:hi], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_mm_path_on_cuda_bf16_matches_sorted_loop():
    """On CUDA bf16 (sm90+) the experts run through torch's grouped GEMM; it must agree with the sorted loop."""
    from blockdiff.model.moe import grouped_expert_forward, grouped_mm_expert_forward, use_grouped_mm

    x, idx, weights, w = expert_inputs(N=256, d=64, I=32, E=16, k=4, std=0.1)
    x, idx, weights, w = x.cuda().bfloat16(), idx.cuda(), weights.cuda(), [t.cuda().bfloat16() for t in w]
    if not use_grouped_mm(x):
        pytest.skip("grouped_mm path needs CUDA bf16 on sm90+")
    a = grouped_mm_expert_forward(x, idx, weights, *w).float()
    b = grouped_expert_forward(x, idx, weights, *w).float()
    torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
