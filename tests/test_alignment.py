"""Label alignment as a checkpoint property (same-position / shifted labels, block-causal / causal clean stream)
and the AR-preserving aids: equivalences with the AR objective, no label leak, and every consumer (objectives,
engine with every rule, batching, streaming, the training loop) reading the checkpoint's alignment. Engine ==
reference decoder in every alignment lives with the other equivalences in test_engine.py."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from blockdiff.decode.engine import DecodeConfig, generate
from blockdiff.decode.reference import reference_generate
from blockdiff.model.hf_io import load_pretrained
from blockdiff.model.transformer import resize_vocab
from blockdiff.objectives.diffusion import (DiffusionLossConfig, ar_loss, bdlm_forward, diffusion_loss, diffusion_terms,
                                            noised_inputs, sequence_elbo)
from decode_helpers import ALIGNMENTS, Spy, force, make_prompt, tiebroken, with_alignment
from train_helpers import assert_same_weights, make_recipe


@pytest.fixture(scope="module")
def parent(tiny_ar_dir):
    """(model with a [MASK] row added, mask id): the tiny AR model as conversion starts from it."""
    model = load_pretrained(tiny_ar_dir).eval()
    mask_id = model.cfg.vocab_size
    resize_vocab(model, mask_id + 1)
    return model, mask_id


def packed_batch(vocab: int, b: int = 3, L: int = 16, seed: int = 0) -> dict:
    """Rows of two or three packed documents (doc ids and positions as packing writes them)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, L), generator=g)
    cuts = [[0] * 7 + [1] * 9, [0] * 16, [0] * 5 + [1] * 3 + [2] * 8][:b]
    doc_ids = torch.tensor(cuts)
    from blockdiff.model.masks import positions_from_doc_ids
    return {"input_ids": ids, "doc_ids": doc_ids, "positions": positions_from_doc_ids(doc_ids)}


@pytest.mark.parametrize("clean_causal", [False, True])
@pytest.mark.parametrize("weighting", ["elbo", "token_mean"])
def test_shifted_b1_loss_equals_parent_ar_loss(parent, clean_causal, weighting):
    """With shifted labels and B = 1 every token is an AR step from the clean stream: at step 0 (the parent's own
    weights) the block-diffusion loss is exactly the parent's next-token loss (all tokens masked, t = 1)."""
    model, mask_id = parent
    batch = packed_batch(mask_id)
    cfg = DiffusionLossConfig(mask_token_id=mask_id, block_size=1, weighting=weighting, t_lo=1.0, t_hi=1.0,
                              shift=True, clean_causal=clean_causal)
    with torch.no_grad():
        bd_loss, m = diffusion_loss(model, batch, cfg, generator=torch.Generator().manual_seed(0))
        want, _ = ar_loss(model, batch)
    assert m["mask_frac"] == 1.0  # of the scorable tokens: a document's first token has no prediction
    torch.testing.assert_close(bd_loss, want, rtol=1e-5, atol=1e-5)


def test_same_position_b1_is_not_the_ar_loss():
    """On the bundled trained parent: shifted labels at B = 1 start at the parent's next-token loss, while LLaDA2's
    same-position convention asks the model for the token it cannot see (why same-position conversion must
    relearn the head)."""
    from pathlib import Path

    from blockdiff.data.tasks import generate_examples
    from blockdiff.data.tokenizer import load_tokenizer
    folder = Path(__file__).resolve().parents[1] / "assets" / "tiny-ar"
    model = load_pretrained(folder).eval()
    tok = load_tokenizer(folder).with_mask_token()
    resize_vocab(model, tok.mask_id + 1)
    rows = [tok.encode(e.text)[:12] for e in generate_examples("heldout", 8, seed=0)]
    rows = [r + [tok.eos_id] * (12 - len(r)) for r in rows]
    batch = {"input_ids": torch.tensor(rows)}
    kw = dict(mask_token_id=tok.mask_id, block_size=1, t_lo=1.0, t_hi=1.0)
    with torch.no_grad():
        same, _ = diffusion_loss(model, batch, DiffusionLossConfig(**kw), generator=torch.Generator().manual_seed(0))
        shifted, _ = diffusion_loss(model, batch, DiffusionLossConfig(**kw, shift=True),
                                    generator=torch.Generator().manual_seed(0))
        want, _ = ar_loss(model, batch)
    torch.testing.assert_close(shifted, want, rtol=1e-5, atol=1e-5)
    assert float(want) < 2.0 and float(same) > float(want) + 2.0


@pytest.mark.parametrize("labels,clean", ALIGNMENTS)
@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("offset", [0, 3])
def test_no_label_leak(parent, labels, clean, B, offset):
    """The logit that predicts token j never depends on token j itself (masked in x_t, clean in x0), nor on any
    later token of its own block or a later block, under every alignment, block size and block offset (a causal
    clean stream trains with block boundaries at a random offset per row)."""
    model, mask_id = parent
    batch = packed_batch(mask_id, b=1, L=16, seed=3)
    batch = {k: v[:1] for k, v in batch.items()}
    x0 = batch["input_ids"]
    pos = batch["positions"]
    kw = dict(block_size=B, doc_ids=batch["doc_ids"], positions=pos, shift=labels == "shift",
              clean_causal=clean == "causal", block_positions=pos + offset)
    for j in (5, 9, 12):
        x_t = x0.clone()
        x_t[:, j:] = mask_id  # j and everything after it masked
        x0b = x0.clone()
        x0b[:, j:] = (x0b[:, j:] + 17) % mask_id  # change the answer and everything after it
        with torch.no_grad():
            a = bdlm_forward(model, x_t, x0, **kw).logits[:, j]
            b = bdlm_forward(model, x_t, x0b, **kw).logits[:, j]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_ar_term_from_the_causal_clean_stream_equals_a_separate_ar_forward(parent):
    """ar_weight with a causal clean stream reads the AR loss from the same forward; it must equal the separate
    causal forward used with a block-causal clean stream (and the plain AR objective)."""
    model, mask_id = parent
    batch = packed_batch(mask_id)
    base = dict(mask_token_id=mask_id, block_size=4, shift=True, ar_weight=0.5)
    with torch.no_grad():
        t_causal = diffusion_terms(model, batch, DiffusionLossConfig(**base, clean_causal=True),
                                   generator=torch.Generator().manual_seed(0))
        t_block = diffusion_terms(model, batch, DiffusionLossConfig(**base, clean_causal=False),
                                  generator=torch.Generator().manual_seed(0))
        want, _ = ar_loss(model, batch)
    torch.testing.assert_close(t_causal.ar_loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_block.ar_loss, want, rtol=1e-5, atol=1e-5)
    cfg = DiffusionLossConfig(**base, clean_causal=True)
    with torch.no_grad():
        loss, m = diffusion_loss(model, batch, cfg, generator=torch.Generator().manual_seed(0))
        plain, _ = diffusion_loss(model, batch, dataclasses.replace(cfg, ar_weight=0.0),
                                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, plain + 0.5 * want, rtol=1e-5, atol=1e-5)
    assert m["ar_nll"] == pytest.approx(float(want), rel=1e-5)


def test_sequence_elbo_reads_the_alignment(parent):
    """The ELBO used by DPO (and EBPO's log-ratio) at B = 1, t = 1, shifted: minus the AR negative log-likelihood
    of the row (first token of each document excluded)."""
    model, mask_id = parent
    batch = packed_batch(mask_id, b=2)
    x0 = batch["input_ids"]
    masked = torch.ones_like(x0, dtype=torch.bool)
    t = torch.ones(x0.shape)
    x_t = torch.full_like(x0, mask_id)
    with torch.no_grad():
        elbo = sequence_elbo(model, x0, x_t, masked, t, block_size=1, doc_ids=batch["doc_ids"],
                             positions=batch["positions"], shift=True)
        per_row = [ar_loss(model, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(2)]
    valid = (batch["doc_ids"][:, 1:] == batch["doc_ids"][:, :-1]).sum(-1)
    want = torch.stack([-l * n for (l, _), n in zip(per_row, valid)])
    torch.testing.assert_close(elbo, want, rtol=1e-5, atol=1e-4)


def test_causal_clean_stream_trains_random_block_offsets():
    """A causal-clean checkpoint is decoded with its first block right after the prompt, so training draws the block
    boundaries at a random offset in [0, B) per row; the LLaDA2 layout keeps them at multiples of B."""
    batch = {"input_ids": torch.ones(64, 32, dtype=torch.long)}
    for clean_causal, want in ((False, {0}), (True, set(range(8)))):
        cfg = DiffusionLossConfig(mask_token_id=99, block_size=8, shift=True, clean_causal=clean_causal)
        *_, positions, bpos = noised_inputs(batch, cfg, torch.Generator().manual_seed(0))
        off = bpos - torch.arange(32)
        assert set(off[:, 0].tolist()) == want and bool((off == off[:, :1]).all())


def test_mask_suffix_keeps_a_clean_prefix_in_each_block():
    """mask_suffix = 1 with t = 1: inside every block the masked slots are exactly a suffix (from a uniform cut on),
    so the model trains on the decoder's state: a clean prefix, masks after it; the cuts cover [0, B]."""
    cfg = DiffusionLossConfig(mask_token_id=99, block_size=8, mask_suffix=1.0, t_lo=1.0, t_hi=1.0)
    batch = {"input_ids": torch.ones(500, 32, dtype=torch.long)}
    _, _, masked, *_ = noised_inputs(batch, cfg, torch.Generator().manual_seed(0))
    blocks = masked.view(500, 4, 8).long()
    assert torch.equal(blocks, blocks.cummax(-1).values)  # once masked, masked to the block's end
    assert set((8 - blocks.sum(-1)).flatten().tolist()) == set(range(9))  # every cut 0..B occurs
    with pytest.raises(ValueError, match="mask_suffix"):
        DiffusionLossConfig(mask_token_id=99, block_size=8, mask_suffix=-0.1)


def test_mask_slope_masks_later_slots_more():
    cfg = DiffusionLossConfig(mask_token_id=99, block_size=8, mask_slope=0.8, t_lo=0.2, t_hi=0.8)
    batch = {"input_ids": torch.ones(4000, 16, dtype=torch.long)}
    _, _, masked, t, *_ = noised_inputs(batch, cfg, torch.Generator().manual_seed(0))
    per_slot = masked.float().mean(0).view(2, 8).mean(0)  # mask frequency by offset inside the block
    assert per_slot[0] < 0.35 < 0.65 < per_slot[-1]
    assert torch.all(per_slot[1:] >= per_slot[:-1] - 0.02)
    assert abs(float(masked.float().mean()) - 0.5) < 0.03  # the mean ratio is unchanged
    with pytest.raises(ValueError, match="mask_slope"):
        DiffusionLossConfig(mask_token_id=99, block_size=8, mask_slope=1.5)


# ---------------------------------------------------------------------------------------------------------------
# decoding: every rule reads the checkpoint's alignment


def test_shifted_decoding_of_the_parent_at_b1_is_greedy_ar(parent, tiny_ar_dir):
    """A parent read as a shifted, causal-clean checkpoint and decoded with B = 1 is its own greedy AR decoder:
    every block's only slot is an AR step from the carry."""
    from blockdiff.data.tokenizer import load_tokenizer
    from blockdiff.decode.engine import ar_generate
    from blockdiff.model.config import DiffusionInfo
    model, mask_id = parent
    m = copy.copy(model)
    m.cfg = copy.deepcopy(model.cfg)
    m.cfg.diffusion = DiffusionInfo(mask_token_id=mask_id, block_size=1, labels="shift", clean_stream="causal")
    tok = load_tokenizer(tiny_ar_dir)
    cfg = DecodeConfig(block_size=1, steps=1, max_new_tokens=12, threshold=0.0)
    for text in ("add 12+34=", "reverse abc=", "def f("):
        ids = tok.encode(text)
        got = generate(m, [ids], cfg, mask_id=mask_id, eos_ids=tok.eos_ids)[0]
        want = ar_generate(model, ids, max_new_tokens=12, eos_ids=tok.eos_ids)
        assert got.tokens == want.tokens


# ---------------------------------------------------------------------------------------------------------------
# recipes and the training loop: the alignment is written into the checkpoint and kept by post-training


def test_conversion_writes_alignment_and_continuation_keeps_it(tiny_ar_dir, tiny_data, tmp_path):
    import json

    from blockdiff.train.loop import train
    from blockdiff.train.metrics import read_metrics

    phases = [{"block_size": 1, "steps": 1, "lr": 1e-3}, {"block_size": 8, "steps": 2, "lr": 1e-3}]
    r = make_recipe(tiny_ar_dir, tiny_data, phases=phases,
                    objective={"labels": "shift", "clean_stream": "causal"},
                    diffusion={"ar_weight": 0.5, "mask_suffix": 0.5})
    res = train(r, tmp_path / "run", progress=False)
    bd_cfg = json.loads((res.final_dir / "config.json").read_text())["blockdiff"]
    assert (bd_cfg["labels"], bd_cfg["clean_stream"]) == ("shift", "causal")
    rows = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if not m.get("eval")]
    assert all("ar_nll" in m and m["ar_nll"] > 0 for m in rows)
    # continuing from the converted checkpoint keeps its alignment without being told
    r2 = make_recipe(res.final_dir, tiny_data, phases=phases[1:])
    res2 = train(r2, tmp_path / "run2", progress=False)
    info = load_pretrained(res2.final_dir).cfg.diffusion
    assert (info.labels, info.clean_stream) == ("shift", "causal")
    # and refuses a recipe that would read its logits with another alignment
    r3 = make_recipe(res.final_dir, tiny_data, phases=phases[1:], objective={"labels": "same"})
    with pytest.raises(ValueError, match=r"labels = 'same', but the starting checkpoint .* was trained with "
                                         r"labels = 'shift'"):
        train(r3, tmp_path / "run3", progress=False)
    assert not (tmp_path / "run3" / "checkpoints").exists()


@pytest.mark.parametrize("section,field,value,msg", [
    ("objective", "labels", "left", r"\[objective\] labels must be same or shift, got 'left'"),
    ("objective", "clean_stream", "full", r"\[objective\] clean_stream must be block_causal or causal, got 'full'"),
    ("diffusion", "ar_weight", -1.0, r"\[diffusion\] ar_weight must be >= 0, got -1.0"),
    ("diffusion", "mask_slope", 2.0, r"\[diffusion\] mask_slope must be in \[0, 1\], got 2.0"),
    ("diffusion", "mask_suffix", 1.5, r"\[diffusion\] mask_suffix must be in \[0, 1\], got 1.5"),
])
def test_recipe_rejects_bad_alignment_fields(tiny_ar_dir, tiny_data, section, field, value, msg):
    from blockdiff.train.recipe import RecipeError

    with pytest.raises(RecipeError, match=msg):
        make_recipe(tiny_ar_dir, tiny_data, **{section: {field: value}})


@pytest.mark.parametrize("labels,clean", ALIGNMENTS[1:3])
@pytest.mark.parametrize("mode", ["S", "threshold"])
def test_stream_in_shifted_alignments(bd, labels, clean, mode):
    """Streaming under shifted labels (and prompt-aligned blocks): the events alone rebuild the output, the part
    reported final never changes afterwards, and nothing is written into the prompt."""
    from blockdiff.decode.engine import stream
    inner, mask_id, eos_id = bd
    model = with_alignment(tiebroken(inner), labels, clean)
    prompts = [make_prompt(n, seed=n, high=mask_id) for n in (3, 9)]
    cfg = DecodeConfig(mode=mode, block_size=4, steps=4, max_new_tokens=14)
    canvases: dict[int, dict[int, int]] = {0: {}, 1: {}}
    finals: dict[int, list[int]] = {0: [], 1: []}
    out = None
    for item in stream(model, prompts, cfg, mask_id=mask_id, eos_ids=[eos_id]):
        if isinstance(item, list):
            out = item
            continue
        final_now = item.tokens[:item.n_final]
        assert final_now[:len(finals[item.row])] == finals[item.row]  # what was final stays final
        finals[item.row] = final_now
        for e in item.events:
            assert e.pos >= len(prompts[item.row])
            canvases[item.row][e.pos] = e.token
    for r, g in enumerate(out):
        P = len(prompts[r])
        assert [canvases[r][P + i] for i in range(len(g.tokens))] == g.tokens


@pytest.mark.parametrize("labels,clean", [ALIGNMENTS[0], ALIGNMENTS[2]])
@pytest.mark.parametrize("mode", ["threshold", "S"])
def test_eos_fill_engine_equals_reference_and_keeps_outputs_ending_at_eos(bd, labels, clean, mode):
    """eos_fill (off by default): masked slots after a committed EOS become EOS at once. The engine equals the
    reference decoder with it, and it never spends more forwards than without it on a model that ends early."""
    inner, mask_id, eos_id = bd
    cfg = DecodeConfig(mode=mode, block_size=8, steps=8, max_new_tokens=19, eos_fill=True)
    for n in (3, 8, 13):
        model = with_alignment(Spy(tiebroken(inner), force(eos_id, n + 2)), labels, clean)
        prompt = make_prompt(n, seed=n, high=mask_id)
        ref = reference_generate(model, prompt, cfg, mask_id=mask_id, eos_ids=[eos_id])
        gen = generate(model, [prompt], cfg, mask_id=mask_id, eos_ids=[eos_id])[0]
        assert gen.tokens == ref.tokens and gen.stop_reason == ref.stop_reason == "eos" and len(gen.tokens) in (2, 3)  # shift: logit n+2 -> slot n+3
        plain = generate(model, [prompt], dataclasses.replace(cfg, eos_fill=False), mask_id=mask_id,
                         eos_ids=[eos_id])[0]
        assert gen.forwards <= plain.forwards


def test_shifted_conversion_resumes_exactly(tiny_ar_dir, tiny_data, tmp_path):
    """The new randomness (block offsets, position-dependent and suffix masks) comes from the run's generator, which
    checkpoints save: an interrupted shifted, causal-clean run resumed equals the uninterrupted one bit for bit."""
    from blockdiff.train.loop import train

    phases = [{"block_size": 1, "steps": 2, "lr": 1e-3}, {"block_size": 8, "steps": 4, "lr": 1e-3}]
    r = make_recipe(tiny_ar_dir, tiny_data, phases=phases, objective={"labels": "shift", "clean_stream": "causal"},
                    diffusion={"ar_weight": 0.5, "mask_slope": 0.5, "mask_suffix": 0.5})
    train(r, tmp_path / "a", progress=False)
    part = train(r, tmp_path / "b", progress=False, max_steps=4)
    assert part.steps == 4
    train(r, tmp_path / "b", progress=False, resume=True)
    assert_same_weights(tmp_path / "a" / "final", tmp_path / "b" / "final")
