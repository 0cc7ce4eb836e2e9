"""The training loop on a tiny model, CPU: an interrupted-and-resumed run equals an uninterrupted one bit for bit
(also with gradient accumulation, and inside the embedding-noise anneal), gradient accumulation 2x1 equals 1x2,
two runs with one seed are identical, checkpoints hold everything a resume and HF transformers need, the
[MASK] token is added once, the NaN guard stops before any bad update is saved, and bad input fails early."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import blockdiff.train.loop as loop
import blockdiff.train.tasks as tasks
from blockdiff.data.documents import DataError
from blockdiff.data.tokenizer import load_tokenizer
from blockdiff.decode.engine import ar_generate
from blockdiff.load import load_checkpoint
from blockdiff.model.hf_io import load_pretrained
from blockdiff.train.checkpoint import list_checkpoints, load_resume_state, load_trainer_state
from blockdiff.train.loop import TrainingDiverged, train
from blockdiff.train.metrics import read_metrics
from blockdiff.train.recipe import parse_recipe
from blockdiff.train.schedule import Schedule
from train_helpers import L, THREE_PHASES, assert_same_weights, make_recipe, weights  # noqa: F401

def train_lines(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if not r.get("eval")]


def eval_lines(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("eval")]


def ckpt_steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]


def no_temp_folders(run_dir: Path) -> None:
    leftovers = [p for p in run_dir.rglob(".*") if p.name != ".cache" and ".cache" not in p.parts
                 and not (p.name == ".metadata" and p.parent.name == "resume")]  # DCP's own index file
    assert not leftovers, f"temporary files left: {leftovers}"


# Compared between runs; tokens_per_s is wall-clock.
DETERMINISTIC = ("step", "phase", "block_size", "lr", "loss", "masked_nll", "masked_acc", "mask_frac", "grad_norm",
                 "embed_noise_std")


@pytest.fixture(scope="module")
def run_a(tiny_ar_dir, tiny_data, tmp_path_factory):
    """The uninterrupted reference run (3 phases, 10 steps) from the AR model without a mask token."""
    recipe = make_recipe(tiny_ar_dir, tiny_data)
    run_dir = tmp_path_factory.mktemp("run_a") / "run"
    result = train(recipe, run_dir, progress=False)
    return recipe, run_dir, result


# ------------------------------------------------------------------------------ exact resume
def test_resume_mid_phase_equals_uninterrupted_run(run_a, tmp_path):
    recipe, dir_a, res_a = run_a
    assert res_a.steps == recipe.total_steps == 10
    dir_b = tmp_path / "run"
    part = train(recipe, dir_b, progress=False, max_steps=5)  # killed mid phase 2, between saves at 3 and 6
    assert part.steps == 5 and not (dir_b / "final").exists()
    assert ckpt_steps(dir_b) == [3, 5], "max_steps must checkpoint before stopping"
    # the fresh run B and the fresh run A agree up to the shared checkpoint
    assert_same_weights(dir_a / "checkpoints/step_000003", dir_b / "checkpoints/step_000003")

    res_b = train(recipe, dir_b, progress=False, resume=True)
    assert res_b.steps == 10
    assert_same_weights(dir_a / "final", dir_b / "final")
    assert_same_weights(dir_a / "checkpoints/step_000010", dir_b / "checkpoints/step_000010")

    lines_a, lines_b = train_lines(dir_a), train_lines(dir_b)
    assert [r["step"] for r in lines_b] == list(range(1, 11)), "duplicate or missing step lines after resume"
    for ra, rb in zip(lines_a, lines_b):
        assert {k: ra[k] for k in DETERMINISTIC} == {k: rb[k] for k in DETERMINISTIC}
    assert any(r["embed_noise_std"] > 0 for r in lines_b[5:]), "resume point should lie inside the noise anneal"
    evals_a = {r["step"]: r["val_nll"] for r in eval_lines(dir_a)}
    evals_b = {r["step"]: r["val_nll"] for r in eval_lines(dir_b)}
    assert len(eval_lines(dir_b)) == len(evals_b), "duplicate eval lines after resume"
    assert evals_b.keys() == evals_a.keys() | {5}  # the interrupted run also evaluated where it stopped
    assert all(evals_b[s] == v for s, v in evals_a.items())
    no_temp_folders(dir_b)


def test_resume_with_grad_accum(tiny_ar_dir, tiny_data, tmp_path):
    phases = [{"block_size": 1, "steps": 2, "lr": 1e-3}, {"block_size": 8, "steps": 3, "lr": 1e-3}]
    recipe = make_recipe(tiny_ar_dir, tiny_data, phases, train={"grad_accum": 2, "batch_size": 2, "save_every": 2})
    train(recipe, tmp_path / "a", progress=False)
    train(recipe, tmp_path / "b", progress=False, max_steps=3)
    state = load_trainer_state(tmp_path / "b/checkpoints/step_000003")
    assert state["step"] == 3
    n_rows = state["data"]["n_sequences"]
    assert state["data"]["epoch"] * n_rows + state["data"]["index"] == 3 * 2 * 2  # steps * grad_accum * batch
    train(recipe, tmp_path / "b", progress=False, resume=True)
    assert_same_weights(tmp_path / "a/final", tmp_path / "b/final")
    la, lb = train_lines(tmp_path / "a"), train_lines(tmp_path / "b")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_grad_accum_2x1_equals_1x2(tiny_ar_dir, tiny_data, tmp_path):
    """Every token masked (t = 1): no randomness, so two micro-batches of 1 row give the gradient of one batch of
    2 rows (the ELBO loss is normalised per row-token, all rows have L tokens)."""
    common = dict(diffusion={"t_lo": 1.0, "t_hi": 1.0}, noise={"enabled": False}, data={"valid": []})
    phases = [{"block_size": 8, "steps": 1, "lr": 1e-3}]
    one = make_recipe(tiny_ar_dir, tiny_data, phases, train={"batch_size": 2, "grad_accum": 1}, **common)
    two = make_recipe(tiny_ar_dir, tiny_data, phases, train={"batch_size": 1, "grad_accum": 2}, **common)
    train(one, tmp_path / "one", progress=False)
    train(two, tmp_path / "two", progress=False)
    (r1,), (r2,) = train_lines(tmp_path / "one"), train_lines(tmp_path / "two")
    assert r1["mask_frac"] == r2["mask_frac"] == 1.0
    assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-6)
    assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5)


# ------------------------------------------------------------------------------ determinism
def test_same_seed_same_weights_other_seed_differs(run_a, tmp_path):
    recipe, dir_a, _ = run_a
    train(recipe, tmp_path / "same", progress=False, max_steps=3)
    assert_same_weights(dir_a / "checkpoints/step_000003", tmp_path / "same/checkpoints/step_000003")
    other = make_recipe(recipe.model.path, {"train": Path(recipe.data.train[0]), "valid": Path(recipe.data.valid[0])},
                        train={"seed": 1})
    train(other, tmp_path / "other", progress=False, max_steps=3)
    wa, wo = weights(dir_a / "checkpoints/step_000003"), weights(tmp_path / "other/checkpoints/step_000003")
    assert any(not torch.equal(wa[k], wo[k]) for k in wa)


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("step,block", [(3, 1), (6, L), (10, 4)])
def test_checkpoint_contents(run_a, step, block):
    recipe, run_dir, _ = run_a
    ckpt = run_dir / f"checkpoints/step_{step:06d}"
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "trainer_state.json", "recipe.json"} <= names
    # the resume state (DCP model + optimizer, RNG) is kept in the newest checkpoint only
    assert ({"resume", "rng"} <= names) == (step == 10) and not names & {"optimizer.pt", "rng.pt"}
    tok = load_tokenizer(ckpt)
    assert tok.mask_token == "<|mask|>" and tok.mask_id is not None
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["blockdiff"] == {"mask_token_id": tok.mask_id, "block_size": block, "labels": "same",
                                "clean_stream": "block_causal"}
    assert cfg["vocab_size"] == tok.vocab_size

    state = load_trainer_state(ckpt)
    assert state["step"] == step and state["block_size"] == block
    assert state["phase_end"] == (step in (3, 6, 10))
    d = state["data"]
    assert d["epoch"] * d["n_sequences"] + d["index"] == step * recipe.train.batch_size
    assert isinstance(state["val_nll"], float) and math.isfinite(state["val_nll"])
    assert json.loads((ckpt / "recipe.json").read_text()) == json.loads(json.dumps(recipe.to_dict()))
    if step == 10:
        model = load_pretrained(run_dir / "checkpoints/step_000003")  # older weights: the resume state replaces them
        optimizer = loop.build_optimizer(model, recipe)
        load_resume_state(ckpt, model, optimizer, torch.Generator())
        assert optimizer.state and all(int(s["step"]) == step for s in optimizer.state.values())
        assert_same_weights_as(model, ckpt)
        rng = torch.load(ckpt / "rng/rank_00000.pt", weights_only=False)
        assert {"noise", "torch", "python", "numpy"} <= rng.keys()

    model = load_pretrained(ckpt)
    assert model.cfg.diffusion.mask_token_id == tok.mask_id and model.cfg.diffusion.block_size == block


def assert_same_weights_as(model, folder: Path) -> None:
    saved = load_pretrained(folder).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_checkpoint_loads_in_hf_transformers(run_a):
    transformers = pytest.importorskip("transformers")
    _, run_dir, _ = run_a
    ckpt = run_dir / "checkpoints/step_000010"
    ours = load_pretrained(ckpt).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids, torch.arange(12)[None], torch.ones(12, 12, dtype=torch.bool).tril()[None, None])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert hf_tok.convert_tokens_to_ids("<|mask|>") == ours.cfg.diffusion.mask_token_id


def test_mask_token_added_when_absent(run_a, tiny_ar_dir):
    _, run_dir, _ = run_a
    parent_tok = load_tokenizer(tiny_ar_dir)
    assert parent_tok.mask_id is None
    parent = load_pretrained(tiny_ar_dir)
    v = parent.cfg.vocab_size
    loaded = load_checkpoint(run_dir / "final")
    final, tok = loaded.model, loaded.tokenizer
    assert tok.vocab_size == parent_tok.vocab_size + 1 and tok.mask_id == parent_tok.vocab_size
    assert final.cfg.vocab_size == v + 1 and final.tok_embeddings.weight.shape[0] == v + 1
    assert final.cfg.diffusion.mask_token_id == tok.mask_id and final.cfg.diffusion.block_size == 4
    assert tok.encode("add 1+2=") == parent_tok.encode("add 1+2=")  # the old tokens keep their ids
    # every trainable parameter moved (old vocabulary rows compared)
    for (name, p0), p1 in zip(parent.named_parameters(), final.parameters()):
        assert not torch.equal(p0, p1[: p0.shape[0]]), f"{name} did not move"


def test_mask_token_reused_when_present(tiny_bd_dir, tiny_data, tmp_path):
    tok0 = load_tokenizer(tiny_bd_dir)
    v0 = load_pretrained(tiny_bd_dir).cfg.vocab_size
    assert tok0.mask_id is not None
    recipe = make_recipe(tiny_bd_dir, tiny_data, [{"block_size": 8, "steps": 1, "lr": 1e-3}])
    train(recipe, tmp_path / "run", progress=False)
    loaded = load_checkpoint(tmp_path / "run/final")
    tok, model = loaded.tokenizer, loaded.model
    assert tok.vocab_size == tok0.vocab_size and tok.mask_id == tok0.mask_id
    assert model.cfg.vocab_size == v0 and model.cfg.diffusion.mask_token_id == tok0.mask_id


def test_trainable_mask_embedding_moves_only_the_mask_row(tiny_bd_dir, tiny_data, tmp_path):
    """[train] trainable = "mask_embedding" (train/optim.py): after a few steps (weight decay on, a high lr) every
    parameter but the [MASK] row of the tied embedding is bit-identical to the start, the row moved, so the AR
    greedy output is identical; [model] decode_block_size is what the checkpoints record, not the trained B."""
    recipe = make_recipe(tiny_bd_dir, tiny_data, [{"block_size": 4, "steps": 4, "lr": 1e-2}],
                         train={"trainable": "mask_embedding", "weight_decay": 0.1}, model={"decode_block_size": 16})
    train(recipe, tmp_path / "run", progress=False)
    start, end = load_checkpoint(tiny_bd_dir), load_checkpoint(tmp_path / "run/final")
    mask_id = start.model.cfg.diffusion.mask_token_id
    p0, p1 = start.model.state_dict(), end.model.state_dict()
    assert p0.keys() == p1.keys() and end.model.output.weight is end.model.tok_embeddings.weight  # tied
    for k in p0:
        if k not in ("tok_embeddings.weight", "output.weight"):
            assert torch.equal(p0[k], p1[k]), f"{k} moved"
    e0, e1 = p0["tok_embeddings.weight"], p1["tok_embeddings.weight"]
    others = torch.arange(e0.shape[0]) != mask_id
    assert torch.equal(e0[others], e1[others]) and not torch.equal(e0[mask_id], e1[mask_id])
    for text in ("add 1+2=", "def f(x):", "reverse abc ->"):
        ids = start.tokenizer.encode(text)
        assert ar_generate(start.model.eval(), ids, max_new_tokens=12, eos_ids=()).tokens == \
            ar_generate(end.model.eval(), ids, max_new_tokens=12, eos_ids=()).tokens
    assert end.model.cfg.diffusion.block_size == 16
    assert load_trainer_state(list_checkpoints(tmp_path / "run")[-1])["block_size"] == 4  # the merge reads this one


def test_trainable_mask_embedding_needs_a_mask_token(tiny_ar_dir, tiny_data, tmp_path):
    recipe = make_recipe(tiny_ar_dir, tiny_data, [{"block_size": 4, "steps": 1, "lr": 1e-2}],
                         train={"trainable": "mask_embedding"})
    with pytest.raises(ValueError, match=r"trainable = \"mask_embedding\" trains the \[MASK\] row .* has none"):
        train(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ metrics
def test_metrics_and_loss_curve(run_a):
    recipe, run_dir, res = run_a
    sched = Schedule(recipe)
    lines = train_lines(run_dir)
    assert [r["step"] for r in lines] == list(range(1, 11))
    for r in lines:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert r["lr"] == sched.lr_at(r["step"] - 1)
        assert r["block_size"] == sched.phase_at(r["step"] - 1).block_size
    evals = eval_lines(run_dir)
    assert [r["step"] for r in evals] == [3, 6, 9, 10]
    assert [r["block_size"] for r in evals] == [1, L, 4, 4]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_nll"]))
    assert [e["val_nll"] for e in res.evals] == [r["val_nll"] for r in evals]
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ NaN / inf guard
@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_divergence_stops_before_saving(what, tiny_ar_dir, tiny_data, tmp_path, monkeypatch):
    phases = [{"block_size": 1, "steps": 3, "lr": 1e-3}, {"block_size": 8, "steps": 3, "lr": 1e-3}]
    recipe = make_recipe(tiny_ar_dir, tiny_data, phases, train={"save_every": 2})
    real, calls = tasks.diffusion_loss, []

    def poisoned(model, batch, cfg, **kw):
        loss, m = real(model, batch, cfg, **kw)
        calls.append(1)
        if len(calls) == 5:  # step 5 (1-based), phase 2
            if what == "loss":
                loss = loss * float("nan")
            else:  # finite loss, non-finite gradient: d sqrt(x)/dx at 0
                loss = loss + torch.sqrt(0.0 * model.norm.weight.sum())
        return loss, m

    monkeypatch.setattr(tasks, "diffusion_loss", poisoned)  # the loop's objective comes from train/tasks.py
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train(recipe, run_dir, progress=False)
    last_good = run_dir / "checkpoints/step_000004"
    msg = str(e.value)
    assert "step 5" in msg and "phase2-B8" in msg and what in msg and str(last_good) in msg
    assert ckpt_steps(run_dir) == [2, 3, 4]
    assert not (run_dir / "final").exists()
    no_temp_folders(run_dir)
    assert load_pretrained(last_good).cfg.diffusion.block_size == 8
    assert [r["step"] for r in train_lines(run_dir)] == [1, 2, 3, 4]

    monkeypatch.setattr(tasks, "diffusion_loss", real)  # "continue with --resume" works from there
    assert train(recipe, run_dir, progress=False, resume=True).steps == 6
    assert [r["step"] for r in train_lines(run_dir)] == list(range(1, 7))


# ------------------------------------------------------------------------------ refusals
def test_resume_without_a_run_refuses_and_a_finished_run_trains_nothing(run_a, tiny_ar_dir, tiny_data, tmp_path, capsys):
    """Issue 21 item 13: `--resume` with nothing to resume used to start the whole run from step 0 after one line;
    now it refuses (saying how to start) and creates nothing. A finished run resumed again trains no step and
    says so."""
    from cli_helpers import assert_usage_error, run_cli
    from test_cli_errors import write_recipe

    recipe, run_dir, _ = run_a
    with pytest.raises(FileNotFoundError, match="without --resume"):
        train(recipe, tmp_path / "none", progress=False, resume=True)
    assert not (tmp_path / "none").exists()
    toml = write_recipe(tmp_path, tiny_ar_dir, tiny_data)
    code, _, err = run_cli(["convert", "--recipe", toml, "--out", tmp_path / "none", "--resume", "--no-progress"])
    assert_usage_error(code, err, "convert", "holds no checkpoint", "without --resume")
    assert not (tmp_path / "none").exists()
    lines = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert train(recipe, run_dir, progress=False, resume=True).steps == recipe.total_steps
    assert "already finished its 10 steps: nothing to train" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_bytes() == lines


def test_refuses_to_overwrite_a_run(run_a):
    recipe, run_dir, _ = run_a
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(recipe, run_dir, progress=False)
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_bad_data_fails_before_any_checkpoint(tiny_ar_dir, tiny_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"text": oops}\n')
    recipe = make_recipe(tiny_ar_dir, {"train": bad, "valid": tiny_data["valid"]})
    with pytest.raises(DataError, match=rf"{bad}:3: invalid JSON"):
        train(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run/checkpoints").exists()


# ------------------------------------------------------------------ the [MASK] row of a tokenizer without one
def _model_dir_with_specials_last(folder, *, padding_rows: int, tied: bool):
    """A random tiny model whose tokenizer is laid out like Qwen's / Llama 3's (byte-level BPE, then the special
    tokens added after it) and has no mask token; its table has `padding_rows` rows past the tokenizer (Qwen:
    151,936 rows for 151,669 tokens), filled with values far from the trained rows' mean."""
    from tokenizers import AddedToken
    from conftest import tiny_texts

    from blockdiff.data.tokenizer import save_tokenizer, train_bpe_tokenizer
    from blockdiff.model.config import ModelConfig
    from blockdiff.model.hf_io import save_pretrained
    from blockdiff.model.transformer import Transformer

    raw = train_bpe_tokenizer(tiny_texts(100, 5_000), 300, [])
    raw.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    save_tokenizer(raw, folder, eos_token="<|endoftext|>")
    n = raw.get_vocab_size()
    cfg = ModelConfig(family="llama", vocab_size=n + padding_rows, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=tied, max_position_embeddings=64)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        for w in {id(p): p for p in (model.tok_embeddings.weight, model.output.weight)}.values():
            w[n:] = 5.0  # untrained padding rows: not what a [MASK] row should start from
    save_pretrained(model, folder, tokenizer=load_tokenizer(folder))
    return n


@pytest.mark.parametrize("padding_rows, tied", [(8, False), (8, True), (0, True), (0, False)],
                         ids=["qwen-padding-untied", "qwen-padding-tied", "llama-tied", "llama-untied"])
def test_new_mask_row_is_the_mean_of_trained_rows(tmp_path, tiny_data, padding_rows, tied):
    """The tokenizer has no mask token: `<|mask|>` gets the next id, which lies inside the table when the table has
    padding rows (no row is added) and past it otherwise (the table grows). Either way its embedding (and untied
    head) row is the mean of the rows below the tokenizer's size, and every other row is unchanged."""
    n = _model_dir_with_specials_last(tmp_path / "m", padding_rows=padding_rows, tied=tied)
    before = load_pretrained(tmp_path / "m")
    model, tok = loop.prepare_model(make_recipe(tmp_path / "m", tiny_data), torch.device("cpu"))
    assert tok.mask_id == n and tok.vocab_size == n + 1
    assert model.cfg.vocab_size == max(n + padding_rows, n + 1)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    for name in ("tok_embeddings", "output"):
        old, new = getattr(before, name).weight, getattr(model, name).weight
        torch.testing.assert_close(new[tok.mask_id], old[:n].mean(0), rtol=0, atol=1e-6)
        others = torch.arange(len(old)) != tok.mask_id
        assert torch.equal(new[:len(old)][others], old[others])


def test_existing_mask_row_is_kept(tiny_bd_dir, tiny_data, tmp_path):
    """A checkpoint whose tokenizer has a mask token (a converted one) keeps its [MASK] row as trained."""
    from blockdiff.model.hf_io import save_pretrained

    model = load_pretrained(tiny_bd_dir)
    mask_id = model.cfg.diffusion.mask_token_id
    with torch.no_grad():
        model.tok_embeddings.weight[mask_id] = 3.0  # a trained row, not the mean of the others
    save_pretrained(model, tmp_path / "bd", tokenizer=load_tokenizer(tiny_bd_dir))
    got, tok = loop.prepare_model(make_recipe(tmp_path / "bd", tiny_data), torch.device("cpu"))
    assert tok.mask_id == mask_id
    assert torch.equal(got.tok_embeddings.weight, model.tok_embeddings.weight)
