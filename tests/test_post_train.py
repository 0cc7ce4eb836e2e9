"""Post-training through the one training loop on a tiny model, CPU: SFT (with CAP and the T2T stream), DPO and
EBPO RL move the parameters, resume exactly (stop mid-run, resume, bit-identical weights to an uninterrupted run;
for RL the rollout RNG and the pending minibatches are part of the saved state), DPO's reference stays
bit-identical to the starting model, and `blockdiff train sft|dpo|rl` runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import blockdiff.train.tasks as tasks
from blockdiff.cli import main
from blockdiff.data.bundled import write_post_data
from blockdiff.train.loop import train
from blockdiff.train.metrics import read_metrics
from blockdiff.train.recipe import RecipeError, parse_recipe
from train_helpers import weights


@pytest.fixture(scope="module")
def post_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("post")
    write_post_data(d, "chat", train=24, valid=8)
    write_post_data(d, "pairs", train=16, valid=8)
    (d / "rl.jsonl").write_text("".join(json.dumps({"prompt": f"say {c}", "answer": c}) + "\n" for c in "eta"))
    return d


def recipe_for(kind, model_dir, d: Path, steps=4, **sections):
    data = {"sft": {"train": [str(d / "sft_train.jsonl")], "valid": [str(d / "sft_valid.jsonl")], "seq_len": 128,
                    "valid_rows": 4},
            "dpo": {"train": [str(d / "pairs_train.jsonl")], "valid": [str(d / "pairs_valid.jsonl")], "seq_len": 128,
                    "valid_rows": 4},
            "rl": {"train": [str(d / "rl.jsonl")]}}[kind]
    raw = {"model": {"path": str(model_dir)}, "data": data,
           "train": {"batch_size": 2 if kind != "rl" else 1, "save_every": 2, "eval_every": 2, "warmup_steps": 1,
                     "threads": 1, "device": "cpu"},
           "objective": {"kind": kind},
           **{"sft": {"diffusion": {"t_lo": 0.3, "t_hi": 0.8}}, "dpo": {"dpo": {"t_lo": 0.3, "t_hi": 0.8}},
              "rl": {"rollout": {"prompts_per_step": 2, "group_size": 4, "reward": "contains", "minibatches": 2,
                                 "decode": {"max_new_tokens": 8, "threshold": 0.9}}}}[kind],
           "phases": [{"block_size": 8, "steps": steps, "lr": 3e-3}]}
    for name, fields in sections.items():
        raw.setdefault(name, {}).update(fields)
    return parse_recipe(raw, source=f"test-{kind}")


def same(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def moved(start, end) -> bool:
    ws, we = weights(start), weights(end)
    return all(not torch.equal(ws[k], we[k]) for k in ws if k != "tok_embeddings.weight") and \
        not torch.equal(ws["tok_embeddings.weight"], we["tok_embeddings.weight"])


def check_resume(recipe, tmp_path, stop=2):
    full = train(recipe, tmp_path / "a", progress=False)
    train(recipe, tmp_path / "b", progress=False, max_steps=stop)
    assert not (tmp_path / "b/final").exists()
    train(recipe, tmp_path / "b", progress=False, resume=True)
    assert same(tmp_path / "a/final", tmp_path / "b/final"), "resumed run differs from the uninterrupted one"
    la = [r for r in read_metrics(tmp_path / "a/metrics.jsonl") if not r.get("eval")]
    lb = [r for r in read_metrics(tmp_path / "b/metrics.jsonl") if not r.get("eval")]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    return full, la


def test_sft_moves_parameters_and_resumes_exactly(tiny_bd_dir, post_data, tmp_path):
    recipe = recipe_for("sft", tiny_bd_dir, post_data)
    assert recipe.diffusion.complementary, "complementary masking is on by default for SFT"
    res, lines = check_resume(recipe, tmp_path, stop=3)
    assert moved(tiny_bd_dir, res.final_dir)
    assert res.evals and all(r["mask_frac"] == pytest.approx(0.5) for r in lines)  # complementary pairs: t + (1-t)


def test_sft_with_cap_and_t2t_logs_their_metrics(tiny_bd_dir, post_data, tmp_path):
    recipe = recipe_for("sft", tiny_bd_dir, post_data, steps=2, data={"pack": True},
                        cap={"lam": 2.0}, diffusion={"t2t_ratio": 0.5, "t2t_max_rate": 0.5})
    res = train(recipe, tmp_path / "run", progress=False)
    lines = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if not r.get("eval")]
    assert all("cap_entropy" in r and "t2t_nll" in r and r["t2t_frac"] > 0 for r in lines)
    assert moved(tiny_bd_dir, res.final_dir)


def test_dpo_resumes_exactly_and_reference_stays_frozen(tiny_bd_dir, post_data, tmp_path, monkeypatch):
    refs = []
    real = tasks.dpo_loss

    def spy(model, batch, cfg, *, ref_model, generator=None):
        refs.append(ref_model)
        assert ref_model is not model and not ref_model.training
        assert not any(p.requires_grad for p in ref_model.parameters())
        return real(model, batch, cfg, ref_model=ref_model, generator=generator)

    monkeypatch.setattr(tasks, "dpo_loss", spy)
    recipe = recipe_for("dpo", tiny_bd_dir, post_data, dpo={"t_lo": 0.001, "t_hi": 1.0})
    res, lines = check_resume(recipe, tmp_path, stop=3)
    assert moved(tiny_bd_dir, res.final_dir)
    start = weights(tiny_bd_dir)
    for ref in {id(r): r for r in refs}.values():  # the reference of every run, incl. the resumed one
        sd = ref.state_dict()
        assert all(torch.equal(sd[k], start[k]) for k in start), "the DPO reference changed"
    assert {"reward_margin", "pref_acc", "reward_chosen"} <= lines[0].keys()


def test_rl_resumes_exactly_with_rollout_state(tiny_bd_dir, post_data, tmp_path):
    recipe = recipe_for("rl", tiny_bd_dir, post_data, train={"save_every": 1})
    # stop after step 1: the second minibatch of the first rollout is pending in the saved state
    res, lines = check_resume(recipe, tmp_path, stop=1)
    state = json.loads((tmp_path / "b/checkpoints/step_000001/trainer_state.json").read_text())["data"]
    assert len(state["pending"]) == 1 and state["generator"]
    assert any(r["sequences"] > 0 for r in lines), "no rollout group had a nonzero advantage"
    assert moved(tiny_bd_dir, res.final_dir)
    assert all(0.0 <= r["reward"] <= 1.0 for r in lines)


def test_cli_train_sft_end_to_end(tiny_bd_dir, post_data, tmp_path, capsys):
    recipe = tmp_path / "sft.toml"
    recipe.write_text(f"""[model]
path = "{tiny_bd_dir}"
[data]
train = ["{post_data / 'sft_train.jsonl'}"]
valid = ["{post_data / 'sft_valid.jsonl'}"]
seq_len = 128
valid_rows = 4
[train]
batch_size = 2
threads = 1
device = "cpu"
[objective]
kind = "sft"
[[phases]]
block_size = 8
steps = 2
lr = 1e-3
""")
    assert main(["train", "sft", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and Path(out["model"]).is_dir() and "val_elbo_nll" in out
    assert main(["train", "dpo", "--recipe", str(recipe), "--out", str(tmp_path / "x")]) == 2
    assert "kind is 'sft'" in capsys.readouterr().err
    assert main(["train", "sft", "--recipe", str(recipe), "--out", str(tmp_path / "y"),
                 "--set", "rollout.group_size=1", "--set", "objective.kind=\"rl\""]) == 2


def test_recipe_rejects_bad_post_fields(tiny_bd_dir, post_data):
    with pytest.raises(RecipeError, match=r"\[cap\] is not read by kind 'dpo' \(only by sft\)"):
        recipe_for("dpo", tiny_bd_dir, post_data, cap={"lam": 2.0})
    with pytest.raises(RecipeError, match="over_length"):
        recipe_for("sft", tiny_bd_dir, post_data, data={"over_length": "truncate"})
    with pytest.raises(RecipeError, match="temperature must be > 0"):
        recipe_for("rl", tiny_bd_dir, post_data, rollout={"decode": {"temperature": 0.0}})
