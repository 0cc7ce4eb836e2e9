"""Post-training objectives and data on toy tensors, hand-checked: SFT never masks or scores prompt tokens, the T2T
corruption labels only corrupted positions, CAP's entropy covers only correct masked positions, DPO equals its
formula on the ELBO with shared noise, EBPO's clipped surrogate and group advantages; chat data is block-aligned
and malformed conversations fail with file:line."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from blockdiff.data.bundled import write_post_data
from blockdiff.data.chat_template import ChatTemplate, answer_text, tokenize_conversation, validate_messages
from blockdiff.data.post_data import chat_rows, read_chat, read_pairs, read_rl_prompts
from blockdiff.data.documents import DataError
from blockdiff.data.tokenizer import load_tokenizer
from blockdiff.objectives.cap import CAPConfig, cap_entropy, cap_loss
from blockdiff.objectives.diffusion import DiffusionLossConfig, diffusion_loss, diffusion_terms
from blockdiff.objectives.noise import edit_corruption
from blockdiff.objectives.policy import EBPOConfig, clipped_surrogate, ebpo_loss, elbo_logp, group_advantages
from blockdiff.objectives.preference import DPOConfig, dpo_loss, pair_noise

V, MASK = 12, 11


class Toy(torch.nn.Module):
    """logits[i] = W[token_i]: position-independent, so every loss term can be computed by hand."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(V, V, generator=g))

    def embed(self, ids):
        return F.one_hot(ids, V).float()

    def forward(self, ids=None, *, inputs_embeds=None, positions=None, mask=None, logits_slice=None, cache=None,
                return_hidden=False):
        h = inputs_embeds if inputs_embeds is not None else self.embed(ids)
        h = h[:, logits_slice] if logits_slice is not None else h
        return h if return_hidden else self.output(h)

    def output(self, h):  # the head the chunked loss applies itself (objectives/chunked_ce.py)
        return h @ self.W


def ce_of(model, x_t, x0):
    return F.cross_entropy((F.one_hot(x_t, V).float() @ model.W).reshape(-1, V), x0.reshape(-1),
                           reduction="none").view(x0.shape)


# ---------------------------------------------------------------------------------------------------- SFT
def test_sft_prompt_never_masked_and_loss_by_hand():
    model = Toy()
    x0 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [3, 3, 3, 1, 2, 2, 0, 0]])
    lm = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.3, t_hi=0.8, complementary=True)
    terms = diffusion_terms(model, {"input_ids": x0, "loss_mask": lm}, cfg, generator=torch.Generator().manual_seed(0))
    assert not (terms.masked & ~terms.eligible).any(), "a prompt token was masked"
    # complementary: the two copies together mask every response token exactly once
    assert torch.equal(terms.masked[:2] ^ terms.masked[2:], lm) and not (terms.masked[:2] & terms.masked[2:]).any()
    loss, _ = diffusion_loss(model, {"input_ids": x0, "loss_mask": lm}, cfg, generator=torch.Generator().manual_seed(0))
    x_t = torch.where(terms.masked, MASK, terms.x0)
    hand = (ce_of(model, x_t, terms.x0) * terms.masked / terms.t).sum() / terms.eligible.sum()
    assert torch.allclose(loss, hand)
    # prompt tokens never enter the loss: changing them changes nothing (the toy model has no context)
    x0b = x0.clone()
    x0b[~lm] = 9
    loss_b, _ = diffusion_loss(model, {"input_ids": x0b, "loss_mask": lm}, cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss, loss_b)


# ---------------------------------------------------------------------------------------------------- T2T
def test_t2t_corruption_only_on_unmasked_response_and_never_special():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 10, (64, 16), generator=g)
    eligible = torch.rand(64, 16, generator=g) < 0.7
    masked = (torch.rand(64, 16, generator=g) < 0.4) & eligible
    x_t = torch.where(masked, MASK, x0)
    out, corrupted, region = edit_corruption(x0, x_t, masked, eligible, ratio=1.0, rate_max=0.5, vocab_size=V,
                                             exclude=(0, MASK), generator=g)
    assert torch.equal(region, eligible & ~masked)  # ratio 1: every row carries the stream
    assert corrupted.any()
    assert not (corrupted & ~eligible).any() and not (corrupted & masked).any()
    assert (out[corrupted] != x0[corrupted]).all()
    assert not ((out[corrupted] == 0) | (out[corrupted] == MASK)).any()
    assert torch.equal(out[~corrupted], x_t[~corrupted])
    none = edit_corruption(x0, x_t, masked, eligible, ratio=0.0, rate_max=0.5, vocab_size=V, generator=g)[1]
    assert not none.any()


def test_t2t_loss_by_hand():
    model = Toy(1)
    x0 = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(2))
    lm = torch.ones_like(x0, dtype=torch.bool)
    lm[:, :2] = False
    cfg = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.3, t_hi=0.6, t2t_ratio=1.0, t2t_max_rate=0.9,
                              t2t_vocab=V, t2t_exclude=(MASK,), t2t_keep_weight=0.5)
    terms = diffusion_terms(model, {"input_ids": x0, "loss_mask": lm}, cfg, generator=torch.Generator().manual_seed(3))
    assert terms.corrupted.any() and not (terms.corrupted & ~lm).any()
    loss, m = diffusion_loss(model, {"input_ids": x0, "loss_mask": lm}, cfg, generator=torch.Generator().manual_seed(3))
    m2t = (terms.ce * terms.masked / terms.t).sum() / lm.sum()
    t2t = (terms.ce * terms.corrupted).sum() / terms.corrupted.sum()
    kept = lm & ~terms.masked & ~terms.corrupted
    keep = (terms.ce * kept).sum() / kept.sum()
    assert torch.allclose(loss, m2t + t2t + 0.5 * keep) and math.isclose(m["t2t_nll"], float(t2t.detach()), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------- CAP
def test_cap_entropy_only_over_correct_masked_positions():
    logits = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    x0 = torch.tensor([[0, 0, 0, 2]])  # pos0 correct+masked, pos1 wrong+masked, pos2 correct unmasked, pos3 correct+masked
    masked = torch.tensor([[True, True, False, True]])

    def H(row):
        p = row.softmax(-1)
        return float(-(p * p.log()).sum())

    assert math.isclose(float(cap_entropy(logits, x0, masked)), (H(logits[0, 0]) + H(logits[0, 3])) / 2, rel_tol=1e-6)
    assert float(cap_entropy(logits, x0, torch.zeros_like(masked))) == 0.0


def test_cap_loss_adds_lambda_times_entropy():
    model = Toy(2)
    x0 = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": x0}
    d = DiffusionLossConfig(mask_token_id=MASK, block_size=4, t_lo=0.5, t_hi=0.9)
    base, _ = diffusion_loss(model, batch, d, generator=torch.Generator().manual_seed(0))
    loss, m = cap_loss(model, batch, CAPConfig(d, lam=2.0), generator=torch.Generator().manual_seed(0))
    assert math.isclose(float(loss.detach()), float(base.detach()) + 2.0 * m["cap_entropy"], rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------- DPO
def pair_batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 10, (3, 2, 8), generator=g)
    ids[:, 1, :3] = ids[:, 0, :3]  # same prompt
    lm = torch.zeros(3, 2, 8, dtype=torch.bool)
    lm[..., 3:] = True
    return {"input_ids": ids, "loss_mask": lm, "positions": torch.arange(8).expand(3, 2, 8)}


def test_dpo_loss_by_hand_with_shared_noise():
    policy, ref = Toy(3), Toy(4)
    batch = pair_batch()
    cfg = DPOConfig(mask_token_id=MASK, block_size=4, beta=0.1)
    x0, x_t, masked, t, _, _ = pair_noise(batch, cfg, torch.Generator().manual_seed(9))
    assert torch.equal(masked[:3], masked[3:]), "chosen and rejected must share the noise sample"

    def elbo(m):
        return -(ce_of(m, x_t, x0) * masked / t).sum(-1)

    r = 0.1 * (elbo(policy) - elbo(ref))
    hand = -F.logsigmoid(r[:3] - r[3:]).mean()
    loss, metrics = dpo_loss(policy, batch, cfg, ref_model=ref, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(loss, hand)
    assert math.isclose(metrics["pref_acc"], float((r[:3] > r[3:]).float().mean()))
    # with policy == reference the margin is 0 and the loss log 2
    loss0, _ = dpo_loss(ref, batch, cfg, ref_model=ref, generator=torch.Generator().manual_seed(9))
    assert math.isclose(float(loss0.detach()), math.log(2), rel_tol=1e-6)
    # RPO-style NLL term: + alpha * chosen negative ELBO per response token
    cfg_a = DPOConfig(mask_token_id=MASK, block_size=4, beta=0.1, sft_weight=0.5)
    loss_a, _ = dpo_loss(policy, batch, cfg_a, ref_model=ref, generator=torch.Generator().manual_seed(9))
    n_tok = batch["loss_mask"][:, 0].sum(-1).float()
    assert torch.allclose(loss_a, hand + 0.5 * (-elbo(policy)[:3] / n_tok).mean())
    # K Monte Carlo draws: the ELBOs are the mean over K successive shared-noise samples
    g = torch.Generator().manual_seed(9)
    draws = [pair_noise(batch, cfg, g) for _ in range(3)]

    def elbo_k(m):
        return sum(-(ce_of(m, d[1], d[0]) * d[2] / d[3]).sum(-1) for d in draws) / 3

    rk = 0.1 * (elbo_k(policy) - elbo_k(ref))
    cfg_k = DPOConfig(mask_token_id=MASK, block_size=4, beta=0.1, samples=3)
    loss_k, _ = dpo_loss(policy, batch, cfg_k, ref_model=ref, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(loss_k, -F.logsigmoid(rk[:3] - rk[3:]).mean())


def test_dpo_reference_stays_frozen():
    policy = Toy(5)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    before = ref.W.detach().clone()
    opt = torch.optim.AdamW(policy.parameters(), lr=0.1)
    cfg = DPOConfig(mask_token_id=MASK, block_size=4)
    for s in range(3):
        loss, _ = dpo_loss(policy, pair_batch(), cfg, ref_model=ref, generator=torch.Generator().manual_seed(s))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert ref.W.grad is None and torch.equal(ref.W, before) and not torch.equal(policy.W, before)


# ---------------------------------------------------------------------------------------------------- EBPO
def test_group_advantages_and_zero_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv, keep = group_advantages(r)
    assert keep.tolist() == [True, False, True]
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    std = math.sqrt(0.75 * 0.25)
    assert torch.allclose(adv[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / (std + 1e-6))
    assert torch.equal(adv[1], torch.zeros(4))


def test_clipped_surrogate_by_hand():
    log_ratio = torch.log(torch.tensor([0.5, 0.5, 1.5, 1.5, 1.1]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    surr, clipped = clipped_surrogate(log_ratio, adv, 0.2, 0.28)
    # rho 0.5, A>0: min(0.5, 0.8) = 0.5 ; A<0: min(-0.5, -0.8) = -0.8 (clipped) ; rho 1.5, A>0: min(1.5, 1.28) = 1.28
    # A<0: min(-1.5, -1.28) = -1.5 ; rho 1.1 inside the range: 2.2
    assert torch.allclose(surr, torch.tensor([0.5, -0.8, 1.28, -1.5, 2.2]))
    assert clipped.tolist() == [False, True, True, False, False]


def test_ebpo_loss_at_rollout_policy_is_minus_mean_advantage():
    model = Toy(6)
    cfg = EBPOConfig(mask_token_id=MASK, block_size=4, n_timesteps=2)
    x0 = torch.randint(0, 10, (4, 8), generator=torch.Generator().manual_seed(7))
    lm = torch.zeros_like(x0, dtype=torch.bool)
    lm[:, 4:] = True
    t = torch.tensor([[0.3] * 4, [0.8] * 4])
    masked = (torch.rand(2, 4, 8, generator=torch.Generator().manual_seed(8)) < t[..., None]) & lm
    batch = {"input_ids": x0, "loss_mask": lm, "t": t, "masked": masked, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])}
    # elbo_logp by hand: (1/|y|) sum_n 1/(N t_n) sum_masked log p
    hand = sum(-(ce_of(model, torch.where(masked[n], MASK, x0), x0) * masked[n]).sum(-1) / (2 * t[n])
               for n in range(2)) / 4
    assert torch.allclose(elbo_logp(model, batch, cfg), hand)
    batch["old_logp"] = hand.detach()
    loss, m = ebpo_loss(model, batch, cfg)
    assert math.isclose(float(loss.detach()), -float(batch["advantages"].mean()), abs_tol=1e-6) and m["clip_frac"] == 0.0
    loss.backward()
    assert model.W.grad.abs().sum() > 0
    empty, m = ebpo_loss(model, {"input_ids": x0[:0]}, cfg)
    assert float(empty.detach()) == 0.0 and m["sequences"] == 0.0


# ---------------------------------------------------------------------------------------------------- chat data
@pytest.fixture(scope="module")
def tok(tiny_bd_dir):
    return load_tokenizer(tiny_bd_dir)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [None, CHATML])
def test_conversation_rows_are_block_aligned_with_response_mask(tok, template):
    tok = copy.copy(tok)
    tok.chat_template = template
    msgs = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "add 2+3="},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "sort 3 1="},
            {"role": "assistant", "content": "1 3"}]
    ex = tokenize_conversation(msgs, tok, ChatTemplate(tok), block_size=8)
    assert len(ex.ids) % 8 == 0 and ex.ids[-1] == tok.eos_id
    resp = [i for i, m in zip(ex.ids, ex.loss_mask) if m]
    text = tok.decode(resp)
    assert "5" in text and "1 3" in text and "add" not in text and "Be short" not in text
    assert answer_text(tok, ex.ids[ex.loss_mask.index(True):]) == "5"
    L = 2 * len(ex.ids) + 8
    rows = chat_rows([ex, ex], L, tok.pad_id, pack=True)
    assert rows.input_ids.shape == (1, L) and rows.positions[0, len(ex.ids)] == 0
    assert not rows.loss_mask[0, 2 * len(ex.ids):].any()  # packing tail is outside the loss


@pytest.mark.parametrize("line,expect", [
    ({"messages": [{"content": "hi"}]}, "messages[0] has no 'role'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role is 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"text": "hi"}, "missing field 'messages'"),
])
def test_malformed_conversations_name_file_and_line(tok, tmp_path, line, expect):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=rf"chat.jsonl:3: .*{re.escape(expect)}"):
        read_chat([str(p)], tok, block_size=8, seq_len=256)


def test_over_length_drop_or_error(tok, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "y"}]} for n in (2, 400)]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = read_chat([str(p)], tok, block_size=8, seq_len=64, over_length="drop")
    assert len(kept) == 1 and "dropped 1 of 2 conversations" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"chat.jsonl:2"):
        read_chat([str(p)], tok, block_size=8, seq_len=64, over_length="error")


def test_generated_post_data_reads_back(tok, tmp_path):
    write_post_data(tmp_path, "chat", train=8, valid=4)
    write_post_data(tmp_path, "pairs", train=8, valid=4)
    assert len(read_chat([str(tmp_path / "sft_train.jsonl")], tok, block_size=8, seq_len=128)) == 8
    pairs = read_pairs([str(tmp_path / "pairs_valid.jsonl")], tok, block_size=8, seq_len=128)
    assert pairs.input_ids.shape == (4, 2, 128)
    assert not torch.equal(pairs.input_ids[:, 0], pairs.input_ids[:, 1])
    for r in map(json.loads, (tmp_path / "pairs_train.jsonl").read_text().splitlines()):
        assert r["chosen"] != r["rejected"]
    assert len(read_rl_prompts(["tasks"], n_tasks=6)) == 6
    with pytest.raises(DataError, match="missing field 'answer'"):
        bad = tmp_path / "rl.jsonl"
        bad.write_text('{"prompt": "hi"}\n')
        read_rl_prompts([str(bad)])
    with pytest.raises(DataError, match="must be a non-empty list"):
        validate_messages([], "f:1")


def test_dpo_answer_only_drops_padding_after_first_eos():
    EOS = 0
    ids = torch.tensor([[[5, 6, 7, 8, EOS, EOS, EOS, EOS], [5, 6, 7, 9, 9, EOS, EOS, EOS]]])
    lm = torch.zeros(1, 2, 8, dtype=torch.bool)
    lm[..., 3:] = True
    batch = {"input_ids": ids, "loss_mask": lm, "positions": torch.arange(8).expand(1, 2, 8)}
    cfg = DPOConfig(mask_token_id=MASK, block_size=4, t_lo=1.0, t_hi=1.0, eos_id=EOS, answer_only=True)
    _, _, masked, _, _, _ = pair_noise(batch, cfg, torch.Generator().manual_seed(0))  # t = 1: every eligible slot
    assert masked[0].tolist() == [False, False, False, True, True, False, False, False]
    assert masked[1].tolist() == [False, False, False, True, True, True, False, False]
    cfg_all = DPOConfig(mask_token_id=MASK, block_size=4, t_lo=1.0, t_hi=1.0)
    _, _, masked_all, _, _, _ = pair_noise(batch, cfg_all, torch.Generator().manual_seed(0))
    assert masked_all[:, 3:].all() and not masked_all[:, :3].any()
    with pytest.raises(ValueError, match="eos_id"):
        pair_noise(batch, DPOConfig(mask_token_id=MASK, block_size=4, answer_only=True), None)
