"""Decoding: the threshold rule against a brute-force reference, exact-KV-cache block decoding against the no-cache
reference decoder `decode/reference.py` (like the official HF `generate()`, it recomputes the whole prefix every
step; with `early_exit` it stops a block where the engine does, so steps and forwards compare too), AR decoding against greedy full recomputation, sampling reproducibility, decoding invariants and bad input.

Models: the `bd` / `ar` fixtures (conftest.py: tiny random models with logits x20, so confidences spread over
(0, 1)), wrapped by `tiebroken` (decode_helpers.py: why) wherever two decoders must make the same decisions.
"""

from __future__ import annotations

import math

import pytest
import torch
from decode_helpers import Spy, disagree, force, make_prompt, tiebroken

from blockdiff.decode.cache import KVCache
from blockdiff.decode.engine import BlockDecodeConfig, ar_generate, block_generate
from blockdiff.decode.reference import reference_generate
from blockdiff.decode.rules import choose_tokens, threshold_rule
from blockdiff.model.hf_io import load_pretrained
from blockdiff.model.masks import dense_mask

# ---------------------------------------------------------------------------------------------------------------
# threshold rule vs brute force


def ref_threshold_row(conf: list[float], masked: list[bool], threshold: float, quota: int) -> set[int]:
    """docs/design.md 6.2 per row: masked positions with confidence > threshold; if fewer than `quota` pass, the
    `quota` most confident masked positions instead (ties: lower index first)."""
    cand = [i for i, m in enumerate(masked) if m]
    passing = {i for i in cand if conf[i] > threshold}
    if len(passing) >= quota:
        return passing
    return set(sorted(cand, key=lambda i: (-conf[i], i))[:quota])


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("quota", [1, 2, 3])
def test_threshold_rule_matches_bruteforce(threshold, quota):
    g = torch.Generator().manual_seed(int(threshold * 100) * 10 + quota)
    for _ in range(20):
        conf = torch.rand(4, 8, generator=g)
        masked = torch.rand(4, 8, generator=g) < 0.6
        masked[0] = False  # nothing left to commit
        masked[1] = True
        conf[1] = 0.5 + 0.5 * conf[1] if threshold < 0.5 else torch.full((8,), 1.0)  # every masked slot passes
        conf[2, :4] = conf[2, 4]  # ties
        masked[3, :] = False
        masked[3, :2] = True  # fewer masked slots than a quota of 3
        got = threshold_rule(conf, masked, threshold, quota)
        assert got.shape == (4, 8) and got.dtype == torch.bool
        for r in range(4):
            want = ref_threshold_row(conf[r].tolist(), masked[r].tolist(), threshold, quota)
            assert set(torch.nonzero(got[r]).flatten().tolist()) == want, (r, conf[r], masked[r])
        assert not got[0].any()
        assert not (got & ~masked).any()


def test_choose_tokens_argmax_and_confidence():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    tok, conf = choose_tokens(logits, 0.0)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(conf, torch.softmax(logits, -1).max(-1).values)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t1, c1 = choose_tokens(logits, 1.0, g1)
    t2, c2 = choose_tokens(logits, 1.0, g2)
    assert torch.equal(t1, t2) and torch.equal(c1, c2)
    torch.testing.assert_close(c1, torch.softmax(logits, -1).gather(-1, t1[..., None])[..., 0])


# ---------------------------------------------------------------------------------------------------------------
# exact KV cache vs no-cache reference


@pytest.mark.parametrize("block_size", [4, 8])
def test_cached_block_logits_equal_uncached(bd, block_size):
    model, mask_id, _ = bd
    B = block_size
    prompt = make_prompt(2 * B + 3, seed=1, high=mask_id)
    lo, hi = 2 * B, 3 * B
    canvas = torch.tensor([prompt + [mask_id] * (hi - len(prompt))])
    with torch.no_grad():
        full = model(canvas, positions=torch.arange(hi)[None],
                     mask=dense_mask("block_causal", seq_len=hi, block_size=B))
        cache = KVCache(model.cfg, 1, hi)
        model(canvas[:, :lo], positions=torch.arange(lo)[None],
              mask=dense_mask("block_causal", seq_len=lo, block_size=B), cache=cache)
        cache.commit(lo)
        for _ in range(2):  # a block's slots are overwritten by each denoising step, never appended
            cached = model(canvas[:, lo:hi], positions=torch.arange(lo, hi)[None], mask=None, cache=cache)
            assert cache.length == lo
            torch.testing.assert_close(cached, full[:, lo:hi], atol=1e-5, rtol=0)


# prompt lengths: mid-block for both B, exactly at a block boundary (8 = 2x4 = 1x8), longer than a block
PROMPT_LENGTHS = [3, 8, 13]


@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.95, 1.0])
def test_block_generate_equals_no_cache_reference(bd, block_size, threshold):
    model, mask_id, eos_id = bd
    model = tiebroken(model)
    cfg = BlockDecodeConfig(block_size=block_size, steps=block_size, threshold=threshold, max_new_tokens=19)
    spread = set()
    for n in PROMPT_LENGTHS:
        for eos_ids in ([], [eos_id]):  # without EOS: full length; with: whatever the model emits
            prompt = make_prompt(n, seed=n, high=mask_id)
            ref = reference_generate(model, prompt, cfg, mask_id=mask_id, eos_ids=eos_ids, early_exit=True)
            gen = block_generate(model, prompt, cfg, mask_id=mask_id, eos_ids=eos_ids)
            assert gen.tokens == ref.tokens, (n, eos_ids)
            assert gen.n_generated == ref.n_generated
            assert gen.steps_per_block == ref.steps_per_block
            # Same denoising forwards; the cached engine adds one cache-writing forward per finished block
            # except the last (docs/design.md 6.1), and counts it.
            assert gen.forwards == ref.forwards + len(ref.steps_per_block) - 1
            spread.add(tuple(ref.steps_per_block))
    if threshold == 1.0:  # only the fallback commits: exactly one token per step
        # (the last block may stop early once the output before EOS / the budget is final)
        assert all(s == block_size for steps in spread for s in steps[1:-1])
        assert all(steps[-1] <= block_size for steps in spread)
    if threshold == 0.0:  # every masked slot passes at once
        assert all(s == 1 for steps in spread for s in steps)


def test_thresholds_trade_forwards_for_confidence(bd):
    """Sanity that the sharpened model makes the thresholds differ (else the equivalence above is weak)."""
    model, mask_id, _ = bd
    model = tiebroken(model)
    prompt = make_prompt(5, seed=0, high=mask_id)
    fwd = [block_generate(model, prompt, BlockDecodeConfig(block_size=8, steps=8, threshold=t, max_new_tokens=32),
                          mask_id=mask_id, eos_ids=[]).forwards for t in (0.0, 0.5, 0.95, 1.0)]
    assert fwd == sorted(fwd) and fwd[0] < fwd[1] < fwd[-1], fwd


# ---------------------------------------------------------------------------------------------------------------
# AR decoding


@pytest.mark.parametrize("n_prompt", [1, 7])
def test_ar_generate_equals_greedy_full_recompute(ar, n_prompt):
    model, eos_id = ar
    prompt = make_prompt(n_prompt, seed=n_prompt, high=model.cfg.vocab_size)
    gen = ar_generate(model, prompt, max_new_tokens=20, eos_ids=[])
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            L = len(ids)
            logits = model(torch.tensor([ids]), positions=torch.arange(L)[None], mask=dense_mask("causal", seq_len=L))
            ids.append(int(logits[0, -1].argmax()))
    assert gen.tokens == ids[n_prompt:]
    assert gen.n_generated == gen.forwards == 20 and gen.tpf == 1.0 and not gen.finished


def test_ar_generate_stops_at_eos(ar):
    model, _ = ar
    prompt = make_prompt(4, seed=2, high=model.cfg.vocab_size)
    full = ar_generate(model, prompt, max_new_tokens=12, eos_ids=[]).tokens
    stop = full[5]  # call the 6th token EOS
    first = full.index(stop)
    gen = ar_generate(model, prompt, max_new_tokens=12, eos_ids=[stop])
    assert gen.tokens == full[:first] and gen.n_generated == first + 1 and gen.finished
    assert gen.forwards == first + 1 and gen.tpf == 1.0


# ---------------------------------------------------------------------------------------------------------------
# sampling


def test_temperature_zero_deterministic_and_seeded_sampling_reproducible(bd, tiny_ar_dir):
    model, mask_id, _ = bd
    prompt = make_prompt(6, seed=4, high=mask_id)
    cfg0 = BlockDecodeConfig(block_size=8, steps=8, threshold=0.9, max_new_tokens=24)
    a = block_generate(model, prompt, cfg0, mask_id=mask_id, eos_ids=[])
    b = block_generate(model, prompt, cfg0, mask_id=mask_id, eos_ids=[])
    assert a.tokens == b.tokens and a.forwards == b.forwards
    cfg1 = BlockDecodeConfig(block_size=8, steps=8, threshold=0.9, max_new_tokens=24, temperature=1.0)

    def sample(seed):
        return block_generate(model, prompt, cfg1, mask_id=mask_id, eos_ids=[],
                              generator=torch.Generator().manual_seed(seed)).tokens

    assert sample(0) == sample(0)
    assert len({tuple(sample(s)) for s in range(4)}) > 1  # the seed matters
    armodel = load_pretrained(tiny_ar_dir).eval()  # unsharpened: near-uniform logits, so sampling visibly varies

    def ar_sample(seed):
        return ar_generate(armodel, prompt, max_new_tokens=12, eos_ids=[], temperature=1.0,
                           generator=torch.Generator().manual_seed(seed)).tokens

    assert ar_sample(1) == ar_sample(1)
    assert len({tuple(ar_sample(s)) for s in range(3)}) > 1
    g = ar_generate(armodel, prompt, max_new_tokens=12, eos_ids=[])
    assert g.tokens == ar_generate(armodel, prompt, max_new_tokens=12, eos_ids=[]).tokens


# ---------------------------------------------------------------------------------------------------------------
# invariants


@pytest.mark.parametrize("n_prompt,threshold", [(3, 0.95), (8, 1.0), (13, 0.5)])
def test_commits_are_final_and_prompt_is_fixed(bd, n_prompt, threshold):
    model, mask_id, _ = bd
    B = 8
    spy = Spy(Spy(tiebroken(model), disagree))
    prompt = make_prompt(n_prompt, seed=n_prompt + 1, high=mask_id)
    gen = block_generate(spy, prompt, BlockDecodeConfig(block_size=B, steps=B, threshold=threshold, max_new_tokens=21),
                         mask_id=mask_id, eos_ids=[])
    assert len(spy.calls) == gen.forwards + (1 if n_prompt >= B else 0)  # + the prefill
    blocks: dict[int, list[list[int]]] = {}  # block start -> the block's ids at each of its forwards
    for ids, pos in spy.calls:
        for i, p in enumerate(pos):
            if p < n_prompt:
                assert ids[i] == prompt[p]  # prompt tokens are never altered
        if len(ids) == B:
            blocks.setdefault(pos[0], []).append(ids)
    for lo, seen in blocks.items():
        for before, after in zip(seen, seen[1:]):
            assert all(x == mask_id or x == y for x, y in zip(before, after))  # a committed token never changes
            assert after.count(mask_id) < before.count(mask_id)  # every step commits something
    *finished, last = sorted(blocks)
    for lo in finished:  # each finished block ends with its cache-writing forward, which holds no [MASK]
        assert mask_id not in blocks[lo][-1]
    assert blocks[last][-1].count(mask_id) >= 1  # the last block stops at its last denoising step


@pytest.mark.parametrize("max_new", [1, 5, 8, 13])
def test_max_new_tokens_respected(bd, ar, max_new):
    model, mask_id, _ = bd
    for n in (3, 8):
        prompt = make_prompt(n, seed=9, high=mask_id)
        spy = Spy(model)
        cfg = BlockDecodeConfig(block_size=4, steps=4, threshold=0.5, max_new_tokens=max_new)
        gen = block_generate(spy, prompt, cfg, mask_id=mask_id, eos_ids=[])
        assert len(gen.tokens) == gen.n_generated == max_new and not gen.finished
        last_block_end = 4 * math.ceil((n + max_new) / 4)
        assert max(max(pos) for _, pos in spy.calls) < last_block_end  # no block past the budget
    armodel, _ = ar
    g = ar_generate(armodel, [1, 2, 3], max_new_tokens=max_new, eos_ids=[])
    assert len(g.tokens) == g.n_generated == g.forwards == max_new


@pytest.mark.parametrize("n_prompt,k", [(3, 0), (3, 6), (8, 9), (13, 2)])
def test_eos_trims_and_stops_after_its_block(bd, n_prompt, k):
    model, mask_id, eos_id = bd
    B = 4
    at = n_prompt + k  # absolute position of the forced EOS (k-th generated token)
    spy = Spy(tiebroken(model), force(eos_id, at))
    prompt = make_prompt(n_prompt, seed=k, high=mask_id)
    cfg = BlockDecodeConfig(block_size=B, steps=B, threshold=0.9, max_new_tokens=40)
    gen = block_generate(spy, prompt, cfg, mask_id=mask_id, eos_ids=[eos_id])
    assert gen.finished and len(gen.tokens) == k and gen.n_generated == k + 1
    assert eos_id not in gen.tokens
    eos_block_end = (at // B + 1) * B
    assert max(max(pos) for _, pos in spy.calls) < eos_block_end  # no forward after the block holding EOS
    assert gen.forwards == sum(gen.steps_per_block) + len(gen.steps_per_block) - 1
    # the no-cache reference on the same (EOS-forced) model agrees
    ref = reference_generate(Spy(tiebroken(model), force(eos_id, at)), prompt, cfg, mask_id=mask_id,
                             eos_ids=[eos_id], early_exit=True)
    assert gen.tokens == ref.tokens and gen.n_generated == ref.n_generated


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mask_token_never_emitted(bd, temperature):
    model, mask_id, eos_id = bd
    spy = Spy(model, force(eos_id, None, boost_id=mask_id))  # the model "wants" to emit [MASK] everywhere
    prompt = make_prompt(5, seed=5, high=mask_id)
    gen = block_generate(spy, prompt, BlockDecodeConfig(block_size=8, steps=8, threshold=0.5, max_new_tokens=20,
                                                        temperature=temperature),
                         mask_id=mask_id, eos_ids=[eos_id], generator=torch.Generator().manual_seed(0))
    assert len(gen.tokens) == 20 and mask_id not in gen.tokens


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input(bd, ar):
    model, mask_id, eos_id = bd
    with pytest.raises(ValueError, match="prompt"):
        block_generate(model, [], BlockDecodeConfig(block_size=4), mask_id=mask_id, eos_ids=[eos_id])
    with pytest.raises(ValueError, match="prompt"):
        ar_generate(ar[0], [], max_new_tokens=4, eos_ids=[])
    for kw in ({"block_size": 0}, {"steps": 0}, {"max_new_tokens": 0}, {"threshold": 1.5}, {"threshold": -0.1}):
        with pytest.raises(ValueError):
            BlockDecodeConfig(**kw)
    assert [BlockDecodeConfig(block_size=8, steps=3).quota_at(i) for i in range(3)] == [3, 3, 2]  # official: not ceil
    assert {BlockDecodeConfig(block_size=32, steps=32).quota_at(i) for i in range(32)} == {1}
    cache = KVCache(model.cfg, 1, 6)
    k = torch.zeros(1, model.cfg.num_kv_heads, 4, model.cfg.head_dim)
    cache.update(0, k, k)
    cache.commit(4)
    with pytest.raises(ValueError, match=r"KV cache overflow: 8 tokens > capacity 6"):
        cache.update(0, k, k)
    with pytest.raises(ValueError, match="cannot commit"):
        cache.commit(3)
