"""Many ranks (issue 14): real `torchrun` launches of `blockdiff convert` on 2 CPU ranks (gloo, FSDP2, DCP), compared
with the plain single-process loop on the same recipe.

Equivalence needs the same noise on both sides. Ranks draw their own noise (seed + rank), so a 2-rank run and one
process see different masks unless the mask is not random: the "deterministic" recipe masks every token
(t_lo = t_hi = 1) and has no embedding noise, so 2 ranks x batch 2 must equal 1 process x batch 4 up to the order
of floating-point sums. The kill / resume test keeps all the noise (t band, embedding noise): there the same
2 ranks must continue bit for bit from every rank's saved RNG state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_helpers import assert_close_weights, state, torchrun, torchrun_killed, write_toml

from blockdiff.model.hf_io import load_pretrained, save_pretrained
from blockdiff.train import checkpoint as ckpt_io
from blockdiff.train.loop import build_optimizer, train
from blockdiff.train.merge import merge_top_k
from blockdiff.train.recipe import RecipeError, parse_recipe

L = 32
STEPS = 6  # saves at 2, 4, 6


def raw_recipe(model_dir: Path, data: dict[str, Path], *, batch: int, deterministic: bool, steps: int = STEPS) -> dict:
    raw = {
        "model": {"path": str(model_dir)},
        "data": {"train": [str(data["train"])], "valid": [str(data["valid"])], "seq_len": L, "valid_rows": 8},
        "train": {"batch_size": batch, "eval_every": 2, "save_every": 2, "warmup_steps": 2, "decay_steps": 2,
                  "threads": 1, "device": "cpu"},
        "phases": [{"block_size": 4, "steps": steps, "lr": 2e-3}],
    }
    if deterministic:
        raw["diffusion"] = {"t_lo": 1.0, "t_hi": 1.0}
        raw["noise"] = {"enabled": False}
    else:
        raw["noise"] = {"frac": 0.8}
    return raw


def convert_args(recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "--recipe", str(recipe), "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def det(tiny_ar_dir, tiny_data, tmp_path_factory):
    """The deterministic recipe: one uninterrupted 2-rank run (batch 2 per rank) and the same recipe in one
    process with batch 4."""
    root = tmp_path_factory.mktemp("det")
    toml2 = write_toml(raw_recipe(tiny_ar_dir, tiny_data, batch=2, deterministic=True), root / "r2.toml")
    torchrun(2, convert_args(toml2, root / "two"))
    one = parse_recipe(raw_recipe(tiny_ar_dir, tiny_data, batch=4, deterministic=True), source="det-1")
    train(one, root / "one", progress=False)
    return {"root": root, "toml2": toml2, "two": root / "two", "one": root / "one", "data": tiny_data,
            "model": tiny_ar_dir}


def test_two_ranks_equal_one_process(det):
    """FSDP2 on 2 ranks with global batch 4 == the plain loop with batch 4 (fp32, every step of the run: lr
    schedule, clipping and AdamW on the sharded parameters) -- and the logged metrics are the global ones."""
    assert_close_weights(det["two"] / "final", det["one"] / "final")
    for step in (2, 4):
        assert_close_weights(det["two"] / f"checkpoints/step_{step:06d}", det["one"] / f"checkpoints/step_{step:06d}")
    m2 = [json.loads(x) for x in (det["two"] / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(x) for x in (det["one"] / "metrics.jsonl").read_text().splitlines()]
    assert len(m2) == len(m1) == STEPS + STEPS // 2
    for a, b in zip(m2, m1):
        assert a["step"] == b["step"] and a.get("lr") == b.get("lr")
        # grad_norm too: AdamW is nearly blind to a constant gradient scale, so a reduction that summed the ranks'
        # gradients instead of averaging them (2x) left weights and loss within tolerance; the norm doubles
        for key in (("val_nll",) if a.get("eval") else ("loss", "grad_norm")):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (key, a, b)
    assert (det["two"] / "report.json").is_file() and (det["two"] / "loss.png").is_file()


def test_checkpoint_keeps_resume_state_only_in_the_newest(det):
    ckpts = ckpt_io.list_checkpoints(det["two"])
    assert [c.name for c in ckpts] == ["step_000002", "step_000004", "step_000006"]
    for c in ckpts[:-1]:
        assert not ckpt_io.has_resume_state(c) and (c / "model.safetensors").is_file()
    newest = ckpts[-1]
    assert sorted(p.name for p in (newest / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert sorted(p.name for p in (newest / "resume").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert ckpt_io.load_trainer_state(newest)["ranks"] == 2
    assert not list((det["two"] / "checkpoints").glob(".*")), "no partial or parked folder left"


def test_save_at_two_resume_at_one(det):
    """Killed (SIGKILL, any moment after the step-2 checkpoint), then continued by one process with batch 4: DCP
    reshards model and optimizer, the data position is global, so it ends where the 2-rank run ends."""
    run = det["root"] / "killed"
    torchrun_killed(2, convert_args(det["toml2"], run), when=run / "checkpoints/step_000002")
    assert not (run / "final").exists(), "the kill came after the run ended"
    latest = ckpt_io.latest_checkpoint(run)
    assert ckpt_io.has_resume_state(latest)
    one = parse_recipe(raw_recipe(det["model"], det["data"], batch=4, deterministic=True), source="det-1")
    res = train(one, run, resume=True, progress=False)  # rank 0's RNG state is there; nothing else is random
    assert res.steps == STEPS
    assert_close_weights(run / "final", det["two"] / "final")
    assert ckpt_io.load_trainer_state(ckpt_io.latest_checkpoint(run))["ranks"] == 1


def test_export_equals_single_process_export(det, tmp_path):
    """The consolidated HF folder rank 0 writes from the shards == what one process writes from the same weights
    (byte for byte), and it loads in blockdiff and transformers."""
    newest = ckpt_io.latest_checkpoint(det["two"])
    plain = load_pretrained(det["two"] / "checkpoints/step_000002")  # older weights: the DCP state replaces them
    recipe = parse_recipe(raw_recipe(det["model"], det["data"], batch=4, deterministic=True), source="det-1")
    ckpt_io.load_resume_state(newest, plain, build_optimizer(plain, recipe), torch.Generator())
    save_pretrained(plain, tmp_path / "single")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "single" / name).read_bytes() == (newest / name).read_bytes(), name
    assert (det["two"] / "final/model.safetensors").read_bytes() == (newest / "model.safetensors").read_bytes()
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(det["two"] / "final", attn_implementation="eager").eval()
    ours = load_pretrained(det["two"] / "final").eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids, torch.arange(12)[None], torch.ones(12, 12, dtype=torch.bool).tril()[None, None])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_top_k_merge_on_sharded_run(det, tmp_path):
    res = merge_top_k(det["two"], 2, tmp_path / "merged")
    chosen = [c for c, _ in res.chosen]
    assert len(chosen) == 2
    merged, a, b = state(tmp_path / "merged"), state(chosen[0]), state(chosen[1])
    for k in merged:
        torch.testing.assert_close(merged[k], ((a[k].double() + b[k].double()) / 2).float(), rtol=0, atol=1e-7)


def test_kill_and_resume_two_ranks_is_exact(tiny_ar_dir, tiny_data, tmp_path):
    """With all the noise on (mask ratio band, embedding noise): an uninterrupted 2-rank run == a 2-rank run
    SIGKILLed after its step-2 checkpoint and resumed on 2 ranks (every rank's RNG, model and optimizer shards,
    the data position)."""
    toml = write_toml(raw_recipe(tiny_ar_dir, tiny_data, batch=2, deterministic=False), tmp_path / "r.toml")
    torchrun(2, convert_args(toml, tmp_path / "full"))
    run = tmp_path / "killed"
    torchrun_killed(2, convert_args(toml, run), when=run / "checkpoints/step_000002")
    assert not (run / "final").exists(), "the kill came after the run ended"
    torchrun(2, convert_args(toml, run, "--resume"))
    assert_close_weights(run / "final", tmp_path / "full/final", exact=True)
    full = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(full)


def test_moe_trains_under_fsdp(tmp_path):
    """The LLaDA2-MoE decoder (stacked experts sharded along the expert dimension) under FSDP2 on 2 ranks with
    activation checkpointing == one plain process without it, deterministic recipe, 2 steps."""
    from moe_helpers import official_config, official_tensors, write_official_folder

    hf = official_config("llada2_moe")
    folder = write_official_folder(tmp_path / "moe", hf, official_tensors(hf, seed=1), n_shards=2)
    texts = [f"def f{i}(x): return x + {i}\n" * 3 for i in range(200)]
    data = {}
    for split, rows in (("train", texts), ("valid", texts[:16])):
        data[split] = tmp_path / f"{split}.jsonl"
        data[split].write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    raw = raw_recipe(folder, data, batch=2, deterministic=True, steps=2)
    raw["parallel"] = {"ac": "full"}  # activation checkpointing inside FSDP2 units changes no number
    toml = write_toml(raw, tmp_path / "moe.toml")
    torchrun(2, convert_args(toml, tmp_path / "two"))
    train(parse_recipe(raw_recipe(folder, data, batch=4, deterministic=True, steps=2), source="moe-1"),
          tmp_path / "one", progress=False)
    start, two = load_pretrained(folder).state_dict(), state(tmp_path / "two/final")
    moved = [k for k in two if k in start and two[k].shape == start[k].shape and not torch.equal(two[k], start[k])]
    assert any("experts" in k for k in moved) and any("attn" in k or "attention" in k for k in moved)
    assert_close_weights(tmp_path / "two/final", tmp_path / "one/final")
    shutil.rmtree(tmp_path / "moe")


def test_activation_checkpointing_is_exact_in_one_process(tiny_ar_dir, tiny_data, tmp_path):
    """apply_ac recomputes each block in backward with the saved RNG state: the same weights, bit for bit, with
    all the noise on; the checkpoint keeps the model's own parameter names."""
    runs = {}
    for ac in ("none", "full"):
        raw = raw_recipe(tiny_ar_dir, tiny_data, batch=2, deterministic=False, steps=2)
        raw["parallel"] = {"ac": ac}
        train(parse_recipe(raw, source=f"ac-{ac}"), tmp_path / ac, progress=False)
        runs[ac] = tmp_path / ac / "final"
    assert_close_weights(runs["full"], runs["none"], exact=True)


def test_parallel_section_checks():
    base = {"model": {"path": "m"}, "data": {"train": ["t"]}, "phases": [{"block_size": 4, "steps": 1, "lr": 1e-3}]}
    for table, needle in (({"ac": "some"}, "ac must be one of none, full"), ({"fsdp": "yes"}, "fsdp must be one of"),
                          ({"param_dtype": "fp8"}, "param_dtype must be one of"),
                          ({"ranks": 2}, "set by the run")):
        with pytest.raises(RecipeError, match=needle):
            parse_recipe({**base, "parallel": table})


def test_only_sources_without_a_split_refuse_to_split():
    from blockdiff.train.parallel import Distributed, shard_batches
    from blockdiff.train.rollout import RolloutSource

    class Rows:  # a batch source with neither a row batch nor its own split
        def next_batch(self):
            return {}

    with pytest.raises(ValueError, match="cannot be split across 2 ranks"):
        shard_batches(Rows(), Distributed(rank=0, world=2))
    rollouts = RolloutSource.__new__(RolloutSource)  # splits its decoding itself: passed through whole
    assert shard_batches(rollouts, Distributed(rank=0, world=2)) is rollouts


def rl_raw(model_dir: Path, prompts: Path, **parallel) -> dict:
    raw = {"model": {"path": str(model_dir)}, "data": {"train": [str(prompts)]},
           "train": {"batch_size": 1, "save_every": 2, "eval_every": 2, "warmup_steps": 1, "threads": 1,
                     "device": "cpu"},
           "objective": {"kind": "rl"},
           "rollout": {"prompts_per_step": 3, "group_size": 4, "reward": "contains", "minibatches": 2,
                       "decode": {"max_new_tokens": 8, "threshold": 0.9}},
           "phases": [{"block_size": 8, "steps": 4, "lr": 3e-3}]}
    if parallel:
        raw["parallel"] = parallel
    return raw


@pytest.fixture(scope="module")
def rl_two(tiny_bd_dir, tmp_path_factory):
    """`train rl` on 2 ranks (3 prompt groups per rollout: group 0 decoded on rank 0, groups 1-2 on rank 1)."""
    root = tmp_path_factory.mktemp("rl")
    prompts = root / "rl.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {c}", "answer": c}) + "\n" for c in "eta"))
    toml = write_toml(rl_raw(tiny_bd_dir, prompts), root / "rl.toml")
    torchrun(2, ["train", "rl", "--recipe", str(toml), "--out", str(root / "two"), "--no-progress"])
    return {"root": root, "prompts": prompts, "toml": toml, "two": root / "two", "model": tiny_bd_dir}


def test_rl_rollouts_split_over_two_ranks(rl_two, tmp_path):
    """Each rank decodes its share of the prompt groups on a full replica of the weights, the responses are
    all-gathered, every rank trains on the whole global minibatch. The run equals the same recipe on a 1-rank FSDP
    group in one process (same global rollout: per-group seeds from the shared rollout generator) -- the weights
    of every checkpoint and of the final export, and the logged losses and rewards."""
    two = rl_two["two"]
    train(parse_recipe(rl_raw(rl_two["model"], rl_two["prompts"], fsdp="on"), source="rl-1"), tmp_path / "one",
          progress=False)
    for sub in ("final", "checkpoints/step_000002", "checkpoints/step_000004"):
        assert_close_weights(two / sub, tmp_path / "one" / sub)
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert len(m2) == len(m1) == 4
    for a, b in zip(m2, m1):
        for k in ("loss", "reward", "sequences", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
    assert any(r["sequences"] > 0 for r in m2), "no rollout group had a nonzero advantage"
    assert not torch.equal(state(two / "final")["norm.weight"], state(rl_two["model"])["norm.weight"])


def test_rl_kill_and_resume_two_ranks_is_exact(rl_two, tmp_path):
    """SIGKILLed after its step-2 checkpoint (the first rollout's 2 minibatches trained) and resumed on 2 ranks, the RL run ends bit-identical to the uninterrupted one: the rollout generator and pending minibatches
    are the same on every rank and saved in the checkpoint."""
    run = tmp_path / "killed"
    args = ["train", "rl", "--recipe", str(rl_two["toml"]), "--out", str(run), "--no-progress"]
    torchrun_killed(2, args, when=run / "checkpoints/step_000002")
    assert not (run / "final").exists(), "the kill came after the run ended"
    torchrun(2, [*args, "--resume"])
    assert_close_weights(run / "final", rl_two["two"] / "final", exact=True)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}  # noqa: E731
                       for x in p.read_text().splitlines()]
    assert strip(run / "metrics.jsonl") == strip(rl_two["two"] / "metrics.jsonl")


def test_fsdp_on_in_one_plain_process(tiny_ar_dir, tiny_data, tmp_path):
    """[parallel] fsdp = "on" without torchrun: FSDP2 on a group of one (what bench/scale.py's overhead row
    measures under torchrun) trains the same weights as the plain loop, and leaves no process group behind."""
    import torch.distributed as dist

    for fsdp in ("off", "on"):
        raw = raw_recipe(tiny_ar_dir, tiny_data, batch=2, deterministic=False, steps=2)
        raw["parallel"] = {"fsdp": fsdp}
        train(parse_recipe(raw, source=f"fsdp-{fsdp}"), tmp_path / fsdp, progress=False)
    assert not dist.is_initialized()
    assert_close_weights(tmp_path / "on/final", tmp_path / "off/final")
