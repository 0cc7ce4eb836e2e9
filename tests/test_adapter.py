"""Mask-only adapters (model/mask_adapter.py, issue 19): a frozen parent plus LoRA terms that act only where the
input token is [MASK].

What is checked, each against an independent computation:
- the causal stream of an adapter model is the parent's, bit for bit (torch.equal against the parent model), while
  masked positions do change;
- `spec` on an adapter checkpoint reproduces the parent's greedy output token for token, with HF transformers'
  `generate` on the parent folder as the oracle (a trained adapter from a short real run, and the bundled one);
- threshold / S / Q on an adapter checkpoint equal the no-cache reference decoder;
- training leaves every parent weight bit-identical and writes the adapter format (no config.json, so other tools
  refuse the folder); the parent folder is unchanged; the base is hash-checked (a changed base is refused naming
  both folders); top-k merge averages the adapter tensors; a killed-and-resumed run equals an uninterrupted one;
- the recipe section's checks, and the memory plan's adapter rows.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import L, make_recipe

from blockdiff.data.tasks import generate_examples
from blockdiff.decode.engine import DecodeConfig, generate
from blockdiff.decode.reference import reference_generate
from blockdiff.load import load_checkpoint
from blockdiff.model import mask_adapter as ma
from blockdiff.model.hf_io import load_pretrained, save_pretrained
from blockdiff.train.checkpoint import list_checkpoints
from blockdiff.train.loop import train
from blockdiff.train.merge import average_checkpoints
from blockdiff.train.plan import plan_memory
from blockdiff.train.recipe import RecipeError

REPO = Path(__file__).resolve().parents[1]
ADAPTER = {"kind": "lora", "rank": 4, "alpha": 8.0}
PHASES = [{"block_size": 4, "steps": 3, "lr": 5e-3}, {"block_size": 8, "steps": 3, "lr": 5e-3}]


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def causal(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()[None, None]


@pytest.fixture(scope="module")
def parent(tiny_ar_dir, tmp_path_factory) -> Path:
    """The tiny random parent with sharpened logits (norm x 8): decisive argmaxes, so HF and blockdiff -- two
    implementations whose logits differ by ~1e-6 -- pick the same greedy tokens."""
    m = load_checkpoint(tiny_ar_dir)
    with torch.no_grad():
        m.model.norm.weight.mul_(8.0)
    return save_pretrained(m.model, tmp_path_factory.mktemp("parent") / "model", tokenizer=m.tokenizer)


def adapter_recipe(parent: Path, data, **sections):
    sections = {"objective": {"labels": "shift", "clean_stream": "causal"}, "adapter": ADAPTER,
                "train": {"save_every": 2, "eval_every": 2}, **sections}
    return make_recipe(parent, data, phases=PHASES, **sections)


@pytest.fixture(scope="module")
def run(parent, tiny_data, tmp_path_factory):
    before = folder_digest(parent)
    out = tmp_path_factory.mktemp("adapter_run") / "run"
    res = train(adapter_recipe(parent, tiny_data), out, progress=False)
    assert folder_digest(parent) == before, "training wrote into the parent folder"
    return out, res


# ----------------------------------------------------------------------------------------- the exactness claim
def test_causal_stream_is_the_parent_bit_for_bit(parent):
    base = load_checkpoint(parent).model
    m = load_checkpoint(parent).model
    V0 = m.cfg.vocab_size
    from blockdiff.model.transformer import resize_vocab

    resize_vocab(m, V0 + 1)
    ma.attach(m, ma.AdapterConfig(kind="lora", rank=4), V0, ma.fingerprint(parent, V0))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        ids = torch.randint(0, V0, (2, 24), generator=torch.Generator().manual_seed(2))
        masked = ids.clone()
        masked[:, 16:] = V0
        ref = base(ids, mask=causal(24))
        got = m(ids, mask=causal(24))
        got_masked = m(masked, mask=causal(24))
        plain_masked = base(torch.where(masked == V0, 0, masked), mask=causal(24))
    assert torch.equal(got[..., :V0], ref)  # no [MASK] in the input: the parent's logits exactly
    assert torch.equal(got_masked[:, :16, :V0], ref[:, :16])  # real tokens before the masks: still exact
    assert (got_masked[:, 16:, :V0] - plain_masked[:, 16:]).abs().max() > 1e-2  # the adapter acts at masks


def test_training_freezes_the_parent_and_writes_the_adapter_format(run, parent):
    out, res = run
    final = res.final_dir
    names = {p.name for p in final.iterdir()}
    assert {ma.ADAPTER_JSON, ma.ADAPTER_WEIGHTS, "tokenizer.json"} <= names
    # no config.json / weights / PEFT names: transformers, vLLM and PEFT find nothing they could load as a model
    assert not names & {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"}
    transformers = pytest.importorskip("transformers")
    with pytest.raises((OSError, ValueError), match="config.json"):  # "does not appear to have a file named config.json"
        transformers.AutoModelForCausalLM.from_pretrained(final)
    loaded = load_checkpoint(final).model
    base = load_pretrained(parent).state_dict()
    V0 = next(iter(v for k, v in base.items() if k == "tok_embeddings.weight")).shape[0]
    for k, v in loaded.state_dict().items():
        if ma.is_adapter_param(k):
            continue
        assert torch.equal(v[:V0] if k in ("tok_embeddings.weight", "output.weight") else v, base[k]), k
    moved = [k for k, v in ma.adapter_state(loaded).items() if k.endswith(".B") and v.abs().max() > 0]
    assert moved, "no adapter tensor moved in training"
    meta = ma.read_meta(final)
    assert meta["base"]["sha256"] == {"model.safetensors": hashlib.sha256(
        (parent / "model.safetensors").read_bytes()).hexdigest()}
    assert meta["blockdiff"]["labels"] == "shift" and meta["blockdiff"]["clean_stream"] == "causal"


def hf_greedy(folder: Path, prompts: list[list[int]], n: int, eos: int) -> list[list[int]]:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    out = []
    for p in prompts:
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        toks = g[0, len(p):].tolist()
        out.append(toks[: toks.index(eos)] if eos in toks else toks)
    return out


def test_spec_on_a_trained_adapter_is_the_parents_hf_greedy_output(run, parent):
    _, res = run
    loaded = load_checkpoint(res.final_dir)
    tok = loaded.tokenizer
    prompts = [tok.encode(e.prompt) for e in generate_examples("heldout", 12, seed=11)]
    want = hf_greedy(parent, prompts, 20, tok.eos_id)
    for d in (1, 3):
        cfg = loaded.decode_config(mode="spec", draft_len=d, max_new_tokens=20, spec_tokens=1024)
        got = loaded.generate(prompts, cfg)
        assert [g.tokens for g in got] == want
        assert sum(g.drafted for g in got) > 0


@pytest.mark.skipif(not (REPO / "assets/tiny-adapter" / ma.ADAPTER_JSON).is_file(), reason="bundled adapter absent")
def test_spec_on_the_bundled_adapter_is_the_bundled_parents_hf_greedy_output():
    """assets/tiny-adapter over assets/tiny-ar (recipes/tiny_adapter.toml): 40 held-out prompts, batched."""
    loaded = load_checkpoint(REPO / "assets/tiny-adapter")
    tok = loaded.tokenizer
    prompts = [tok.encode(e.prompt) for e in generate_examples("heldout", 40, seed=19)]
    want = hf_greedy(REPO / "assets/tiny-ar", prompts, 24, tok.eos_id)
    got = loaded.generate(prompts, loaded.decode_config(mode="spec", max_new_tokens=24, spec_tokens=1024))
    assert [g.tokens for g in got] == want
    assert sum(g.accepted for g in got) > 0.15 * sum(g.drafted for g in got)  # trained drafts get accepted (0.26 here)


@pytest.mark.parametrize("mode", ["threshold", "S", "Q"])
def test_block_modes_on_an_adapter_equal_the_reference_decoder(run, mode):
    _, res = run
    loaded = load_checkpoint(res.final_dir)
    model, tok, info = loaded.model, loaded.tokenizer, loaded.info
    prompts = [tok.encode(e.prompt) for e in generate_examples("heldout", 4, seed=13)]
    cfg = DecodeConfig(mode=mode, block_size=info.block_size, steps=info.block_size, max_new_tokens=16)
    batch = generate(model, prompts, cfg, mask_id=info.mask_token_id, eos_ids=tok.eos_ids)
    for p, g in zip(prompts, batch):
        ref = reference_generate(model, p, cfg, mask_id=info.mask_token_id, eos_ids=tok.eos_ids)
        assert g.tokens == ref.tokens and g.edits == ref.edits


# ----------------------------------------------------------------------------------------- the base reference
def test_a_changed_or_missing_base_is_refused_naming_both(run, parent, tmp_path):
    _, res = run
    other = tmp_path / "other"
    shutil.copytree(parent, other)
    load_checkpoint(res.final_dir, base=other)  # an identical copy is the same base: accepted
    m = load_pretrained(other)
    with torch.no_grad():
        m.layers[0].attention.wq.weight[0, 0] += 1e-3
    save_pretrained(m, other, tokenizer=load_checkpoint(parent).tokenizer)
    with pytest.raises(ValueError, match="another base") as e:
        load_checkpoint(res.final_dir, base=other)
    assert str(res.final_dir) in str(e.value) and str(other) in str(e.value)
    moved = tmp_path / "moved"
    shutil.copytree(res.final_dir, moved)
    meta = ma.read_meta(moved)
    meta["base"]["path"], meta["base"]["abs_path"] = "../nowhere", str(tmp_path / "nowhere")
    import json

    (moved / ma.ADAPTER_JSON).write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="base model is not at"):
        load_checkpoint(moved)
    assert load_checkpoint(moved, base=parent).is_diffusion
    with pytest.raises(ValueError, match="base= is for adapter folders"):
        load_checkpoint(parent, base=parent)


def test_merge_averages_the_adapter_tensors(run, tmp_path):
    out, _ = run
    a, b = list_checkpoints(out)[-2:]
    merged = average_checkpoints([a, b], tmp_path / "merged")
    got = ma.adapter_state(load_checkpoint(merged).model)
    sa, sb = ma.adapter_state(load_checkpoint(a).model), ma.adapter_state(load_checkpoint(b).model)
    for k in got:
        torch.testing.assert_close(got[k], ((sa[k].double() + sb[k].double()) / 2).float(), rtol=0, atol=1e-7)
    assert not (tmp_path / "merged" / "config.json").exists()


def test_resume_continues_an_adapter_run_exactly(run, parent, tiny_data, tmp_path):
    _, res = run
    recipe = adapter_recipe(parent, tiny_data)
    train(recipe, tmp_path / "cut", progress=False, max_steps=4)
    train(recipe, tmp_path / "cut", progress=False, resume=True)
    want, got = ma.adapter_state(load_checkpoint(res.final_dir).model), ma.adapter_state(
        load_checkpoint(tmp_path / "cut/final").model)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_post_training_an_adapter_checkpoint_needs_the_same_adapter(run, tiny_data):
    _, res = run
    with pytest.raises(ValueError, match="mask-only adapter over a frozen base"):
        train(make_recipe(res.final_dir, tiny_data, phases=PHASES), res.final_dir.parent / "x", progress=False)
    with pytest.raises(ValueError, match="differs from the adapter"):
        train(make_recipe(res.final_dir, tiny_data, phases=PHASES, adapter={**ADAPTER, "rank": 2}),
              res.final_dir.parent / "y", progress=False)


# ----------------------------------------------------------------------------------------- recipe and plan
@pytest.mark.parametrize("sections, match", [
    ({"adapter": {"kind": "qlora"}}, "kind must be none or lora"),
    ({"adapter": {"kind": "lora", "rank": 0}}, "rank must be >= 1"),
    ({"adapter": {"kind": "lora", "targets": ["qkv"]}}, "targets must be distinct names"),
    ({"adapter": {"kind": "lora", "dropout": 1.0}}, "dropout must be in"),
    ({"adapter": {"kind": "lora", "ranks": 4}}, "unknown field"),
    ({"adapter": {"kind": "lora"}, "diffusion": {"ar_weight": 1.0}}, "ar_weight"),
    ({"adapter": {"kind": "lora"}, "diffusion": {"t2t_ratio": 0.5}}, "t2t_ratio"),
    ({"adapter": {"kind": "lora"}, "train": {"trainable": "mask_embedding"}}, "remove \\[train\\] trainable"),
])
def test_adapter_recipe_checks(tiny_ar_dir, tiny_data, sections, match):
    with pytest.raises(RecipeError, match=match):
        make_recipe(tiny_ar_dir, tiny_data, phases=PHASES, **sections)


def test_ar_kind_refuses_an_adapter(tiny_ar_dir, tiny_data):
    from blockdiff.train.recipe import parse_recipe

    raw = {"model": {"path": str(tiny_ar_dir)}, "data": {"train": [str(tiny_data["train"])]},
           "objective": {"kind": "ar"}, "adapter": {"kind": "lora"},
           "phases": [{"block_size": 1, "steps": 2, "lr": 1e-3}]}
    with pytest.raises(RecipeError, match="kind \"ar\" has none"):
        parse_recipe(raw)


def test_plan_counts_adapter_only_gradients_and_optimizer(tiny_ar_dir):
    from blockdiff.model.hf_io import load_config

    cfg = load_config(tiny_ar_dir)
    a = ma.AdapterConfig(kind="lora", rank=4)
    full = plan_memory(cfg, seq_len=L, batch_size=2, block_size=4, device="cpu")
    lora = plan_memory(cfg, seq_len=L, batch_size=2, block_size=4, device="cpu", adapter=a)
    m = load_checkpoint(tiny_ar_dir).model
    ma.attach(m, a, 0, {"path": "x", "sha256": {}, "vocab_size": cfg.vocab_size})
    n = ma.trainable_parameters(m)
    assert lora.rows["gradients"] == 4 * n and lora.rows["optimizer"] == 8 * n
    assert lora.rows["weights"] == full.rows["weights"] + 4 * n
    assert lora.rows["activations"] == full.rows["activations"]
    assert ma.adapter_parameters(cfg, a) == n


def test_activation_checkpointing_recomputes_with_each_forwards_own_masks(parent):
    """Two forwards with different [MASK] positions, one backward: with activation checkpointing the blocks are
    recomputed in backward, after the second forward set the gate; the gradients must equal those without it."""
    from blockdiff.model.transformer import resize_vocab
    from blockdiff.train.parallel import ParallelConfig, apply_ac

    def grads(ac: bool) -> list[torch.Tensor]:
        m = load_checkpoint(parent, train=True).model
        V0 = m.cfg.vocab_size
        resize_vocab(m, V0 + 1)
        ma.attach(m, ma.AdapterConfig(kind="lora", rank=4), V0, {"path": "x", "sha256": {}, "vocab_size": V0})
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        if ac:
            apply_ac(m, ParallelConfig(ac="full"))
        ids = torch.randint(0, V0, (2, 16), generator=torch.Generator().manual_seed(4))
        a, b = ids.clone(), ids.clone()
        a[:, 10:], b[:, 4:] = V0, V0
        loss = m(a, mask=causal(16)).square().mean() + 2 * m(b, mask=causal(16)).square().mean()
        loss.backward()
        return [p.grad for p in m.parameters() if p.requires_grad]

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) == len(checkpointed)
    for g0, g1 in zip(plain, checkpointed):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sft", "dpo", "rl"])
def test_post_training_with_an_adapter_keeps_the_base(kind, tiny_bd_dir, tmp_path):
    """SFT, DPO and RL over a block-diffusion base with [adapter]: two steps, the base untouched, the adapter moved."""
    from test_post_train import recipe_for

    from blockdiff.data.bundled import write_post_data

    d = tmp_path / "data"
    d.mkdir()
    write_post_data(d, "chat", train=8, valid=4)
    write_post_data(d, "pairs", train=8, valid=4)
    import json

    (d / "rl.jsonl").write_text("".join(json.dumps({"prompt": f"say {c}", "answer": c}) + "\n" for c in "eta"))
    recipe = recipe_for(kind, tiny_bd_dir, d, steps=2, adapter=ADAPTER)
    res = train(recipe, tmp_path / "run", progress=False)
    got = load_checkpoint(res.final_dir).model
    base = load_pretrained(tiny_bd_dir).state_dict()
    for k, v in got.state_dict().items():
        if not ma.is_adapter_param(k):
            assert torch.equal(v, base[k]), k
    assert any(v.abs().max() > 0 for k, v in ma.adapter_state(got).items() if k.endswith(".B"))


def test_adapter_run_resumes_under_fsdp2_on_two_ranks(parent, tiny_data, tmp_path):
    """FSDP2 + DCP: an adapter run saved by one process at step 2 and resumed by `torchrun` on 2 CPU ranks (gloo,
    the DCP state resharded) == the uninterrupted one-process run (deterministic recipe: every token masked, no
    embedding noise, so 2 ranks x batch 2 see the batch one process sees). The frozen base stays bit-identical."""
    from dist_helpers import assert_close_weights, torchrun, write_toml
    from test_distributed import convert_args, raw_recipe

    from blockdiff.train.recipe import parse_recipe

    def raw(batch: int) -> dict:
        # LLaDA2's alignment (the parent's default): with every token masked each row scores the same number of
        # tokens, so a rank's token mean is the global one (with shifted labels a row's first token of each
        # document is not scored, the per-rank means differ and 2 ranks != 1 process for full weights too)
        r = raw_recipe(parent, tiny_data, batch=batch, deterministic=True, steps=4)
        r["adapter"] = dict(ADAPTER)
        return r

    one = parse_recipe(raw(4), source="adapter-1")
    train(one, tmp_path / "one", progress=False)
    train(one, tmp_path / "two", progress=False, max_steps=2)
    toml = write_toml(raw(2), tmp_path / "r2.toml")
    torchrun(2, convert_args(toml, tmp_path / "two", "--resume"))
    assert ma.is_adapter_folder(tmp_path / "two/final")
    assert_close_weights(tmp_path / "two/final", tmp_path / "one/final")
    base = load_pretrained(parent).state_dict()
    got = load_checkpoint(tmp_path / "two/final").model.state_dict()
    V0 = base["tok_embeddings.weight"].shape[0]
    assert all(torch.equal(got[k][:V0] if k.endswith(("tok_embeddings.weight", "output.weight")) else got[k], base[k])
               for k in base)
