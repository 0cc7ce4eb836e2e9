"""The batched engine: cached engine == no-cache reference decoder (threshold, S, Q), a row in a batch == the row
alone (every mode), finished rows leave the batch, LLaDA2.1 editing invariants (prompt never edited, committed
slots never re-masked, post-edit budget), the new rules against brute force, stop strings, streaming and trace.

Models: the `bd` fixture (conftest.py: tiny random diffusion model with logits x20) wrapped by `tiebroken`
(decode_helpers.py) so every decision has a margin far above the cached-vs-uncached rounding.
"""

from __future__ import annotations

import json

import pytest
import torch
from decode_helpers import ALIGNMENTS, Spy, disagree, force, make_prompt, skip_unsupported, tiebroken, with_alignment
from torch import nn

from blockdiff.decode.engine import DecodeConfig, MODES, generate, stream
from blockdiff.decode.reference import reference_generate
from blockdiff.decode.rules import choose_tokens, dinfer_threshold_rule, factor_rule, joint_rule
from blockdiff.decode.trace import TraceWriter, read_trace

LENGTHS = [3, 8, 13, 20]


class BatchSpy(nn.Module):
    """Records the batch size and positions of every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.cfg = inner, inner.cfg
        self.shapes: list[tuple[int, int]] = []

    def forward(self, input_ids, positions=None, mask=None, *, cache=None):
        self.shapes.append(tuple(input_ids.shape))
        return self.inner(input_ids, positions=positions, mask=mask, cache=cache)


def neighbour_bias(block_size: int, strength: float = 30.0, base: int = 0):
    """Context-dependent logits: each position leans toward a token that depends on its left neighbour inside the
    same block (once that neighbour is unmasked; blocks start at `base` + k B). Unmasking a slot then changes its right neighbour's argmax, so
    T2T edits happen and then settle, the same in a block window (engine) and a whole-prefix window (reference)."""

    def edit(logits, positions, ids):
        mask_id = logits.shape[-1] - 1
        logits = logits.clone()
        left = torch.cat([torch.full_like(ids[:, :1], mask_id), ids[:, :-1]], dim=1)
        ok = ((positions - base) % block_size != 0) & (left != mask_id)  # blocks start at base + k * block_size
        target = (left * 7 + 3) % mask_id
        logits.scatter_add_(-1, target[..., None], (ok.float() * strength)[..., None])
        return logits

    return edit


# ---------------------------------------------------------------------------------------------------------------
# engine == reference


@pytest.mark.parametrize("mode,penalty", [("threshold", 0.0), ("S", 0.0), ("Q", 0.0), ("S", 3.0)])
@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("labels,clean", ALIGNMENTS)
@pytest.mark.parametrize("steps", [None, 3])
def test_engine_equals_reference(bd, mode, penalty, block_size, labels, clean, steps):
    """In every label alignment (docs/alignment.md), with steps = B and with a B % steps != 0 fallback schedule.
    Prompts ending on a block boundary take slot 0 from the carry."""
    inner, mask_id, eos_id = bd
    cfg = DecodeConfig(mode=mode, block_size=block_size, steps=steps or block_size, max_new_tokens=19,
                       repeat_penalty=penalty)
    n_edits = 0
    for n in LENGTHS + [block_size, 2 * block_size]:
        base = n % block_size if clean == "causal" else 0  # causal clean stream: blocks start after the prompt
        model = with_alignment(Spy(tiebroken(inner), neighbour_bias(block_size, base=base)), labels, clean)
        for eos_ids in ([], [eos_id]):
            prompt = make_prompt(n, seed=n, high=mask_id)
            ref = reference_generate(model, prompt, cfg, mask_id=mask_id, eos_ids=eos_ids)
            gen = generate(model, [prompt], cfg, mask_id=mask_id, eos_ids=eos_ids)[0]
            assert gen.tokens == ref.tokens, (n, eos_ids)
            assert gen.n_generated == ref.n_generated and gen.stop_reason == ref.stop_reason
            assert gen.edits == ref.edits
            writes = len(ref.steps_per_block) - 1  # cache-writing forwards of the blocks before the last
            if cfg.edits and clean == "block_causal":  # the finishing pass doubles as the cache write
                assert gen.steps_per_block == ref.steps_per_block and gen.forwards == ref.forwards
            elif cfg.edits:  # a causal clean stream costs one cache-writing forward per finished block
                assert gen.steps_per_block == ref.steps_per_block and gen.forwards == ref.forwards + writes
            else:  # + one cache-writing forward per finished block; the last block may stop early
                assert gen.steps_per_block[:-1] == ref.steps_per_block[:-1]
                assert gen.steps_per_block[-1] <= ref.steps_per_block[-1]
                assert gen.forwards <= ref.forwards + writes
            n_edits += gen.edits
    if mode == "S":
        assert n_edits > 0  # tau_edit 0 edits on this model: the equivalence covered T2T


def test_reference_rejects_unsupported(bd):
    model, mask_id, eos_id = bd
    with pytest.raises(ValueError, match="reference decoder"):
        reference_generate(model, [1, 2], DecodeConfig(mode="factor"), mask_id=mask_id, eos_ids=[eos_id])
    with pytest.raises(ValueError, match="temperature 0"):
        reference_generate(model, [1, 2], DecodeConfig(temperature=1.0), mask_id=mask_id, eos_ids=[eos_id])


# ---------------------------------------------------------------------------------------------------------------
# batching


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("labels,clean", ALIGNMENTS[:3])
def test_batch_rows_equal_rows_alone(bd, mode, labels, clean):
    skip_unsupported(mode, labels, clean)
    model, mask_id, eos_id = bd
    model = with_alignment(tiebroken(model), labels, clean)
    cfg = DecodeConfig(mode=mode, block_size=4, steps=4, max_new_tokens=13)
    prompts = [make_prompt(n, seed=10 + n, high=mask_id) for n in LENGTHS + [4, 5, 8]]
    batch = generate(model, prompts, cfg, mask_id=mask_id, eos_ids=[eos_id])
    for p, g in zip(prompts, batch):
        alone = generate(model, [p], cfg, mask_id=mask_id, eos_ids=[eos_id])[0]
        assert g.tokens == alone.tokens and g.n_generated == alone.n_generated
        if mode == "spec":  # drafts per forward are the batch's decision (spec.DraftPolicy); the output is not
            continue
        assert g.steps_per_block == alone.steps_per_block and g.forwards == alone.forwards
        assert g.edits == alone.edits and g.stop_reason == alone.stop_reason


def test_finished_rows_leave_the_batch(bd):
    model, mask_id, eos_id = bd
    B = 4
    # EOS forced at absolute position 5: row 0 (prompt 3) emits it in its second block; for row 1 (prompt 17)
    # position 5 is prompt, and EOS is forbidden everywhere else, so it runs to its budget
    spy = BatchSpy(Spy(tiebroken(model), force(eos_id, 5)))
    prompts = [make_prompt(3, seed=3, high=mask_id), make_prompt(17, seed=4, high=mask_id)]
    cfg = DecodeConfig(block_size=B, steps=B, threshold=0.9, max_new_tokens=24)
    a, b = generate(spy, prompts, cfg, mask_id=mask_id, eos_ids=[eos_id])
    assert a.stop_reason == "eos" and len(a.tokens) == 2 and b.stop_reason == "length" and len(b.tokens) == 24
    sizes = [s[0] for s in spy.shapes[1:]]  # after the prefill
    assert sizes[0] == 2 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    assert sizes.count(2) == a.forwards  # row 0 costs nothing once it is done
    alone = generate(spy, prompts[1:], cfg, mask_id=mask_id, eos_ids=[eos_id])[0]
    assert alone.tokens == b.tokens and alone.forwards == b.forwards


# ---------------------------------------------------------------------------------------------------------------
# LLaDA2.1 editing invariants


@pytest.mark.parametrize("mode", ["S", "Q"])
def test_editing_never_touches_prompt_and_respects_post_budget(bd, mode):
    model, mask_id, _ = bd
    B, max_post = 4, 3
    spy = Spy(Spy(tiebroken(model), disagree))
    prompt = make_prompt(6, seed=7, high=mask_id)
    cfg = DecodeConfig(mode=mode, block_size=B, steps=B, max_new_tokens=10, max_post_steps=max_post)
    gen = generate(spy, [prompt], cfg, mask_id=mask_id, eos_ids=[])[0]
    for ids, pos in spy.calls:
        for i, p in enumerate(pos):
            if p < len(prompt):
                assert ids[i] == prompt[p]
    assert gen.edits > 0
    # a model that always disagrees never settles: every block spends its whole post-edit budget
    assert all(s <= B + max_post + 1 for s in gen.steps_per_block)
    assert max(gen.steps_per_block) == gen.steps_per_block[-1] >= max_post + 1


@pytest.mark.parametrize("mode", ["S", "Q", "threshold"])
def test_committed_slots_never_remasked_and_stream_replays(bd, mode):
    model, mask_id, eos_id = bd
    model = tiebroken(model)
    prompts = [make_prompt(n, seed=n, high=mask_id) for n in (3, 9)]
    cfg = DecodeConfig(mode=mode, block_size=4, steps=4, max_new_tokens=14)
    canvases = {r: {} for r in range(2)}
    last_tokens: dict[int, list[int]] = {}
    final = None
    for item in stream(model, prompts, cfg, mask_id=mask_id, eos_ids=[eos_id]):
        if isinstance(item, list):
            final = item
            continue
        prev = last_tokens.get(item.row, [])
        for i, t in enumerate(prev):
            if t != mask_id and i < len(item.tokens):
                assert item.tokens[i] != mask_id  # never re-masked
            if i < item.n_final and i < len(item.tokens) and prev[i] != mask_id and i < len(prev):
                pass
        last_tokens[item.row] = item.tokens
        for e in item.events:
            assert (e.kind == "t2t") == (e.prev is not None)
            assert e.pos >= len(prompts[item.row])
            canvases[item.row][e.pos] = e.token
    assert final is not None
    for r, g in enumerate(final):
        P = len(prompts[r])
        replay = [canvases[r][P + i] for i in range(len(g.tokens))]
        assert replay == g.tokens  # the events alone rebuild the output


def test_budget_and_ignore_eos(bd):
    model, mask_id, eos_id = bd
    spy = Spy(tiebroken(model), force(eos_id, 5))
    for mode in [m for m in MODES if m != "spec"]:  # spec: tests/test_spec.py
        cfg = DecodeConfig(mode=mode, block_size=4, steps=4, max_new_tokens=9)
        g = generate(spy, [[1, 2, 3]], cfg, mask_id=mask_id, eos_ids=[eos_id])[0]
        assert g.stop_reason == "eos" and len(g.tokens) == 2 and g.n_generated == 3
        cfg = DecodeConfig(mode=mode, block_size=4, steps=4, max_new_tokens=9, ignore_eos=True)
        g = generate(spy, [[1, 2, 3]], cfg, mask_id=mask_id, eos_ids=[eos_id])[0]
        assert g.stop_reason == "length" and len(g.tokens) == g.n_generated == 9
        assert mask_id not in g.tokens


def test_stop_strings(bd):
    model, mask_id, eos_id = bd
    model = tiebroken(model)
    cfg = DecodeConfig(block_size=4, steps=4, threshold=0.9, max_new_tokens=16)
    prompt = [1, 2, 3]
    full = generate(model, [prompt], cfg, mask_id=mask_id, eos_ids=[])[0]
    decode = lambda ids: "".join(f"<{t}>" for t in ids)  # noqa: E731
    stop = f"<{full.tokens[6]}>"
    k = full.tokens.index(full.tokens[6])
    g = generate(model, [prompt], cfg, mask_id=mask_id, eos_ids=[], stop=[stop], decode=decode)[0]
    assert g.stop_reason == "stop" and g.tokens == full.tokens[:k + 1]
    assert g.forwards < full.forwards  # stopped after the block holding the stop string
    with pytest.raises(ValueError, match="decode"):
        generate(model, [prompt], cfg, mask_id=mask_id, eos_ids=[], stop=["x"])


def test_trace_jsonl(bd, tmp_path):
    model, mask_id, eos_id = bd
    model = tiebroken(model)
    cfg = DecodeConfig(mode="S", block_size=4, steps=4, max_new_tokens=10)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    path = tmp_path / "trace.jsonl"
    tw = TraceWriter(path, cfg, prompts, mask_id=mask_id, eos_ids=[eos_id], token_text=str)
    gens = generate(model, prompts, cfg, mask_id=mask_id, eos_ids=[eos_id], on_step=tw)
    tw.close(gens)
    lines = read_trace(path)
    assert lines[0]["type"] == "meta" and lines[0]["config"]["mode"] == "S"
    events = [x for x in lines if x["type"] == "event"]
    assert {e["kind"] for e in events} <= {"m2t", "t2t"} and all(0 <= e["conf"] <= 1 for e in events)
    done = [x for x in lines if x["type"] == "done"]
    assert [d["tokens"] for d in done] == [g.tokens for g in gens]
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TraceWriter(tmp_path / "nope" / "t.jsonl", cfg, prompts, mask_id=mask_id, eos_ids=[])
    json.dumps(lines)


# ---------------------------------------------------------------------------------------------------------------
# rules vs brute force


def test_dinfer_and_factor_rules_bruteforce():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        conf = torch.rand(3, 8, generator=g)
        masked = torch.rand(3, 8, generator=g) < 0.7
        masked[2] = False
        for tau in (0.3, 0.8, 0.99):
            got = dinfer_threshold_rule(conf, masked, tau)
            for r in range(3):
                cand = [i for i in range(8) if masked[r, i]]
                if not cand:
                    assert not got[r].any()
                    continue
                cmax = max(conf[r, i].item() for i in cand)
                want = {i for i in cand if conf[r, i].item() >= min(tau, cmax - 1e-5)}
                assert set(torch.nonzero(got[r]).flatten().tolist()) == want
        for f in (0.5, 1.0, 3.0):
            got = factor_rule(conf, masked, f)
            for r in range(3):
                cand = sorted([i for i in range(8) if masked[r, i]], key=lambda i: (-conf[r, i].item(), i))
                want = set()
                for n, i in enumerate(cand, start=1):
                    if n == 1 or (n + 1) * (1 - conf[r, i].item()) < f:
                        want.add(i)
                    else:
                        break
                assert set(torch.nonzero(got[r]).flatten().tolist()) == want


def test_joint_rule_bruteforce():
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        conf = torch.rand(2, 8, generator=g)
        masked = torch.rand(2, 8, generator=g) < 0.5
        changed = torch.rand(2, 8, generator=g) < 0.5
        editable = torch.rand(2, 8, generator=g) < 0.8
        m2t, t2t = joint_rule(conf, masked, changed, editable, 0.6, 0.3)
        for r in range(2):
            cand = [i for i in range(8) if masked[r, i]]
            want = {i for i in cand if conf[r, i] > 0.6} or set(sorted(cand, key=lambda i: (-conf[r, i].item(), i))[:1])
            assert set(torch.nonzero(m2t[r]).flatten().tolist()) == want
            want_e = {i for i in range(8) if not masked[r, i] and changed[r, i] and editable[r, i] and conf[r, i] > 0.3}
            assert set(torch.nonzero(t2t[r]).flatten().tolist()) == want_e


def test_repeat_penalty_hits_left_neighbour_only():
    from blockdiff.decode.rules import repeat_penalty_

    logits = torch.zeros(2, 4, 10)
    block = torch.tensor([[3, 3, 9, 1], [0, 5, 5, 5]])
    repeat_penalty_(logits, block, 2.0)
    want = torch.zeros(2, 4, 10)
    for b in range(2):
        for i in range(1, 4):
            want[b, i, block[b, i - 1]] -= 2.0
    assert torch.equal(logits, want)


def test_top_k_top_p_sampling_support():
    logits = torch.randn(4, 6, 50, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(logits, -1)
    for seed in range(5):
        tok, conf = choose_tokens(logits, 1.0, torch.Generator().manual_seed(seed), top_k=3)
        top3 = logits.topk(3, -1).indices
        assert (tok[..., None] == top3).any(-1).all()
        torch.testing.assert_close(conf, probs.gather(-1, tok[..., None])[..., 0])
        tok, _ = choose_tokens(logits, 1.0, torch.Generator().manual_seed(seed), top_p=1e-6)
        assert torch.equal(tok, logits.argmax(-1))  # a tiny nucleus keeps only the most likely token


def test_decode_config_validation(bd):
    for kw in ({"mode": "X"}, {"edit_threshold": 2.0}, {"max_post_steps": -1}, {"temperature": -1},
               {"top_p": 0.0}, {"top_k": -1}, {"factor": 0}, {"repeat_penalty": -1}):
        with pytest.raises(ValueError):
            DecodeConfig(**kw)
    s, q = DecodeConfig(mode="S"), DecodeConfig(mode="Q")
    assert (s.tau_mask, s.tau_edit, q.tau_mask, q.tau_edit) == (0.5, 0.0, 0.7, 0.5)
    assert DecodeConfig().tau_mask == 0.95 and DecodeConfig().tau_edit is None
    assert DecodeConfig(mode="S", threshold=0.6).tau_mask == 0.6
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(bd[0], [[1], []], DecodeConfig(), mask_id=bd[1], eos_ids=[])
    # the official LLaDA2 schedule (`_get_num_transfer_tokens`): floor(B / s), one more on the first B % s steps
    assert [DecodeConfig(block_size=32, steps=8).quota_at(i) for i in range(8)] == [4] * 8
    assert [DecodeConfig(block_size=16, steps=5).quota_at(i) for i in range(5)] == [4, 3, 3, 3, 3]
    assert [DecodeConfig(block_size=4, steps=6, max_new_tokens=9).quota_at(i) for i in range(6)] == [1, 1, 1, 1, 0, 0]
    # official generate(): steps = min(steps, gen_length // minimal_topk) with minimal_topk 1
    cfg = DecodeConfig(block_size=32, steps=32, max_new_tokens=8)
    assert cfg.effective_steps == 8 and [cfg.quota_at(i) for i in range(8)] == [4] * 8


@pytest.mark.parametrize("mode", ["threshold", "S"])
def test_fallback_commits_follow_the_official_schedule(bd, mode):
    """With a threshold nothing can pass, every step commits exactly its quota: B 16, steps 5 -> 4, 3, 3, 3, 3; and
    steps capped at max_new_tokens (B 8, steps 32, 4 new tokens -> s 4 -> 2, 2, 2, 2)."""
    model, mask_id, eos_id = bd
    model = tiebroken(model)
    for B, steps, budget, want in ((16, 5, 16, [4, 3, 3, 3, 3]), (8, 32, 4, [2, 2, 2, 2])):
        cfg = DecodeConfig(mode=mode, block_size=B, steps=steps, max_new_tokens=budget, threshold=1.0,
                           edit_threshold=1.0 if mode == "S" else None)
        per_step = [sum(e.kind == "m2t" for e in u.events)
                    for u in stream(model, [make_prompt(B, seed=1, high=mask_id)], cfg, mask_id=mask_id, eos_ids=[])
                    if not isinstance(u, list) and u.events]
        assert per_step == want, (B, steps, per_step)


def test_bad_prompt_ids(bd):
    model, mask_id, eos_id = bd
    V = model.cfg.vocab_size
    with pytest.raises(ValueError, match=rf"prompt 1: token id {V} at position 2 is outside the vocabulary \[0, {V}\)"):
        generate(model, [[1, 2], [3, 4, V]], DecodeConfig(block_size=4), mask_id=mask_id, eos_ids=[eos_id])
    with pytest.raises(ValueError, match="prompt 0: token id -1"):
        generate(model, [[-1]], DecodeConfig(block_size=4), mask_id=mask_id, eos_ids=[eos_id])
    with pytest.raises(ValueError, match=rf"prompt 0: holds the \[MASK\] id {mask_id} at position 1"):
        generate(model, [[5, mask_id, 6]], DecodeConfig(block_size=4), mask_id=mask_id, eos_ids=[eos_id])
    # the one context check: prompt + max_new_tokens rounded up to whole blocks must fit max_position_embeddings
    limit = model.cfg.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt of 2 tokens \+ max_new_tokens {limit}, rounded up to whole blocks "
                                         rf"of 4, needs {limit + 4} positions, more than the model's context of {limit}"):
        generate(model, [[1, 2]], DecodeConfig(block_size=4, max_new_tokens=limit, threshold=0.0), mask_id=mask_id,
                 eos_ids=[eos_id])
    ok = generate(model, [[1, 2]], DecodeConfig(block_size=4, max_new_tokens=limit - 4, threshold=0.0, ignore_eos=True),
                  mask_id=mask_id, eos_ids=[eos_id])[0]
    assert len(ok.tokens) == limit - 4  # exactly at the limit: accepted
