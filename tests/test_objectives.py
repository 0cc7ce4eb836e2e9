"""Objectives on tiny random models, on CPU: the loss equals a hand computation for both weightings, the
vectorised [x_t ; x0] layout equals one forward per block (B = 1: the causal model on x0[:i] + [MASK]; B = L:
MDLM on x_t alone), the noising respects loss_mask / complementary / per-block t, embedding noise lands only on
masked noisy positions, every parameter moves after a step, gradient accumulation 1x8 == 8x1, elbo_nll is
deterministic, ar_loss stays inside documents, and bad configs name the field."""

import pytest
import torch
import torch.nn.functional as F

import blockdiff.objectives.diffusion as diffusion
from blockdiff.model.config import ModelConfig
from blockdiff.model.transformer import Transformer
from blockdiff.objectives.diffusion import DiffusionLossConfig, ar_loss, diffusion_loss, elbo_nll, noised_inputs
from blockdiff.objectives.noise import annealed_std, embedding_noise_std, mask_positions, sample_t

V = 41
MASK = V - 1  # [MASK] is the last id; x0 never contains it
L = 16
# row 0: three documents not aligned to any block size; row 1: two documents
DOC_IDS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])


def positions_of(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position inside the document, restarting at 0 (what packing provides)."""
    out = torch.zeros_like(doc_ids, dtype=torch.long)
    for r in range(doc_ids.shape[0]):
        for j in range(1, doc_ids.shape[1]):
            out[r, j] = 0 if doc_ids[r, j] != doc_ids[r, j - 1] else out[r, j - 1] + 1
    return out


def segments(doc_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each document along one row."""
    cuts = [0] + [j for j in range(1, len(doc_row)) if doc_row[j] != doc_row[j - 1]] + [len(doc_row)]
    return list(zip(cuts[:-1], cuts[1:]))


def tiny_model(seed: int = 0, tied: bool = False) -> Transformer:
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, tie_word_embeddings=tied, max_position_embeddings=64)
    model = Transformer(cfg)
    model.init_weights(std=0.2, seed=seed)  # large enough that attention is far from uniform
    with torch.no_grad():  # norm weights off 1, so a dropped/misplaced norm would show
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model


def tokens(b: int = 2, n: int = L, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK, (b, n), generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Recorder:
    """Wraps a model: records the token ids given to `.embed` and each forward's kwargs and logits (the head applied
    to the hidden states when the chunked loss asks for those)."""

    def __init__(self, model):
        self.model = model
        self.output = model.output
        self.ids: list[torch.Tensor] = []
        self.calls: list[dict] = []

    def embed(self, ids):
        self.ids.append(ids.clone())
        return self.model.embed(ids)

    def __call__(self, *args, **kw):
        out = self.model(*args, **kw)
        logits = self.model.output(out) if kw.get("return_hidden") else out
        self.calls.append({**kw, "logits": logits.detach().clone()})
        return out


def block_causal(n: int, B: int) -> torch.Tensor:
    blk = torch.arange(n) // B
    return (blk[None, :] <= blk[:, None])[None, None]  # [1, 1, n, n]


@torch.no_grad()
def per_block_reference(model, x0, x_t, B, doc_ids=None) -> torch.Tensor:
    """Logits of every noisy position from one forward per (row, document, block): [x0 blocks < k ; x_t block k]
    with the block-causal mask, positions 0.. inside the document, read at block k. [b, L, V]"""
    b, n = x0.shape
    out = torch.full((b, n, V), float("nan"))
    for r in range(b):
        segs = segments(doc_ids[r]) if doc_ids is not None else [(0, n)]
        for s, e in segs:
            for ks in range(s, e, B):
                ke = min(ks + B, e)
                seq = torch.cat([x0[r, s:ks], x_t[r, ks:ke]])[None]
                m = len(seq[0])
                logits = model(seq, positions=torch.arange(m)[None], mask=block_causal(m, B))
                out[r, ks:ke] = logits[0, ks - s:]
    return out


def ce_of(logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[x0], [b, L]."""
    return -torch.log_softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]


# ------------------------------------------------------------------------------------ hand-computed loss
class FakeModel:
    """Returns fixed logits for the noisy half, records what it was given. Its head is the identity, so the
    chunked loss (which asks for hidden states and applies the head itself) reads the same logits."""

    def __init__(self, logits):
        self.logits = logits
        self.ids = None
        self.kw = None
        self.output = torch.nn.Identity()

    def embed(self, ids):
        self.ids = ids.clone()
        return torch.zeros(*ids.shape, 4)

    def __call__(self, input_ids=None, positions=None, mask=None, *, inputs_embeds=None, logits_slice=None,
                 return_hidden=False):
        self.kw = dict(positions=positions, mask=mask, inputs_embeds=inputs_embeds, logits_slice=logits_slice)
        return self.logits


FIXED_LOGITS = 3 * torch.randn(2, L, V, generator=gen(5))
X0 = tokens(seed=1)
LOSS_MASK = torch.rand(2, L, generator=gen(6)) < 0.6  # ~60% eligible


@pytest.mark.parametrize("weighting", ["elbo", "token_mean"])
def test_loss_all_eligible_masked_by_hand(weighting):
    # t_lo = t_hi = 1: exactly the eligible tokens are masked, and 1/t = 1
    fake = FakeModel(FIXED_LOGITS)
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, weighting=weighting, t_lo=1.0, t_hi=1.0)
    loss, metrics = diffusion_loss(fake, {"input_ids": X0, "loss_mask": LOSS_MASK}, cfg, generator=gen(0))
    x_t = fake.ids[:, :L]
    assert torch.equal(x_t == MASK, LOSS_MASK)
    assert torch.equal(fake.ids[:, L:], X0)  # [x_t ; x0]
    ce = ce_of(FIXED_LOGITS, X0)
    expected = (ce * LOSS_MASK).sum() / LOSS_MASK.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    assert metrics["mask_frac"] == pytest.approx(1.0)


@pytest.mark.parametrize("block_size", [4, L])
def test_loss_known_t_by_hand_both_weightings(block_size):
    # t fixed at 0.4; the mask is read from what the model was fed
    losses = {}
    for weighting in ("elbo", "token_mean"):
        fake = FakeModel(FIXED_LOGITS)
        cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=block_size, weighting=weighting, t_lo=0.4, t_hi=0.4)
        loss, _ = diffusion_loss(fake, {"input_ids": X0, "loss_mask": LOSS_MASK}, cfg, generator=gen(3))
        m = (fake.ids[:, :L] == MASK).double()
        assert 0 < m.sum() < LOSS_MASK.sum()
        assert not (m.bool() & ~LOSS_MASK).any()
        ce = ce_of(FIXED_LOGITS, X0)
        expected = {"elbo": (m * ce / 0.4).sum() / LOSS_MASK.sum(), "token_mean": (m * ce).sum() / m.sum()}[weighting]
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
        losses[weighting] = float(loss)
        # layout: doubled input below L, x_t alone at B = L; only the noisy half's logits are asked for
        assert fake.ids.shape[1] == (L if block_size >= L else 2 * L)
        assert fake.kw["logits_slice"] == slice(0, L)
        if block_size < L:
            assert torch.equal(fake.kw["positions"][:, :L], fake.kw["positions"][:, L:])  # both halves 0..L-1
    assert losses["elbo"] != pytest.approx(losses["token_mean"])


def test_loss_per_sample_t_matches_noised_inputs():
    # t ~ U[0.2, 0.9] per row: the loss uses the same draws as noised_inputs with the same seed
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.2, t_hi=0.9)
    batch = {"input_ids": X0}
    _, x_t, masked, t, eligible, _, _, _ = noised_inputs(batch, cfg, gen(9))
    assert t[0, 0] != t[1, 0] and 0.2 <= float(t.min()) and float(t.max()) <= 0.9
    fake = FakeModel(FIXED_LOGITS)
    loss, _ = diffusion_loss(fake, batch, cfg, generator=gen(9))
    assert torch.equal(fake.ids[:, :L], x_t)
    expected = (ce_of(FIXED_LOGITS, X0) * masked / t.double()).sum() / eligible.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)


def test_no_eligible_token_gives_zero_loss_not_nan():
    fake = FakeModel(FIXED_LOGITS)
    for weighting in ("elbo", "token_mean"):
        cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, weighting=weighting, t_lo=1.0, t_hi=1.0)
        batch = {"input_ids": X0, "loss_mask": torch.zeros(2, L, dtype=torch.bool)}
        loss, _ = diffusion_loss(fake, batch, cfg, generator=gen(0))
        assert float(loss) == 0.0


# ------------------------------------------------------------------ layout == one forward per block
def test_block1_noisy_logit_equals_causal_model_on_prefix_plus_mask():
    model = tiny_model()
    rec = Recorder(model)
    x0 = tokens(seed=2)
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=1, t_lo=1.0, t_hi=1.0)  # every token masked
    with torch.no_grad():
        diffusion_loss(rec, {"input_ids": x0}, cfg, generator=gen(0))
        got = rec.calls[0]["logits"]  # [b, L, V]
        assert rec.ids[0].shape == (2, 2 * L)
        for i in range(L):
            seq = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], 1)
            causal = torch.ones(i + 1, i + 1, dtype=torch.bool).tril()[None, None]
            want = model(seq, positions=torch.arange(i + 1)[None], mask=causal)[:, -1]
            torch.testing.assert_close(got[:, i], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_vectorised_layout_equals_one_forward_per_block(block_size, with_docs):
    model = tiny_model(seed=3)
    rec = Recorder(model)
    x0 = tokens(seed=4)
    batch = {"input_ids": x0}
    if with_docs:
        batch.update(doc_ids=DOC_IDS, positions=positions_of(DOC_IDS))
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=block_size, t_lo=0.3, t_hi=0.7)
    with torch.no_grad():
        diffusion_loss(rec, batch, cfg, generator=gen(1))
    x_t = rec.ids[0][:, :L]
    assert (x_t == MASK).any() and (x_t != MASK).any()  # a mix, so clean and masked noisy tokens both occur
    want = per_block_reference(model, x0, x_t, block_size, DOC_IDS if with_docs else None)
    torch.testing.assert_close(rec.calls[0]["logits"], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_size", [L, 2 * L])
def test_block_L_is_mdlm_on_x_t_alone(block_size):
    model = tiny_model(seed=5)
    x0 = tokens(seed=6)
    pos = positions_of(DOC_IDS)
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=block_size, t_lo=0.1, t_hi=0.9)
    with torch.no_grad():
        loss, _ = diffusion_loss(model, {"input_ids": x0, "doc_ids": DOC_IDS, "positions": pos}, cfg, generator=gen(11))
        # MDLM written out: same draws (one t per row, then the mask), full attention inside each document
        g = gen(11)
        t = 0.1 + 0.8 * torch.rand(2, 1, generator=g)
        masked = torch.rand(2, L, generator=g) < t
        x_t = torch.where(masked, MASK, x0)
        full_doc = (DOC_IDS[:, :, None] == DOC_IDS[:, None, :])[:, None]  # [b, 1, L, L]
        logits = model(x_t, positions=pos, mask=full_doc)
        expected = (ce_of(logits, x0) * masked / t).sum() / x0.numel()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ noising
def test_only_loss_mask_positions_are_masked():
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.5, t_hi=1.0)
    _, x_t, masked, _, eligible, _, _, _ = noised_inputs({"input_ids": X0, "loss_mask": LOSS_MASK}, cfg, gen(2))
    assert torch.equal(eligible, LOSS_MASK)
    assert not (masked & ~LOSS_MASK).any() and masked.any()
    assert torch.equal(x_t == MASK, masked)
    assert torch.equal(torch.where(masked, X0, x_t), X0)  # unmasked tokens untouched


@pytest.mark.parametrize("t_per", ["sample", "block"])
def test_complementary_masks_are_disjoint_and_cover_eligible(t_per):
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.2, t_hi=0.8, t_per=t_per, complementary=True)
    pos = positions_of(DOC_IDS)
    batch = {"input_ids": X0, "loss_mask": LOSS_MASK, "doc_ids": DOC_IDS, "positions": pos}
    x0, x_t, masked, t, eligible, doc_ids, positions, _ = noised_inputs(batch, cfg, gen(4))
    b = X0.shape[0]
    assert x0.shape == x_t.shape == masked.shape == t.shape == (2 * b, L)
    assert torch.equal(x0, torch.cat([X0, X0])) and torch.equal(eligible, torch.cat([LOSS_MASK, LOSS_MASK]))
    assert torch.equal(doc_ids, torch.cat([DOC_IDS, DOC_IDS])) and torch.equal(positions, torch.cat([pos, pos]))
    a, c = masked[:b], masked[b:]
    assert not (a & c).any()
    assert torch.equal(a | c, LOSS_MASK)
    assert a.any() and c.any()
    torch.testing.assert_close(t[b:], 1.0 - t[:b])
    assert torch.equal(x_t == MASK, masked)


def test_complementary_loss_runs_on_doubled_batch():
    rec = Recorder(tiny_model())
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.2, t_hi=0.8, complementary=True)
    with torch.no_grad():
        loss, m = diffusion_loss(rec, {"input_ids": X0}, cfg, generator=gen(0))
    assert rec.ids[0].shape == (4, 2 * L)
    assert torch.isfinite(loss)
    assert m["mask_frac"] == pytest.approx(0.5)  # each eligible token masked in exactly one of the pair


def test_per_block_t_constant_within_block_and_differs_between_blocks():
    t = sample_t(3, L, t_lo=0.2, t_hi=0.9, per="block", block_size=4, generator=gen(0))
    assert t.shape == (3, L)
    blocks = t.view(3, L // 4, 4)
    assert torch.equal(blocks, blocks[..., :1].expand_as(blocks))
    assert len(set(blocks[..., 0].flatten().tolist())) == 3 * (L // 4)  # every (row, block) its own draw
    assert 0.2 <= float(t.min()) and float(t.max()) <= 0.9
    # per sample: one t per row
    ts = sample_t(3, L, t_lo=0.2, t_hi=0.9, per="sample", generator=gen(0))
    assert torch.equal(ts, ts[:, :1].expand_as(ts)) and len(set(ts[:, 0].tolist())) == 3


def test_per_block_t_follows_document_blocks():
    pos = positions_of(DOC_IDS)
    t = sample_t(2, L, t_lo=0.0, t_hi=1.0, per="block", block_size=4, positions=pos, generator=gen(1))
    for r in range(2):
        for s, e in segments(DOC_IDS[r]):
            for ks in range(s, e, 4):
                blk = t[r, ks:min(ks + 4, e)]
                assert torch.equal(blk, blk[:1].expand_as(blk))
    # and through the loss config: t from noised_inputs is constant inside each block
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.1, t_hi=0.9, t_per="block")
    _, _, _, t2, _, _, _, _ = noised_inputs({"input_ids": X0}, cfg, gen(2))
    v = t2.view(2, L // 4, 4)
    assert torch.equal(v, v[..., :1].expand_as(v)) and v[0, 0, 0] != v[0, 1, 0]


def test_mask_positions_rate_and_eligibility():
    t = torch.full((4, 2000), 0.3)
    eligible = torch.ones_like(t, dtype=torch.bool)
    eligible[:, ::2] = False
    m = mask_positions(t, eligible, gen(0))
    assert not (m & ~eligible).any()
    assert float(m[:, 1::2].float().mean()) == pytest.approx(0.3, abs=0.02)


# ------------------------------------------------------------------------------------- embedding noise
@pytest.mark.parametrize("block_size", [4, L])
def test_embedding_noise_only_at_masked_noisy_positions(block_size):
    model = tiny_model()
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=block_size, t_lo=0.3, t_hi=0.7)
    embeds = {}
    for std in (0.0, 0.5):
        rec = Recorder(model)
        with torch.no_grad():
            diffusion_loss(rec, {"input_ids": X0}, cfg, generator=gen(7), embed_noise_std=std)
        embeds[std] = rec.calls[0]["inputs_embeds"]
        ids = rec.ids[0]  # noise is drawn after the mask, so both runs see the same x_t
    torch.testing.assert_close(embeds[0.0], model.embed(ids).detach(), rtol=0, atol=0)
    diff = embeds[0.5] - embeds[0.0]
    noisy_at = torch.zeros_like(ids, dtype=torch.bool)
    noisy_at[:, :L] = ids[:, :L] == MASK
    assert noisy_at.any()
    assert (diff[noisy_at] != 0).all()
    assert (diff[~noisy_at] == 0).all()  # clean half and unmasked noisy tokens untouched
    assert float(diff[noisy_at].std()) == pytest.approx(0.5, rel=0.2)


def test_annealed_std_is_linear_to_zero():
    assert annealed_std(2.0, 0, 10) == pytest.approx(2.0)
    assert annealed_std(2.0, 5, 10) == pytest.approx(1.0)
    assert annealed_std(2.0, 9, 10) == pytest.approx(0.2)
    assert annealed_std(2.0, 10, 10) == 0.0
    assert annealed_std(2.0, 50, 10) == 0.0
    assert annealed_std(2.0, 0, 0) == 0.0  # anneal_steps 0 disables the noise
    assert annealed_std(0.0, 3, 10) == 0.0
    vals = [annealed_std(1.0, s, 8) for s in range(9)]
    steps = [a - b for a, b in zip(vals, vals[1:])]
    assert steps == pytest.approx([1 / 8] * 8)


def test_embedding_noise_std_is_embedding_rms():
    model = tiny_model()
    with torch.no_grad():
        model.tok_embeddings.weight.fill_(0.3)
    assert embedding_noise_std(model) == pytest.approx(0.3)  # each row norm 0.3 sqrt(d), / sqrt(d)
    model = tiny_model(seed=1)
    rms = float(model.tok_embeddings.weight.detach().pow(2).mean().sqrt())
    assert embedding_noise_std(model) == pytest.approx(rms, rel=0.05)


# ------------------------------------------------------------------------ every parameter moves
def _assert_all_params_move(model, loss_fn):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)  # no decay: movement is from grads
    loss, _ = loss_fn(model)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"{n} did not move"


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("block_size", [4, L])
def test_every_parameter_moves_after_a_diffusion_step(tied, block_size):
    model = tiny_model(tied=tied)
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=block_size, t_lo=0.3, t_hi=0.8)
    batch = {"input_ids": X0, "doc_ids": DOC_IDS, "positions": positions_of(DOC_IDS)}
    _assert_all_params_move(model, lambda m: diffusion_loss(m, batch, cfg, generator=gen(0), embed_noise_std=0.1))
    if tied:
        assert model.output.weight is model.tok_embeddings.weight


@pytest.mark.parametrize("tied", [False, True])
def test_every_parameter_moves_after_an_ar_step(tied):
    model = tiny_model(tied=tied)
    batch = {"input_ids": X0, "doc_ids": DOC_IDS, "positions": positions_of(DOC_IDS)}
    _assert_all_params_move(model, lambda m: ar_loss(m, batch))


# --------------------------------------------------------------------- gradient accumulation 1x8 == 8x1
def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("block_size", [4, L])
def test_grad_accumulation_1x8_equals_8x1(block_size, monkeypatch):
    # The API draws t and the mask from one generator over the whole batch, so 8 calls of 1 row consume the
    # stream differently from 1 call of 8 rows. To give both the same per-row draws, this test replaces the
    # two draw functions with slices of draws made once (per-sample t ~ U[0.1, 0.9]).
    n_rows = 8
    g = gen(21)
    t_all = (0.1 + 0.8 * torch.rand(n_rows, 1, generator=g)).expand(n_rows, L)
    m_all = torch.rand(n_rows, L, generator=g) < t_all
    x0 = tokens(n_rows, seed=22)
    doc_ids = DOC_IDS.repeat(4, 1)
    pos = positions_of(doc_ids)
    cursor = {"i": 0}

    def fake_sample_t(batch, seq_len, **_):
        return t_all[cursor["i"]:cursor["i"] + batch]

    def fake_mask_positions(t, eligible, generator=None):
        out = m_all[cursor["i"]:cursor["i"] + t.shape[0]] & eligible
        cursor["i"] += t.shape[0]
        return out

    monkeypatch.setattr(diffusion, "sample_t", fake_sample_t)
    monkeypatch.setattr(diffusion, "mask_positions", fake_mask_positions)
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=block_size, weighting="elbo", t_lo=0.1, t_hi=0.9)

    model = tiny_model(seed=8)
    loss_full, _ = diffusion_loss(model, {"input_ids": x0, "doc_ids": doc_ids, "positions": pos}, cfg)
    loss_full.backward()
    g_full = _grads(model)

    model.zero_grad()
    cursor["i"] = 0
    total = 0.0
    for r in range(n_rows):
        micro = {"input_ids": x0[r:r + 1], "doc_ids": doc_ids[r:r + 1], "positions": pos[r:r + 1]}
        loss, _ = diffusion_loss(model, micro, cfg)
        (loss / n_rows).backward()
        total += float(loss.detach()) / n_rows
    assert cursor["i"] == n_rows
    assert total == pytest.approx(float(loss_full.detach()), rel=1e-5)
    for n, gr in _grads(model).items():
        torch.testing.assert_close(gr, g_full[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_grad_accumulation_1x8_equals_8x1_without_patching():
    # At the level the API allows unaided: t_lo = t_hi = 1 masks every token deterministically.
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, weighting="elbo", t_lo=1.0, t_hi=1.0)
    x0 = tokens(8, seed=23)
    model = tiny_model(seed=9)
    diffusion_loss(model, {"input_ids": x0}, cfg, generator=gen(0))[0].backward()
    g_full = _grads(model)
    model.zero_grad()
    for r in range(8):
        (diffusion_loss(model, {"input_ids": x0[r:r + 1]}, cfg, generator=gen(0))[0] / 8).backward()
    for n, gr in _grads(model).items():
        torch.testing.assert_close(gr, g_full[n], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ elbo_nll, ar_loss
def test_elbo_nll_is_deterministic_and_matches_diffusion_loss():
    model = tiny_model()
    batches = [{"input_ids": tokens(seed=30)}, {"input_ids": tokens(seed=31), "loss_mask": LOSS_MASK}]
    a = elbo_nll(model, batches, mask_token_id=MASK, block_size=4)
    b = elbo_nll(model, batches, mask_token_id=MASK, block_size=4)
    assert a == b
    # written out: t ~ U[1e-3, 1] from one generator seeded 1234, each batch weighted by its eligible tokens
    g = gen(1234)
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, weighting="elbo", t_lo=1e-3, t_hi=1.0)
    with torch.no_grad():
        l1 = float(diffusion_loss(model, batches[0], cfg, generator=g)[0])
        l2 = float(diffusion_loss(model, batches[1], cfg, generator=g)[0])
    n1, n2 = batches[0]["input_ids"].numel(), int(LOSS_MASK.sum())
    assert a == pytest.approx((l1 * n1 + l2 * n2) / (n1 + n2), rel=1e-6)
    assert elbo_nll(model, batches, mask_token_id=MASK, block_size=4, seed=7) != pytest.approx(a, rel=1e-6)
    assert elbo_nll(tiny_model(seed=1), batches, mask_token_id=MASK, block_size=4) != pytest.approx(a, rel=1e-6)


def test_ar_loss_equals_causal_next_token_ce():
    model = tiny_model()
    with torch.no_grad():
        loss, _ = ar_loss(model, {"input_ids": X0})
        logits = model(X0, mask=torch.ones(L, L, dtype=torch.bool).tril()[None, None])
        expected = ce_of(logits[:, :-1], X0[:, 1:]).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_ar_loss_ignores_cross_document_targets():
    model = tiny_model()
    doc = torch.tensor([[0] * 8 + [1] * 8])
    pos = positions_of(doc)
    x = tokens(1, seed=40)
    with torch.no_grad():
        l1 = float(ar_loss(model, {"input_ids": x[:, :8]})[0])  # doc 1 alone: 7 targets
        for k in range(3):  # several contents for doc 2
            x2 = x.clone()
            x2[:, 8:] = tokens(1, 8, seed=41 + k)
            l2 = float(ar_loss(model, {"input_ids": x2[:, 8:]})[0])
            packed = float(ar_loss(model, {"input_ids": x2, "doc_ids": doc, "positions": pos})[0])
            # 14 in-document targets; the target x[8] (first token of doc 2, predicted from doc 1) is excluded
            assert packed == pytest.approx((7 * l1 + 7 * l2) / 14, rel=1e-5)


# ---------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kw, field", [
    ({"weighting": "mean"}, "weighting"),
    ({"t_per": "token"}, "t_per"),
    ({"t_lo": 0.9, "t_hi": 0.1}, "t_lo"),
    ({"t_lo": -0.1}, "t_lo"),
    ({"t_hi": 1.5}, "t_hi"),
    ({"block_size": 0}, "block_size"),
])
def test_bad_loss_config_names_the_field(kw, field):
    base = {"mask_token_id": MASK, "block_size": 4, **kw}
    with pytest.raises(ValueError, match=field):
        DiffusionLossConfig(**base)


def test_bad_sample_t_arguments_name_the_field():
    with pytest.raises(ValueError, match="t_per"):
        sample_t(2, L, t_lo=0.1, t_hi=0.9, per="token")
    with pytest.raises(ValueError, match="bandwidth.*t_lo"):
        sample_t(2, L, t_lo=0.8, t_hi=0.2)


def test_block_size_not_dividing_seq_len_is_rejected():
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=5)
    with pytest.raises(ValueError, match="block_size 5 does not divide"):
        diffusion_loss(tiny_model(), {"input_ids": X0}, cfg, generator=gen(0))


# ------------------------------------------------------------------------------------ chunked loss head
CHUNK_CASES = {  # name: DiffusionLossConfig fields; together they cover every term the loss reads logits for
    "bd": dict(block_size=4),
    "mdlm": dict(block_size=L),
    "shift-causal-ar": dict(block_size=4, shift=True, clean_causal=True, ar_weight=0.5),
    "shift-ar-extra-forward": dict(block_size=4, shift=True, ar_weight=0.5),
    "t2t-complementary-token-mean": dict(block_size=4, t2t_ratio=1.0, t2t_max_rate=0.5, t2t_vocab=MASK,
                                         complementary=True, weighting="token_mean"),
}


def _loss_and_grads(loss_fn, seed=8, tied=False):
    model = tiny_model(seed=seed, tied=tied)
    loss, metrics = loss_fn(model)
    loss.backward()
    return float(loss.detach()), metrics, _grads(model)


def _assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-6, abs=1e-7)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert a[1][k] == pytest.approx(b[1][k], rel=1e-5, abs=1e-7), k
    for n, g in a[2].items():  # fp32, summed in another order: within 1e-5 of the gradient's largest entry
        err, scale = float((g - b[2][n]).abs().max()), float(b[2][n].abs().max())
        assert scale > 0 and err <= 1e-5 * scale, f"{n}: max |diff| {err:.2e} vs max |grad| {scale:.2e}"


@pytest.mark.parametrize("chunk", [1, 5, 16, 10_000])
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunked_loss_equals_full_logits(case, chunk):
    """Loss, metrics and every parameter's gradient with the head applied `chunk` scored tokens at a time (5 does
    not divide the ~30 scored tokens; 10_000 is one chunk) equal the full [b, L, V] logits path (chunk 0)."""
    batch = {"input_ids": X0, "doc_ids": DOC_IDS, "positions": positions_of(DOC_IDS), "loss_mask": LOSS_MASK}

    def run(c):
        cfg = DiffusionLossConfig(mask_token_id=MASK, t_lo=0.2, t_hi=0.9, loss_chunk_tokens=c, **CHUNK_CASES[case])
        return _loss_and_grads(lambda m: diffusion_loss(m, batch, cfg, generator=gen(3)), tied=case == "bd")

    _assert_same(run(chunk), run(0))


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_ar_cap_and_elbo_equal_full_logits(chunk):
    from blockdiff.objectives.cap import CAPConfig, cap_loss
    from blockdiff.objectives.diffusion import sequence_elbo

    batch = {"input_ids": X0, "doc_ids": DOC_IDS, "positions": positions_of(DOC_IDS)}
    _assert_same(_loss_and_grads(lambda m: ar_loss(m, batch, chunk_tokens=chunk)),
                 _loss_and_grads(lambda m: ar_loss(m, batch, chunk_tokens=0)))

    def cap(c):
        d = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.5, t_hi=1.0, loss_chunk_tokens=c)
        return lambda m: cap_loss(m, batch, CAPConfig(diffusion=d, lam=2.0), generator=gen(4))
    _assert_same(_loss_and_grads(cap(chunk)), _loss_and_grads(cap(0)))

    masked = torch.rand(2, L, generator=gen(5)) < 0.5
    t = torch.full((2, L), 0.5)

    def elbo(c):
        x_t = torch.where(masked, MASK, X0)
        return lambda m: (-sequence_elbo(m, X0, x_t, masked, t, block_size=4, shift=True, chunk_tokens=c).sum(), {})
    _assert_same(_loss_and_grads(elbo(chunk)), _loss_and_grads(elbo(0)))


def test_chunked_head_never_sees_more_than_a_chunk():
    """The memory claim: no [b, L, V] logits. The head is called on at most `chunk` tokens at a time, once per chunk
    in forward and once more in backward (the recomputation), and only on scored (masked) tokens."""
    model = tiny_model()
    seen = []
    model.output.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.5, t_hi=0.5, loss_chunk_tokens=3)
    x0, x_t, masked, *_ = noised_inputs({"input_ids": X0}, cfg, gen(2))
    loss, _ = diffusion_loss(model, {"input_ids": X0}, cfg, generator=gen(2))
    n_fwd = len(seen)
    loss.backward()
    n = int(masked.sum())
    assert max(seen) <= 3 and sum(seen[:n_fwd]) == n and n_fwd == -(-n // 3)
    assert len(seen) == 2 * n_fwd  # each chunk recomputed once in backward


def test_loss_chunk_tokens_must_be_non_negative():
    with pytest.raises(ValueError, match="loss_chunk_tokens"):
        DiffusionLossConfig(loss_chunk_tokens=-1)


@pytest.mark.parametrize("chunk", [1, 4, 0])
def test_scored_ce_equals_full_logits_with_entropy(chunk):
    """chunked_ce.scored_ce alone: ce, argmax and entropy at the scored positions, and the gradients of a weighted
    sum of ce and entropy (CAP's two terms) on the hidden states and the head, equal the full-logits computation."""
    from blockdiff.objectives.chunked_ce import scored_ce, token_entropy

    g = gen(40)
    head = torch.nn.Linear(8, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, 8, generator=g))
    h = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    y, where = torch.randint(0, V, (2, 6), generator=g), torch.rand(2, 6, generator=g) < 0.6
    w1, w2 = torch.rand(2, 6, generator=g), torch.rand(2, 6, generator=g)

    def grads(ce, ent):
        head.zero_grad(set_to_none=True)
        h.grad = None
        ((ce * w1).sum() + (ent * w2).sum()).backward()
        return h.grad.clone(), head.weight.grad.clone()

    ce, pred, ent = scored_ce(head, h, y, where, chunk_tokens=chunk, entropy=True)
    got = grads(ce, ent)
    logits = head(h)
    ce0 = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none").view(2, 6) * where
    ent0 = token_entropy(logits) * where
    want = grads(ce0, ent0)
    torch.testing.assert_close(ce, ce0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ent0, rtol=1e-6, atol=1e-6)
    assert torch.equal(pred, torch.where(where, logits.argmax(-1), -1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
