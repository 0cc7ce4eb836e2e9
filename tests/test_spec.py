"""Mode spec (decode/spec.py) is lossless: at temperature 0 its output is token for token the same checkpoint's AR
greedy output (`ar_generate`, an independent decoder: one token per forward, no drafts, no masks), at batch 1,
batched, with rows joining mid-flight and beside block-mode rows; the cache it keeps after a rejected draft is the
cache of an AR run that never saw the draft; at temperature > 0 its samples follow the AR sampling distribution
(a chi-square test on a tiny vocabulary, with a control that shows the test catches an acceptance rule that keeps
every draft). Two models: the tie-broken random `bd` fixture (drafts nearly always rejected: every rejection path)
and the bundled `assets/tiny-bd` on held-out task prompts (drafts mostly accepted)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from decode_helpers import make_prompt, tiebroken, with_alignment

from blockdiff.data.tasks import generate_examples
from blockdiff.decode import spec as spec_mod
from blockdiff.decode.cache import KVCache
from blockdiff.decode.engine import DecodeConfig, ar_generate, generate, stream
from blockdiff.decode.scheduler import Scheduler
from blockdiff.load import load_checkpoint
from blockdiff.model.config import DiffusionInfo, ModelConfig
from blockdiff.model.masks import dense_mask
from blockdiff.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def shifted(bd):  # function scope: the Spy counts its forwards per test
    inner, mask_id, eos_id = bd
    return with_alignment(tiebroken(inner), "shift", "causal"), mask_id, eos_id


@pytest.fixture(scope="module")
def bundled():
    return load_checkpoint(REPO / "assets/tiny-bd")


def ar_tokens(model, prompt, n, eos):
    return ar_generate(model, prompt, max_new_tokens=n, eos_ids=eos).tokens


# --------------------------------------------------------------------------------------------- greedy == AR
@pytest.mark.parametrize("draft_len", [0, 1, 3, 6])
def test_spec_equals_ar_greedy_random_model(shifted, draft_len):
    """Random drafts: nearly every draft is rejected, so every rejection position and the drafts-dropped path run."""
    model, mask_id, eos_id = shifted
    cfg = DecodeConfig(mode="spec", draft_len=draft_len, max_new_tokens=21, block_size=8)
    prompts = [make_prompt(n, seed=70 + n, high=mask_id) for n in (1, 2, 5, 9, 16)]
    batch = generate(model, prompts, cfg, mask_id=mask_id, eos_ids=[eos_id])
    for p, g in zip(prompts, batch):
        assert g.tokens == ar_tokens(model, p, 21, [eos_id])
        assert g.tokens == generate(model, [p], cfg, mask_id=mask_id, eos_ids=[eos_id])[0].tokens
        if draft_len == 0:  # no drafts: plain AR steps, one token per forward (the prefill's included)
            assert g.forwards == g.n_generated and g.drafted == 0


def test_spec_equals_ar_greedy_bundled(bundled):
    """The converted checkpoint on held-out task prompts: drafts are mostly right, so long accepted runs, EOS inside
    accepted drafts and the budget inside a run all occur; batched and alone equal the AR output."""
    tok = bundled.tokenizer
    prompts = [tok.encode(e.prompt) for e in generate_examples("heldout", 24, seed=5)]
    ar = bundled.generate(prompts, ar=True, max_new_tokens=16)
    for d in (2, 4):
        cfg = bundled.decode_config(mode="spec", draft_len=d, max_new_tokens=16, spec_tokens=1024)
        got = bundled.generate(prompts, cfg)
        assert [g.tokens for g in got] == [a.tokens for a in ar]
        assert [g.stop_reason for g in got] == [a.stop_reason for a in ar]
        assert sum(g.accepted for g in got) > 0.4 * sum(g.drafted for g in got)  # drafts did get accepted
        assert sum(g.n_generated for g in got) > 1.2 * sum(g.forwards for g in got)
    # spec_tokens too small for any draft (2 = a pending token and one mask per row): plain AR steps, same output
    got = bundled.generate(prompts, bundled.decode_config(mode="spec", max_new_tokens=16, spec_tokens=2))
    assert [g.tokens for g in got] == [a.tokens for a in ar]
    assert all(g.drafted == 0 and g.forwards == g.n_generated for g in got)
    code = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n"
    p = tok.encode(code)
    cfg = bundled.decode_config(mode="spec", draft_len=3, max_new_tokens=40, ignore_eos=True)
    g = bundled.generate([p], cfg)[0]
    assert len(g.tokens) == 40 and g.tokens == ar_tokens(bundled.model, p, 40, [])


def test_spec_rows_joining_mid_flight_beside_block_rows(shifted):
    """Spec rows join a running batch of S / threshold rows between steps: each row decodes what it decodes alone,
    and spec rows equal AR."""
    model, mask_id, eos_id = shifted
    cfgs = [DecodeConfig(mode="spec", block_size=4, draft_len=3, max_new_tokens=13),
            DecodeConfig(mode="S", block_size=4, steps=4, max_new_tokens=11),
            DecodeConfig(mode="spec", block_size=4, draft_len=1, max_new_tokens=9),
            DecodeConfig(mode="threshold", block_size=4, steps=4, max_new_tokens=10),
            DecodeConfig(mode="spec", block_size=4, draft_len=5, max_new_tokens=12)]
    prompts = [make_prompt(3 + 4 * k, seed=90 + k, high=mask_id) for k in range(len(cfgs))]
    sched = Scheduler(model, mask_id=mask_id, block_size=4, max_rows=8, max_len=64)
    joins, done, step, widths = [0, 0, 2, 3, 5], {}, 0, []
    todo = sorted(zip(joins, range(len(cfgs))))
    while todo or not sched.idle:
        while todo and todo[0][0] <= step:
            _, k = todo.pop(0)
            sched.add(k, prompts[k], cfgs[k], eos_ids=[eos_id])
        widths.append(len(sched.rows) + len(sched.pending))
        done.update(dict(sched.step().finished))
        step += 1
    assert max(widths) >= 3  # rows of both kinds were in flight together
    for k, (p, c) in enumerate(zip(prompts, cfgs)):
        assert done[k].tokens == generate(model, [p], c, mask_id=mask_id, eos_ids=[eos_id])[0].tokens
        if c.mode == "spec":
            assert done[k].tokens == ar_tokens(model, p, c.max_new_tokens, [eos_id])


def test_spec_stream_events_rebuild_the_output(shifted):
    model, mask_id, eos_id = shifted
    cfg = DecodeConfig(mode="spec", block_size=8, draft_len=3, max_new_tokens=15)
    prompts = [make_prompt(6, seed=3, high=mask_id), make_prompt(11, seed=4, high=mask_id)]
    canvases: dict[int, dict[int, int]] = {0: {}, 1: {}}
    final = None
    for item in stream(model, prompts, cfg, mask_id=mask_id, eos_ids=[eos_id]):
        if isinstance(item, list):
            final = item
            continue
        assert all(e.kind in ("ar", "draft") for e in item.events) and item.n_final == len(item.tokens)
        for e in item.events:
            assert e.pos not in canvases[item.row]  # a committed token is never rewritten
            canvases[item.row][e.pos] = e.token
    for r, g in enumerate(final):
        P = len(prompts[r])
        assert [canvases[r][P + i] for i in range(len(g.tokens))] == g.tokens


def test_spec_budget_eos_and_stop(bundled):
    tok = bundled.tokenizer
    p = tok.encode(generate_examples("heldout", 1, seed=9)[0].prompt)
    ar = bundled.generate([p], ar=True, max_new_tokens=32)[0]
    for budget in (1, 2, len(ar.tokens)):  # the budget can end a row inside an accepted run
        cfg = bundled.decode_config(mode="spec", max_new_tokens=budget)
        g = bundled.generate([p], cfg)[0]
        assert g.tokens == ar.tokens[:budget] and g.n_generated <= budget
    g = bundled.generate([p], bundled.decode_config(mode="spec", max_new_tokens=32))[0]
    assert g.stop_reason == "eos" and g.n_generated == len(g.tokens) + 1 == ar.n_generated
    code = tok.encode("def add(a, b):\n    return a + b\n\n\ndef ")
    full = bundled.generate([code], bundled.decode_config(mode="spec", max_new_tokens=30, ignore_eos=True))[0]
    text = tok.decode(full.tokens)
    stop = text[5:8]
    g = bundled.generate([code], bundled.decode_config(mode="spec", max_new_tokens=30, ignore_eos=True), stop=[stop])[0]
    assert g.stop_reason == "stop" and stop in tok.decode(g.tokens) and stop not in tok.decode(g.tokens[:-1])


# --------------------------------------------------------------------------------------------- the cache
def test_cache_after_rejected_draft_equals_ar_cache(shifted):
    """After spec steps with rejected drafts (random model), the committed K/V equal those of an AR prefill of the
    committed tokens (which never saw a draft or a mask): the rejected drafts' and the masks' slots left nothing."""
    model, mask_id, eos_id = shifted
    prompt = make_prompt(7, seed=11, high=mask_id)
    cfg = DecodeConfig(mode="spec", block_size=8, draft_len=4, max_new_tokens=40, ignore_eos=True)
    sched = Scheduler(model, mask_id=mask_id, block_size=8, max_rows=1, max_len=64)
    row = sched.add(0, prompt, cfg, eos_ids=[eos_id])
    rejected = 0
    for _ in range(6):
        before = row.drafted - row.accepted
        sched.step()
        rejected += (row.drafted - row.accepted) > before
    assert rejected >= 2
    n = sched.cache.lengths[0]
    tokens = row.canvas[:n][None]
    ref = KVCache(model.cfg, 1, n)
    model(tokens, positions=torch.arange(n)[None], mask=dense_mask("causal", seq_len=n), cache=ref)
    for layer in range(model.cfg.num_layers):
        torch.testing.assert_close(sched.cache.k[layer][:1, :, :n], ref.k[layer], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(sched.cache.v[layer][:1, :, :n], ref.v[layer], atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- sampling
def tiny_vocab_model(V: int = 6) -> Transformer:
    """A random model over V tokens + [MASK] whose causal and noisy streams disagree (so q != p)."""
    cfg = ModelConfig(vocab_size=V + 1, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=16, max_position_embeddings=64,
                      diffusion=DiffusionInfo(mask_token_id=V, block_size=4, labels="shift", clean_stream="causal"))
    model = Transformer(cfg)
    model.init_weights(std=0.5, seed=3)
    return model.eval()


def sample_counts(model, n: int, draft_len: int, seed: int, spec: bool) -> dict[tuple[int, ...], int]:
    V = model.cfg.vocab_size - 1
    g = torch.Generator().manual_seed(seed)
    prompt, counts = [1, 2], {}
    if spec:
        cfg = DecodeConfig(mode="spec", block_size=4, draft_len=draft_len, max_new_tokens=3, temperature=1.0,
                           spec_tokens=4096,
                           ignore_eos=True)
        outs = []
        for _ in range(n // 500):
            outs += [x.tokens for x in generate(model, [prompt] * 500, cfg, mask_id=V, eos_ids=[], generator=g)]
    else:
        outs = [ar_generate(model, prompt, max_new_tokens=3, eos_ids=[], temperature=1.0, generator=g).tokens
                for _ in range(n)]
    for o in outs:
        counts[tuple(o[1:3])] = counts.get(tuple(o[1:3]), 0) + 1  # tokens 2 and 3: both come from drafts
    return counts


def chi2_p(a: dict, b: dict) -> float:
    """Two-sample chi-square test of homogeneity; returns the p-value (Wilson-Hilferty approximation)."""
    keys = [k for k in set(a) | set(b) if a.get(k, 0) + b.get(k, 0) >= 5]
    na, nb = sum(a.get(k, 0) for k in keys), sum(b.get(k, 0) for k in keys)
    stat = 0.0
    for k in keys:
        tot = a.get(k, 0) + b.get(k, 0)
        for obs, n in ((a.get(k, 0), na), (b.get(k, 0), nb)):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    df = len(keys) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_spec_sampling_matches_ar_distribution(monkeypatch):
    model = tiny_vocab_model()
    n = 3000
    ar = sample_counts(model, n, 0, seed=1, spec=False)
    sp = sample_counts(model, n, 2, seed=2, spec=True)
    assert chi2_p(ar, sp) > 1e-3
    # the control: a rule that keeps every draft (no p/q test) samples tokens 2-3 from the noisy stream, and the
    # same test rejects it -- so the test above can fail
    real = spec_mod.SpecRow._sample

    def keep_all(self, logits, c, m, k):
        torch_rand = torch.rand
        monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.zeros(*a[:1]))
        try:
            return real(self, logits, c, m, k)
        finally:
            monkeypatch.setattr(torch, "rand", torch_rand)

    monkeypatch.setattr(spec_mod.SpecRow, "_sample", keep_all)
    wrong = sample_counts(model, n, 2, seed=2, spec=True)
    assert chi2_p(ar, wrong) < 1e-6


# --------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("labels,clean", [("same", "block_causal"), ("shift", "block_causal"), ("same", "causal")])
def test_spec_refuses_checkpoints_without_a_causal_ar_stream(bd, labels, clean):
    inner, mask_id, eos_id = bd
    model = with_alignment(inner, labels, clean)
    with pytest.raises(ValueError, match='mode "spec" needs a checkpoint with labels "shift" and clean_stream'):
        generate(model, [[1, 2, 3]], DecodeConfig(mode="spec", max_new_tokens=4), mask_id=mask_id, eos_ids=[eos_id])


def test_draft_len_range():
    with pytest.raises(ValueError, match="draft_len must be in"):
        DecodeConfig(mode="spec", draft_len=-1)
    with pytest.raises(ValueError, match="draft_len must be in"):
        DecodeConfig(mode="spec", draft_len=1000)


# --------------------------------------------------------------------------------------------- windows
@torch.no_grad()
def window_reference(model, prompt, W, tau, budget, mask_id, eos):
    """A plain no-cache decoder of the threshold rule in a sliding window (decode/window.py), written per position:
    every step recomputes [decided prefix (causal) | window (bidirectional)] from scratch, reads slot 0 from the
    causal logit before the window and slot j from the window's logit j - 1, takes the frontier slot (AR step) and
    every masked slot with confidence > tau."""
    canvas = list(prompt) + [mask_id] * budget
    f, P, forwards = len(prompt), len(prompt), 0
    while True:
        w = min(W, P + budget - f)
        ids = torch.tensor([canvas[:f + w]])
        L = f + w
        mask = torch.zeros(1, 1, L, L, dtype=torch.bool)
        for q in range(L):
            for k in range(L):
                mask[0, 0, q, k] = k <= q if q < f else True
        logits = model(ids, positions=torch.arange(L)[None], mask=mask)[0]
        forwards += 1
        logits[:, mask_id] = float("-inf")
        probs = torch.softmax(logits.float(), -1)
        for j in range(w):
            if canvas[f + j] != mask_id:
                continue
            p = probs[f - 1 + j]
            if j == 0 or float(p.max()) > tau:
                canvas[f + j] = int(p.argmax())
        while f < P + budget and canvas[f] != mask_id:
            f += 1
        gen = canvas[P:f]
        if any(t in eos for t in gen) or f - P >= budget:
            cut = next((i for i, t in enumerate(gen) if t in eos), None)
            return (gen[:cut] if cut is not None else gen), forwards


@pytest.mark.parametrize("W", [1, 3, 6])
def test_window_equals_no_cache_reference(shifted, W):
    model, mask_id, eos_id = shifted
    parallel = 0
    for n in (1, 4, 9):
        p = make_prompt(n, seed=130 + n, high=mask_id)
        cfg = DecodeConfig(mode="threshold", threshold=0.3, window=W, block_size=8, max_new_tokens=14)
        g = generate(model, [p], cfg, mask_id=mask_id, eos_ids=[eos_id])[0]
        ref, forwards = window_reference(model, p, W, 0.3, 14, mask_id, {eos_id})
        assert g.tokens == ref and g.forwards == forwards
        parallel += g.n_generated > g.forwards
    assert W == 1 or parallel  # some forward committed more than the frontier token


@pytest.mark.parametrize("mode", ["threshold", "S", "Q", "credit", "factor", "dinfer"])
def test_window_rows_batched_and_mid_flight_equal_alone(shifted, mode):
    model, mask_id, eos_id = shifted
    cfg = DecodeConfig(mode=mode, window=4, block_size=4, steps=4, max_new_tokens=13)
    prompts = [make_prompt(n, seed=150 + n, high=mask_id) for n in (2, 7, 12)]
    alone = [generate(model, [p], cfg, mask_id=mask_id, eos_ids=[eos_id])[0] for p in prompts]
    batch = generate(model, prompts, cfg, mask_id=mask_id, eos_ids=[eos_id])
    assert [g.tokens for g in batch] == [g.tokens for g in alone]
    assert [g.forwards for g in batch] == [g.forwards for g in alone]
    sched = Scheduler(model, mask_id=mask_id, block_size=4, max_rows=4, max_len=64)
    spec_cfg = DecodeConfig(mode="spec", block_size=4, max_new_tokens=10)
    sched.add(9, prompts[0], spec_cfg, eos_ids=[eos_id])
    sched.add(8, prompts[1], DecodeConfig(mode="S", block_size=4, steps=4, max_new_tokens=9), eos_ids=[eos_id])
    done = dict(sched.step().finished)
    for k, p in enumerate(prompts):  # window rows join a running batch of a spec row and a block row
        sched.add(k, p, cfg, eos_ids=[eos_id])
    while not sched.idle:
        done.update(dict(sched.step().finished))
    assert [done[k].tokens for k in range(3)] == [g.tokens for g in alone]
    assert done[9].tokens == ar_tokens(model, prompts[0], 10, [eos_id])


def test_window_refuses_checkpoints_without_a_causal_stream(bd):
    inner, mask_id, eos_id = bd
    with pytest.raises(ValueError, match='window > 0 needs a checkpoint with labels "shift"'):
        generate(inner, [[1, 2, 3]], DecodeConfig(window=4, max_new_tokens=4), mask_id=mask_id, eos_ids=[eos_id])
    with pytest.raises(ValueError, match="window must be >= 0"):
        DecodeConfig(window=-1)


# --------------------------------------------------------------------------------------------- the CLI
def test_cli_spec_prints_the_ar_text_and_traces_drafts(tmp_path):
    """`blockdiff generate --mode spec` prints what `generate --ar` prints on the bundled model, and its trace shows
    the accepted drafts and AR tokens of each step (show-trace)."""
    from cli_helpers import run_cli

    model = REPO / "assets/tiny-bd"
    args = ["generate", "--model", model, "--prompt", "sort 9 9 2 3 5 9=", "--max-new-tokens", 16]
    code, ar_out, err = run_cli(args + ["--ar"])
    assert code == 0, err
    trace = tmp_path / "t.jsonl"
    code, spec_out, err = run_cli(args + ["--mode", "spec", "--draft-len", 3, "--trace", trace])
    assert code == 0, err
    assert spec_out == ar_out
    code, shown, err = run_cli(["show-trace", trace])
    assert code == 0, err
    steps = [line for line in shown.splitlines() if line.startswith("step")]
    assert steps and all(" ar | " in line for line in steps) and any("+0 draft" not in line for line in steps)


def test_draft_policy_drafts_while_it_pays_and_backs_off_its_probes():
    """One decision per forward: rows whose acceptance pays for the drafting forward draft (d = their share of
    spec_tokens, capped by draft_len); otherwise AR steps, with probes after 8, 16, 32, 64, 64 ... AR steps; the
    prior of new rows follows what was verified."""
    from types import SimpleNamespace

    def rows(alpha, n, **kw):
        cfg = DecodeConfig(mode="spec", **kw)
        return [SimpleNamespace(cfg=cfg, rule=cfg.decode_rule, alpha=alpha) for _ in range(n)]

    pol = spec_mod.DraftPolicy()
    assert pol.drafts(rows(0.9, 1)) == 3 and pol.drafts(rows(0.9, 4)) == 3  # 32 tokens: d = 3 up to 4 rows
    assert pol.drafts(rows(0.9, 8)) == 1 and pol.drafts(rows(0.9, 16)) == 0
    assert pol.drafts(rows(0.9, 1, draft_len=2)) == 2
    low = rows(0.1, 2)
    taken = [pol.drafts(low) for _ in range(300)]
    probes = [i for i, d in enumerate(taken) if d]
    assert [b - a for a, b in zip(probes, probes[1:])][:5] == [16, 32, 64, 64, 64] and probes[0] == 7
    assert pol.drafts(rows(0.1, 2, draft_cost=0.0)) == 3  # draft_cost 0: always draft
    for _ in range(20):
        pol.observe(0, 3)
    assert pol.alpha < 0.01
