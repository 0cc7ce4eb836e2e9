"""The decoder on tiny random models, on CPU: parity with HF transformers on the same weights (Llama with each
RoPE variant, Qwen2, Qwen3), cached decoding equals the uncached forward, block size 1 reproduces the causal
model, the flex path equals the dense one, resize_vocab keeps old logits, and ModelConfig rejects bad configs."""

import warnings

import pytest
import torch

from blockdiff.model.config import ModelConfig
from blockdiff.model.hf_io import load_pretrained
from blockdiff.model.masks import dense_mask, flex_block_mask
from blockdiff.model.transformer import Transformer, resize_vocab

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("no_grad")

B, T, V = 2, 17, 97
# RoPE is relative, so a uniform shift barely tests positions; a row that restarts at 0 mid-sequence (packed
# documents) does, and differs from row 0 (catches a [T] vs [b, T] broadcasting slip).
PACKED = torch.stack([torch.arange(T) + 5, torch.cat([torch.arange(9), torch.arange(T - 9)])])


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()[None, None]  # [1, 1, n, n]


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Noise on every parameter, so norms are not all ones and biases not all zeros (a dropped norm weight,
    bias or transposed projection then changes the logits)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * scale)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw) -> Transformer:
    model = Transformer(tiny_cfg(**kw)).eval()
    model.init_weights(seed=seed)
    perturb(model, seed=seed + 1)
    return model


def ids_for(vocab: int = V, seed: int = 0, n: int = T) -> torch.Tensor:
    return torch.randint(0, vocab, (B, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ parity with HF transformers
_HF_BASE = dict(
    vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
)
HF_CASES = {
    "llama-default-gqa": ("llama", {}),
    # theta 100, head_dim 8 -> wavelengths 6.3, 20, 63, 199 against old_ctx 32, low 1, high 4 (edges 8 and 32):
    # one kept, one interpolated, two divided by factor -> every branch of the Llama 3.1 rule.
    "llama-llama3-rope": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=100.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama-linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0))),
    "llama-bias-mha": ("llama", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "qwen2-qkv-bias": ("qwen2", dict(rope_parameters=dict(rope_type="default", rope_theta=1000.0))),
    "qwen2-mha": ("qwen2", dict(num_key_value_heads=4)),
    # head_dim 16 != 32 / 4, q/k norms, tied head
    "qwen3-qknorm-tied": ("qwen3", dict(head_dim=16, tie_word_embeddings=True)),
}


def hf_model(family: str, **kw):
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    cfg_cls, model_cls = classes[family]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**_HF_BASE, **kw}, attn_implementation="eager")).eval()
    perturb(model)
    return model


@pytest.mark.parametrize("case", list(HF_CASES))
def test_matches_hf_transformers(case, tmp_path):
    family, kw = HF_CASES[case]
    ref = hf_model(family, **kw)
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()

    cfg = ours.cfg
    assert cfg.family == family
    assert (cfg.num_heads, cfg.num_kv_heads) == (ref.config.num_attention_heads, ref.config.num_key_value_heads)
    assert cfg.tie_word_embeddings == (ours.output.weight is ours.tok_embeddings.weight)
    if "rope_parameters" in kw and kw["rope_parameters"]["rope_type"] != "default":
        assert cfg.rope_type == kw["rope_parameters"]["rope_type"]

    ids = ids_for()
    for positions in (torch.arange(T).expand(B, T), torch.arange(T) + 5, PACKED):
        positions = positions.expand(B, T)
        want = ref(input_ids=ids, position_ids=positions).logits
        got = ours(ids, positions, causal(T))
        assert want.abs().max() > 0.3, "logits too small for the tolerance to mean anything"
        err = (got - want).abs().max().item()
        assert err <= 1e-4, f"{case}: max |logit diff| {err:.2e} at positions starting {positions[:, 0].tolist()}"


def test_default_positions_are_arange():
    model = tiny_model()
    ids = ids_for()
    torch.testing.assert_close(model(ids, None, causal(T)), model(ids, torch.arange(T).expand(B, T), causal(T)), rtol=0, atol=0)
    torch.testing.assert_close(model(ids, None, causal(T)), model(ids, torch.arange(T), causal(T)), rtol=0, atol=0)


# ------------------------------------------------------------------------------ KV cache protocol
class DenseKVCache:
    """Reference cache for the duck-typed protocol in transformer.py: per-layer preallocated k/v buffers
    [b, hkv, S, d]; the caller advances `length` after each forward."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape) for _ in range(cfg.num_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("step", [1, 7], ids=["token-by-token", "chunk"])
def test_cached_decoding_equals_full_forward(kv_heads, step):
    model = tiny_model(num_kv_heads=kv_heads, qk_norm=True, qkv_bias=True)
    ids = ids_for()
    full = model(ids, None, causal(T))  # [B, T, V]

    prefill = 10
    cache = DenseKVCache(model.cfg, B, max_len=T)
    got = [model(ids[:, :prefill], None, causal(prefill), cache=cache)]
    cache.length += prefill
    while cache.length < T:
        n = min(step, T - cache.length)
        # one token sees the whole cache: no mask; a chunk sees the cache and its own causal prefix
        mask = None if n == 1 else torch.ones(n, cache.length + n, dtype=torch.bool).tril(cache.length)[None, None]
        positions = (cache.length + torch.arange(n)).expand(B, n)
        got.append(model(ids[:, cache.length:cache.length + n], positions, mask, cache=cache))
        cache.length += n
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ inputs and masks
def test_inputs_embeds_equals_input_ids():
    model = tiny_model()
    ids = ids_for()
    positions = PACKED
    want = model(ids, positions, causal(T))
    got = model(None, positions, causal(T), inputs_embeds=model.embed(ids))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, positions, causal(T), inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model(None, positions, causal(T))


def test_block_size_one_reproduces_causal_model():
    model = tiny_model()
    ids = ids_for()
    block1 = dense_mask("block_causal", seq_len=T, block_size=1)
    torch.testing.assert_close(model(ids, None, block1), model(ids, None, causal(T)), rtol=0, atol=0)
    # the mask reaches attention: block size 4 changes the logits
    block4 = dense_mask("block_causal", seq_len=16, block_size=4)
    assert not torch.allclose(model(ids[:, :16], None, block4), model(ids[:, :16], None, causal(16)), atol=1e-3)


def test_non_bool_mask_rejected():
    model = tiny_model()
    with pytest.raises(TypeError, match="bool"):
        model(ids_for(), None, causal(T).float())


def test_bool_mask_becomes_one_additive_mask_shared_by_every_layer(monkeypatch):
    """SDPA turns a bool mask into an additive float one in every layer, and autograd then keeps one b x T x T copy
    per layer for backward (16 MiB a layer at T = 2048). The model converts it once: every layer's attention keeps
    the same storage, and logits and gradients are bit-identical to letting SDPA convert it (additive_mask made a
    no-op: the old path)."""
    from blockdiff.model import attention

    n = 16
    mask = dense_mask("block_causal", seq_len=n, block_size=4)
    ids = ids_for(n=n)

    def run():
        model = tiny_model(num_layers=3).train()
        masks = {}

        def pack(t):
            if t.dim() == 4 and t.shape[-2:] == (n, n):
                masks[t.untyped_storage().data_ptr()] = t.dtype
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(ids, None, mask)
            logits.square().mean().backward()
        return logits.detach(), [p.grad for p in model.parameters()], masks

    logits, grads, masks = run()
    assert list(masks.values()) == [torch.float32]  # one float mask kept, not one per layer
    monkeypatch.setattr("blockdiff.model.transformer.additive_mask", lambda m, dtype: m)
    old_logits, old_grads, old_masks = run()
    assert len(old_masks) == 3  # the old path: SDPA's own conversion, kept by each of the 3 layers
    assert torch.equal(logits, old_logits) and all(torch.equal(a, b) for a, b in zip(grads, old_grads))
    assert attention.additive_mask(mask, torch.float32).dtype == torch.float32


def test_flex_block_mask_equals_dense_through_model():
    model = tiny_model()
    ids = ids_for(n=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it materialises the scores
        got = model(ids, None, flex_block_mask("block_causal", seq_len=16, block_size=4))
    want = model(ids, None, dense_mask("block_causal", seq_len=16, block_size=4))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ resize_vocab
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resize_vocab_grows_with_mean_rows_and_keeps_old_logits(tied):
    model = tiny_model(tie_word_embeddings=tied)
    ids = ids_for()
    before = model(ids, None, causal(T))
    emb_old = model.tok_embeddings.weight.clone()
    head_old = model.output.weight.clone()

    n = 3
    resize_vocab(model, V + n)
    emb, head = model.tok_embeddings.weight, model.output.weight
    assert model.cfg.vocab_size == V + n
    assert emb.shape == head.shape == (V + n, 32)
    assert (head is emb) == tied
    torch.testing.assert_close(emb[:V], emb_old, rtol=0, atol=0)
    torch.testing.assert_close(head[:V], head_old, rtol=0, atol=0)
    torch.testing.assert_close(emb[V:], emb_old.mean(0, keepdim=True).expand(n, -1), rtol=0, atol=0)
    torch.testing.assert_close(head[V:], head_old.mean(0, keepdim=True).expand(n, -1), rtol=0, atol=0)
    assert emb.requires_grad and head.requires_grad
    assert model.output.weight in set(model.parameters())

    after = model(ids, None, causal(T))
    assert after.shape == (B, T, V + n)
    torch.testing.assert_close(after[..., :V], before, rtol=0, atol=1e-6)
    # the new token is usable as input too
    model(torch.full((1, 4), V + n - 1), None, causal(4))

    resize_vocab(model, V + n)  # same size: no-op
    assert model.tok_embeddings.weight is emb
    with pytest.raises(ValueError, match="only grows"):
        resize_vocab(model, V)


# ------------------------------------------------------------------------------ ModelConfig
def _hf_cfg(**kw):
    base = dict(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def test_config_rejects_unsupported_model_type():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf(_hf_cfg(model_type="mistral"), source="/ckpt/config.json")
    msg = str(e.value)
    assert "/ckpt/config.json" in msg and "mistral" in msg
    assert all(f in msg for f in ("llama", "qwen2", "qwen3"))
    with pytest.raises(ValueError, match="llama, qwen2, qwen3"):
        ModelConfig(family="gpt2")


def test_config_names_missing_fields():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf(_hf_cfg(hidden_size=None, num_hidden_layers=None), source="x/config.json")
    msg = str(e.value)
    assert "x/config.json" in msg and "hidden_size" in msg and "num_hidden_layers" in msg
    assert "vocab_size" not in msg


@pytest.mark.parametrize("spelling", ["rope_parameters", "rope_scaling"])
def test_config_rejects_unsupported_rope_type(spelling):
    rope = {"rope_type": "yarn", "factor": 4.0}
    if spelling == "rope_parameters":
        rope["rope_theta"] = 1e4
    with pytest.raises(ValueError, match="yarn.*default, linear, llama3"):
        ModelConfig.from_hf(_hf_cfg(**{spelling: rope}))


def test_config_rejects_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError, match=r"num_attention_heads \(6\).*num_key_value_heads \(4\)"):
        ModelConfig.from_hf(_hf_cfg(num_attention_heads=6, num_key_value_heads=4, hidden_size=48))
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(num_heads=6, num_kv_heads=4)


def test_config_derived_fields():
    cfg = ModelConfig.from_hf(_hf_cfg(num_key_value_heads=None, rope_theta=5e5))
    assert cfg.num_kv_heads == 4  # absent -> MHA
    assert cfg.head_dim == 8  # hidden / heads when absent
    assert cfg.rope_theta == 5e5 and cfg.rope_type == "default"
    q2 = ModelConfig.from_hf(_hf_cfg(model_type="qwen2", attention_bias=False))
    assert q2.qkv_bias and not q2.o_bias and not q2.qk_norm
    q3 = ModelConfig.from_hf(_hf_cfg(model_type="qwen3", head_dim=16))
    assert q3.qk_norm and q3.head_dim == 16 and not q3.qkv_bias


@pytest.mark.parametrize("case", list(HF_CASES))
def test_config_to_hf_from_hf_round_trip(case):
    family, kw = HF_CASES[case]
    hf = transformers.AutoConfig.for_model(family, **{**_HF_BASE, **kw}).to_dict()
    cfg = ModelConfig.from_hf(hf)
    again = ModelConfig.from_hf(cfg.to_hf())
    for name in cfg.__dataclass_fields__:
        if name != "hf_extra":
            assert getattr(again, name) == getattr(cfg, name), name


@pytest.mark.parametrize("sl", [slice(0, 9), slice(5, 17), slice(16, 17)])
def test_logits_slice_equals_sliced_full_forward(sl):
    """The last layer computes only the requested positions; results equal the full forward, sliced."""
    from blockdiff.model.config import ModelConfig
    from blockdiff.model.masks import dense_mask
    from blockdiff.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
    model = Transformer(cfg)
    model.init_weights(seed=1)
    ids = torch.randint(0, 64, (2, 17))
    pos = torch.arange(17).expand(2, 17)
    for mask in (dense_mask("block_causal", seq_len=17, block_size=1), None):
        full = model(ids, positions=pos, mask=mask)
        part = model(ids, positions=pos, mask=mask, logits_slice=sl)
        assert part.shape == full[:, sl].shape
        torch.testing.assert_close(part, full[:, sl], atol=1e-5, rtol=1e-5)


def test_bd_train_perturbation_through_the_model():
    """Through the full model on the [x_t ; x0] layout: changing a token a query must not see (a later noisy
    block, a clean token of its own or a later block, another document) leaves that query's logits exactly
    unchanged; changing one it must see changes them."""
    from blockdiff.model.config import ModelConfig
    from blockdiff.model.masks import dense_mask
    from blockdiff.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    L, B = 16, 4
    doc = torch.tensor([[0] * 12 + [1] * 4])
    pos = torch.tensor([list(range(12)) + list(range(4))])
    mask = dense_mask("bd_train", seq_len=L, block_size=B, doc_ids=doc, positions=pos)
    ids = torch.randint(0, 49, (1, 2 * L))
    full_pos = torch.cat([pos, pos], 1)
    base = model(ids, positions=full_pos, mask=mask)
    q = 5  # noisy query in block 1 of document 0
    cases = {  # key index -> must the query see it?
        4: True,  # noisy, same block
        L + 2: True,  # clean, earlier block
        L + 5: False,  # clean, same block
        L + 9: False,  # clean, later block
        9: False,  # noisy, later block
        13: False,  # noisy, other document
        L + 13: False,  # clean, other document
    }
    for k, visible in cases.items():
        changed = ids.clone()
        changed[0, k] = (changed[0, k] + 1) % 49
        out = model(changed, positions=full_pos, mask=mask)
        differs = not torch.equal(out[0, q], base[0, q])
        assert differs == visible, f"key {k}: visible={visible} but differs={differs}"
