"""Attention masks: every mode against a loop reference, flex == dense, and attention-level perturbations."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from blockdiff.model.masks import (
    MASK_MODES,
    dense_mask,
    flex_block_mask,
    mask_mod,
    positions_from_doc_ids,
    validate_block_size,
)

L = 16
# batch of 2 with different layouts: 3 documents not aligned to blocks / 2 documents
DOC_IDS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [4] * 9 + [9] * 7])


# ---------------------------------------------------------------- loop reference (straight from the rules)
def _ref_positions(doc_row):
    pos, start = [], 0
    for j, d in enumerate(doc_row):
        if j > 0 and d != doc_row[j - 1]:
            start = j
        pos.append(j - start)
    return pos


def reference_mask(mode, L, B, doc_ids=None, positions=None, batch=1):
    rows = doc_ids.shape[0] if doc_ids is not None else (positions.shape[0] if positions is not None else batch)
    n = 2 * L if mode.startswith("bd_train") else L
    out = torch.zeros(rows, 1, n, n, dtype=torch.bool)
    for r in range(rows):
        doc = doc_ids[r].tolist() if doc_ids is not None else [0] * L
        if positions is not None:
            pos = positions[r].tolist()
        elif doc_ids is not None:
            pos = _ref_positions(doc)
        else:
            pos = list(range(L))
        for q in range(n):
            for k in range(n):
                if doc[q % L] != doc[k % L]:
                    continue
                if mode == "causal":
                    ok = k <= q
                elif mode == "full":
                    ok = True
                elif mode == "block_causal":
                    ok = pos[k] // B <= pos[q] // B
                else:
                    bq, bk = pos[q % L] // B, pos[k % L] // B
                    q_noisy, k_noisy = q < L, k < L
                    if q_noisy and k_noisy:
                        ok = bk == bq
                    elif q_noisy:
                        ok = bk < bq
                    elif not k_noisy:
                        ok = k <= q if mode == "bd_train_causal" else bk <= bq
                    else:
                        ok = False
                out[r, 0, q, k] = ok
    return out


CASES = [(m, None) for m in ("causal", "full")] + [
    (m, B) for m in ("block_causal", "bd_train", "bd_train_causal") for B in (1, 2, 4, 16)
]


@pytest.mark.parametrize("mode,B", CASES)
@pytest.mark.parametrize("with_docs", [False, True])
def test_dense_matches_loop_reference(mode, B, with_docs):
    doc_ids = DOC_IDS if with_docs else None
    got = dense_mask(mode, seq_len=L, block_size=B, doc_ids=doc_ids, batch=2)
    want = reference_mask(mode, L, B, doc_ids=doc_ids, batch=2)
    assert got.shape == want.shape and got.dtype == torch.bool
    assert torch.equal(got, want)
    assert got.any(dim=-1).all(), "every query must see at least one key"


@pytest.mark.parametrize("mode,B", [("block_causal", 4), ("bd_train", 4), ("causal", None)])
def test_explicit_positions(mode, B):
    # a document continuing from an earlier chunk starts at position 3, not 0
    positions = torch.tensor([[3, 4, 5, 6, 7] + list(range(7)) + list(range(4)), list(range(16))])
    got = dense_mask(mode, seq_len=L, block_size=B, doc_ids=DOC_IDS, positions=positions)
    assert torch.equal(got, reference_mask(mode, L, B, doc_ids=DOC_IDS, positions=positions))
    # positions without doc ids: blocks follow the given positions, one document per row
    got = dense_mask(mode, seq_len=L, block_size=B, positions=positions)
    assert torch.equal(got, reference_mask(mode, L, B, positions=positions))


def test_positions_from_doc_ids():
    assert positions_from_doc_ids(DOC_IDS).tolist() == [_ref_positions(r) for r in DOC_IDS.tolist()]


def test_block_causal_b1_is_causal():
    for doc_ids in (None, DOC_IDS):
        assert torch.equal(
            dense_mask("block_causal", seq_len=L, block_size=1, doc_ids=doc_ids),
            dense_mask("causal", seq_len=L, doc_ids=doc_ids),
        )


def test_bd_train_b_equals_l():
    for doc_ids in (None, DOC_IDS):
        m = dense_mask("bd_train", seq_len=L, block_size=L, doc_ids=doc_ids)
        full = dense_mask("full", seq_len=L, doc_ids=doc_ids)
        assert torch.equal(m[..., :L, :L], full)  # noisy-noisy: full within the document
        assert not m[..., :L, L:].any()  # no earlier clean block to see
        assert torch.equal(m[..., L:, L:], full)  # clean-clean: one block, full
        assert not m[..., L:, :L].any()  # clean never sees noisy


def test_no_doc_ids_broadcasts_over_batch():
    m = dense_mask("bd_train", seq_len=L, block_size=4, batch=3)
    assert m.shape == (3, 1, 2 * L, 2 * L)
    assert torch.equal(m[0], m[2])


def test_mask_mod_scalar_indices():
    mod = mask_mod("bd_train", block_size=4, doc_ids=DOC_IDS, seq_len=L)
    t = torch.tensor
    assert mod(t(0), t(0), t(5), t(6))  # noisy, same block (doc 1, pos 0 and 1)
    assert not mod(t(0), t(0), t(5), t(4))  # other document
    assert mod(t(0), t(0), t(9), t(L + 5))  # noisy pos 4 sees clean pos 0 of its doc
    assert not mod(t(0), t(0), t(L + 9), t(9))  # clean never sees noisy


# ---------------------------------------------------------------- FlexAttention vs SDPA (CPU, forward only)
FLEX_CASES = [("causal", None), ("full", None), ("block_causal", 8), ("block_causal", 1), ("bd_train", 16), ("bd_train", 128),
              ("bd_train_causal", 16)]


@pytest.mark.parametrize("mode,B", FLEX_CASES)
@pytest.mark.parametrize("with_docs", [False, True])
def test_flex_equals_sdpa(mode, B, with_docs):
    torch.manual_seed(0)
    Lf = 128
    doc_ids = torch.tensor([[0] * 50 + [1] * 45 + [2] * 33, [5] * 128]) if with_docs else None
    T = 2 * Lf if mode.startswith("bd_train") else Lf
    q, k, v = torch.randn(3, 2, 2, T, 16).unbind(0)  # [b, h, T, d] each
    bm = flex_block_mask(mode, seq_len=Lf, block_size=B, doc_ids=doc_ids, batch=2)
    dense = dense_mask(mode, seq_len=Lf, block_size=B, doc_ids=doc_ids, batch=2)
    with warnings.catch_warnings():
        # un-compiled flex on CPU warns that it materialises the scores; that is what we test here
        warnings.simplefilter("ignore", UserWarning)
        out = flex_attention(q, k, v, block_mask=bm)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _tiles(num, idx, rows, cols):
    """[rows, cols] bool from a BlockMask's (num_blocks, indices) for one batch row / head."""
    t = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        t[r, idx[r, : num[r]].long()] = True
    return t


@pytest.mark.parametrize("mode,B", [("causal", None), ("block_causal", 8), ("bd_train", 8), ("bd_train", 32)])
def test_block_mask_tiles_match_dense(mode, B):
    # Eager flex on CPU evaluates mask_mod densely and ignores tile sparsity, so check the tiles the
    # GPU kernel would skip / compute without mask / compute with mask against the dense mask here.
    tile, Lf = 32, 128
    doc_ids = torch.tensor([[0] * 50 + [1] * 45 + [2] * 33, [5] * 128])
    bm = flex_block_mask(mode, seq_len=Lf, block_size=B, doc_ids=doc_ids, flex_block=tile)
    dense = dense_mask(mode, seq_len=Lf, block_size=B, doc_ids=doc_ids)
    n = dense.shape[-1] // tile
    per_tile = dense[:, 0].reshape(2, n, tile, n, tile)
    any_true, all_true = per_tile.any(dim=(2, 4)), per_tile.all(dim=(2, 4))  # [b, n, n]
    for r in range(2):
        partial = _tiles(bm.kv_num_blocks[r, 0], bm.kv_indices[r, 0], n, n)
        full = _tiles(bm.full_kv_num_blocks[r, 0], bm.full_kv_indices[r, 0], n, n)
        assert torch.equal(full, all_true[r])
        assert torch.equal(partial, any_true[r] & ~all_true[r])
    assert bm.shape[0] == 2 and bm.shape[-1] == dense.shape[-1]


def test_flex_block_mask_without_docs_has_no_batch():
    bm = flex_block_mask("bd_train", seq_len=128, block_size=32)
    assert bm.kv_num_blocks.shape[0] == 1


# ---------------------------------------------------------------- attention-level perturbations
class ToyAttention(torch.nn.Module):
    """x -> x + Wo SDPA(Wq x, Wk x, Wv x; mask), twice. fp32, fixed random weights."""

    def __init__(self, d=16, heads=2, layers=2):
        super().__init__()
        self.heads = heads
        self.proj = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(4, d, d) / d**0.5) for _ in range(layers)]
        )

    def forward(self, x, mask):  # x [b, T, d], mask [b, 1, T, T]
        b, T, d = x.shape
        for w in self.proj:
            q, k, v = (
                (x @ w[i]).view(b, T, self.heads, d // self.heads).transpose(1, 2) for i in range(3)
            )
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, h, T, d/h]
            x = x + a.transpose(1, 2).reshape(b, T, d) @ w[3]
        return x


@torch.no_grad()
def _perturb(model, x, mask, row, p):
    y = x.clone()
    y[row, p] += torch.randn(x.shape[-1])
    return model(x, mask)[row], model(y, mask)[row]  # [T, d] each


@torch.no_grad()
def test_bd_train_perturbation_all_positions():
    torch.manual_seed(0)
    B = 4
    model = ToyAttention()
    mask = dense_mask("bd_train", seq_len=L, block_size=B, doc_ids=DOC_IDS)  # [2, 1, 2L, 2L]
    x = torch.randn(2, 2 * L, 16)
    m = mask[:, 0]
    # what a query can reach through two layers; the block rules make this equal to one hop
    reach = m | (m.int() @ m.int() > 0)
    assert torch.equal(reach, m)
    for row in range(2):
        for p in range(2 * L):
            base, pert = _perturb(model, x, mask, row, p)
            changed = (base != pert).any(dim=-1)  # [2L]
            assert torch.equal(changed, m[row, :, p]), (row, p)


@torch.no_grad()
def test_bd_train_perturbation_named_cases():
    torch.manual_seed(1)
    B = 4
    model = ToyAttention()
    mask = dense_mask("bd_train", seq_len=L, block_size=B, doc_ids=DOC_IDS)
    x = torch.randn(2, 2 * L, 16)
    # row 1: doc A = tokens 0..8 (positions 0..8, blocks 0,0,0,0,1,1,1,1,2), doc B = tokens 9..15
    q = 5  # noisy, doc A, block 1
    cases = {
        "later noisy block": (8, False),  # token 8 is block 2
        "clean key of the same block": (L + 4, False),
        "clean key of a later block": (L + 8, False),
        "token of another document (noisy)": (10, False),
        "token of another document (clean)": (L + 10, False),
        "noisy key of an earlier block": (2, False),
        "noisy key of the same block": (7, True),
        "clean key of an earlier block": (L + 1, True),
    }
    for name, (p, visible) in cases.items():
        base, pert = _perturb(model, x, mask, 1, p)
        assert torch.equal(base[q], pert[q]) != visible, name
    # clean query (token 5 of the clean half) never sees the noisy half, sees clean up to its block
    for p, visible in ((5, False), (L + 7, True), (L + 8, False), (L + 0, True)):
        base, pert = _perturb(model, x, mask, 1, p)
        assert torch.equal(base[L + 5], pert[L + 5]) != visible, p


# ---------------------------------------------------------------- bad inputs
def test_validate_block_size():
    validate_block_size(256, 32)
    with pytest.raises(ValueError, match=r"block_size 48 does not divide seq_len 256; allowed: .*1, 2, 4"):
        validate_block_size(256, 48)
    with pytest.raises(ValueError, match=r"block_size 0 must lie in \[1, seq_len=256\]"):
        validate_block_size(256, 0)
    with pytest.raises(ValueError, match=r"block_size 512 must lie in \[1, seq_len=256\]"):
        validate_block_size(256, 512)


@pytest.mark.parametrize("builder", [dense_mask, flex_block_mask])
def test_bad_inputs(builder):
    with pytest.raises(ValueError, match=r"unknown mask mode 'mdlm'.*'causal', 'full', 'block_causal', 'bd_train'"):
        builder("mdlm", seq_len=L)
    for mode in ("block_causal", "bd_train"):
        with pytest.raises(ValueError, match=f"mask mode '{mode}' needs block_size"):
            builder(mode, seq_len=L)
    with pytest.raises(ValueError, match="block_size 3 does not divide seq_len 16"):
        builder("bd_train", seq_len=L, block_size=3)
    with pytest.raises(ValueError, match=r"doc_ids must have shape \[b, seq_len\] = \[b, 16\], got \[16\]"):
        builder("causal", seq_len=L, doc_ids=torch.zeros(L, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positions must have shape \[b, seq_len\] = \[b, 16\], got \[2, 8\]"):
        builder("block_causal", seq_len=L, block_size=4, positions=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"doc_ids and positions must have the same shape, expected \[2, 16\], got \[1, 16\]"):
        builder("causal", seq_len=L, doc_ids=DOC_IDS, positions=torch.zeros(1, L, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids must be an integer tensor"):
        builder("causal", seq_len=L, doc_ids=DOC_IDS.float())
    with pytest.raises(ValueError, match=r"batch=3 does not match doc_ids/positions batch 2"):
        builder("causal", seq_len=L, doc_ids=DOC_IDS, batch=3)


def test_bd_train_causal_clean_half_is_causal_and_noisy_half_unchanged():
    """The causal clean stream changes only the clean-clean quadrant, and there it is the AR parent's mask."""
    for B in (1, 4, 16):
        bd = dense_mask("bd_train", seq_len=L, block_size=B, doc_ids=DOC_IDS)
        bdc = dense_mask("bd_train_causal", seq_len=L, block_size=B, doc_ids=DOC_IDS)
        assert torch.equal(bd[..., :L, :], bdc[..., :L, :])  # noisy queries: identical
        assert torch.equal(bdc[..., L:, L:], dense_mask("causal", seq_len=L, doc_ids=DOC_IDS))
        assert not bdc[..., L:, :L].any()  # clean queries never see the noisy half


def test_mask_modes_are_the_modes_the_builders_build():
    """MASK_MODES means: the names dense_mask / flex_block_mask accept. Every listed mode is checked against the
    loop reference (CASES), block modes refuse to build without a block size, no two listed modes build the same
    mask, and a name outside the list is refused naming the list."""
    assert {m for m, _ in CASES} == set(MASK_MODES)
    built = {}
    for mode, B in CASES:
        if B is not None:
            with pytest.raises(ValueError, match=f"mask mode '{mode}' needs block_size"):
                dense_mask(mode, seq_len=L, doc_ids=DOC_IDS)
        if B in (None, 4):
            built[mode] = dense_mask(mode, seq_len=L, block_size=B, doc_ids=DOC_IDS)
    modes = list(built)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert built[a].shape != built[b].shape or not torch.equal(built[a], built[b]), (a, b)
    with pytest.raises(ValueError, match=r"unknown mask mode 'bd_train_full'; expected one of"):
        dense_mask("bd_train_full", seq_len=L, block_size=4)
