"""The step-able scheduler (continuous batching): a row that joins a running batch mid-flight decodes exactly what it
decodes alone (temperature 0, every mode, every label alignment; rows of different modes in one batch too), a
cancelled row frees its cache row at once, admission waits for a free row, and the AR scheduler equals
`ar_generate`. Same tiny tie-broken model as test_engine.py."""

from __future__ import annotations

import pytest
from decode_helpers import ALIGNMENTS, make_prompt, skip_unsupported, tiebroken, with_alignment

from blockdiff.decode.engine import MODES, DecodeConfig, ar_generate, generate
from blockdiff.decode.scheduler import ARScheduler, Scheduler


def same(g, alone) -> None:
    assert g.tokens == alone.tokens and g.n_generated == alone.n_generated
    assert g.forwards == alone.forwards and g.steps_per_block == alone.steps_per_block
    assert g.edits == alone.edits and g.stop_reason == alone.stop_reason


def run_staggered(sched, requests, join_after, eos_ids):
    """Add requests[k] after join_after[k] steps; step until idle. Returns {rid: Generation}. A request added
    after step 0 must find rows mid-decode (else it would not test joining a running batch), and every row must
    share at least one forward with another row."""
    done, step = {}, 0
    todo = sorted(zip(join_after, range(len(requests))))
    shared: set[int] = set()  # rows that took part in a forward with another row
    while todo or not sched.idle:
        while todo and todo[0][0] <= step:
            _, k = todo.pop(0)
            prompt, cfg = requests[k]
            if step > 0:
                assert sched.rows, f"request {k} joins at step {step} but no row is decoding: nothing mid-flight"
            sched.add(k, prompt, cfg, eos_ids=eos_ids)
        finished = dict(sched.step().finished)
        batch = {r.rid for r in sched.rows} | set(finished)  # the rows of this step's forward
        if len(batch) > 1:
            shared |= batch
        done.update(finished)
        step += 1
    assert shared == set(range(len(requests))), f"rows {set(range(len(requests))) - shared} decoded alone"
    return done


@pytest.mark.parametrize("labels,clean", ALIGNMENTS)
@pytest.mark.parametrize("mode", list(MODES))
def test_row_joining_mid_flight_equals_row_alone(bd, mode, labels, clean):
    skip_unsupported(mode, labels, clean)
    inner, mask_id, eos_id = bd
    model = with_alignment(tiebroken(inner), labels, clean)
    cfg = DecodeConfig(mode=mode, block_size=4, steps=4, max_new_tokens=13)
    requests = [(make_prompt(n, seed=20 + n, high=mask_id), cfg) for n in (8, 5, 13, 3)]
    sched = Scheduler(model, mask_id=mask_id, block_size=4, max_rows=4, max_len=64)
    got = run_staggered(sched, requests, join_after=[0, 3, 5, 6], eos_ids=[eos_id])
    assert sorted(got) == [0, 1, 2, 3] and sched.cache.batch == 0
    for k, (prompt, _) in enumerate(requests):
        alone = generate(model, [prompt], cfg, mask_id=mask_id, eos_ids=[eos_id])[0]
        if mode == "spec":  # the tokens are the AR output whatever the batch; how many drafts a forward takes is
            # the batch's decision (spec.DraftPolicy), so forwards may differ from the row alone
            assert got[k].tokens == alone.tokens == ar_generate(model, prompt, max_new_tokens=13,
                                                                eos_ids=[eos_id]).tokens
            assert got[k].stop_reason == alone.stop_reason
        else:
            same(got[k], alone)


@pytest.mark.parametrize("labels,clean", ALIGNMENTS[:2])
def test_rows_of_different_modes_share_a_batch(bd, labels, clean):
    """Per-row settings: each row keeps its own rule, thresholds, budget and penalty inside one forward."""
    inner, mask_id, eos_id = bd
    model = with_alignment(tiebroken(inner), labels, clean)
    cfgs = [DecodeConfig(mode=m, block_size=4, steps=4, max_new_tokens=n, repeat_penalty=pen)
            for m, n, pen in (("S", 11, 0.0), ("threshold", 9, 0.0), ("credit", 13, 0.0), ("Q", 7, 3.0),
                              ("factor", 10, 0.0))]
    requests = [(make_prompt(4 + 3 * k, seed=40 + k, high=mask_id), c) for k, c in enumerate(cfgs)]
    sched = Scheduler(model, mask_id=mask_id, block_size=4, max_rows=8, max_len=64)
    got = run_staggered(sched, requests, join_after=[0, 0, 2, 4, 4], eos_ids=[eos_id])
    for k, (prompt, c) in enumerate(requests):
        same(got[k], generate(model, [prompt], c, mask_id=mask_id, eos_ids=[eos_id])[0])


def test_cancel_frees_the_cache_row_at_once(bd):
    inner, mask_id, eos_id = bd
    model = tiebroken(inner)
    cfg = DecodeConfig(mode="S", block_size=4, steps=4, max_new_tokens=16)
    a, b = make_prompt(6, seed=1, high=mask_id), make_prompt(9, seed=2, high=mask_id)
    sched = Scheduler(model, mask_id=mask_id, block_size=4, max_rows=2, max_len=64)
    sched.add(0, a, cfg, eos_ids=[])
    sched.add(1, b, cfg, eos_ids=[])
    sched.step()
    sched.step()
    assert sched.cache.batch == 2 and sched.free_rows == 0
    assert sched.cancel(0)
    assert sched.cache.batch == 1 and sched.free_rows == 1 and [r.rid for r in sched.rows] == [1]
    assert not sched.cancel(0) and not sched.cancel(7)
    finished = {}
    while not sched.idle:
        finished.update(dict(sched.step().finished))
    assert list(finished) == [1]  # the cancelled row never reports
    same(finished[1], generate(model, [b], cfg, mask_id=mask_id, eos_ids=[])[0])
    sched.add(2, a, cfg, eos_ids=[])  # a queued row can be cancelled before it joins
    assert sched.cancel(2) and sched.idle


def test_admission_waits_for_a_free_row(bd):
    inner, mask_id, eos_id = bd
    model = tiebroken(inner)
    cfg = DecodeConfig(block_size=4, steps=4, max_new_tokens=5, threshold=0.9)
    sched = Scheduler(model, mask_id=mask_id, block_size=4, max_rows=2, max_len=64)
    prompts = [make_prompt(3 + k, seed=k, high=mask_id) for k in range(3)]
    for k, p in enumerate(prompts):
        sched.add(k, p, cfg, eos_ids=[])
    sched.step()
    assert len(sched.rows) == 2 and len(sched.pending) == 1
    done = {}
    while not sched.idle:
        done.update(dict(sched.step().finished))
        assert len(sched.rows) <= 2
    for k, p in enumerate(prompts):
        same(done[k], generate(model, [p], cfg, mask_id=mask_id, eos_ids=[])[0])


def test_scheduler_refuses_what_does_not_fit(bd):
    inner, mask_id, _ = bd
    sched = Scheduler(inner, mask_id=mask_id, block_size=4, max_rows=1, max_len=32)
    limit = inner.cfg.max_position_embeddings
    with pytest.raises(ValueError, match=f"more than the model's context of {limit}"):
        sched.add(0, [1, 2], DecodeConfig(block_size=4, max_new_tokens=limit), eos_ids=[])
    with pytest.raises(ValueError, match="does not fit the KV cache of 32"):
        sched.add(0, [1, 2], DecodeConfig(block_size=4, max_new_tokens=40), eos_ids=[])
    with pytest.raises(ValueError, match="block size 8 differs"):
        sched.add(0, [1, 2], DecodeConfig(block_size=8), eos_ids=[])
    with pytest.raises(ValueError, match="MASK"):
        sched.add(0, [1, mask_id], DecodeConfig(block_size=4), eos_ids=[])
    assert sched.idle


def test_ar_scheduler_equals_ar_generate(ar):
    model, eos_id = ar
    model = tiebroken(model)
    prompts = [make_prompt(n, seed=n, high=model.cfg.vocab_size) for n in (4, 9, 2)]
    sched = ARScheduler(model, max_rows=3, max_len=64)
    cfg = DecodeConfig(max_new_tokens=12)
    got = run_staggered(sched, [(p, cfg) for p in prompts], join_after=[0, 2, 5], eos_ids=[eos_id])
    for k, p in enumerate(prompts):
        alone = ar_generate(model, p, max_new_tokens=12, eos_ids=[eos_id])
        assert got[k].tokens == alone.tokens and got[k].forwards == alone.forwards
        assert got[k].n_generated == alone.n_generated and got[k].stop_reason == alone.stop_reason
