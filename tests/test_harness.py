"""The lm-evaluation-harness model (eval/harness.py) end to end on the bundled models, offline.

The real lm-eval (the `eval` extra, also in `test`) runs blockdiff's shipped task YAMLs over the shipped jsonl:
its generation accuracy must equal blockdiff's own task accuracy on the same prompts (prompt by prompt), its
multiple-choice accuracy must equal the argmax of blockdiff's own log-likelihoods, and the documented one-line
launcher must run the tasks from the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockdiff.data.tasks import is_correct
from blockdiff.eval import harness_data
from blockdiff.eval.compare import DecodeSettings, evaluate_model
from blockdiff.eval.harness import BlockdiffLM
from blockdiff.eval.likelihood import loglikelihood

from lm_eval import simple_evaluate  # noqa: E402  (after blockdiff.eval.harness: the model is registered)
from lm_eval.tasks import TaskManager  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
AR_DIR, BD_DIR = REPO / "assets/tiny-ar", REPO / "assets/tiny-bd"
N_GEN, N_MC = 40, 16


@pytest.fixture(scope="module")
def tasks():
    return TaskManager(include_path=str(harness_data.TASKS_DIR))


def run(tasks, model_args: dict, task: str, limit: int) -> dict:
    res = simple_evaluate(model="blockdiff", model_args=model_args, tasks=[task], task_manager=tasks, limit=limit,
                          log_samples=True, batch_size=8, device="cpu")
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return {"metrics": res["results"][task], "samples": samples}


def test_shipped_task_files_are_the_generated_ones():
    gen, mc = harness_data.task_lines()
    assert harness_data.GEN_FILE.read_text() == gen
    assert harness_data.MC_FILE.read_text() == mc
    docs = [json.loads(line) for line in mc.splitlines()]
    assert all(len(set(d["options"])) == harness_data.N_OPTIONS and d["options"][d["gold"]] == d["answer"]
               for d in docs)


@pytest.mark.parametrize("folder, mode", [(BD_DIR, "S"), (BD_DIR, "threshold"), (AR_DIR, "AR")])
def test_generation_accuracy_equals_blockdiffs_own(tasks, folder, mode):
    args = {"model": str(folder)} | ({} if mode == "AR" else {"mode": mode})
    h = run(tasks, args, "blockdiff_tasks_gen", N_GEN)
    examples = harness_data.examples(N_GEN)
    own = evaluate_model(folder, examples, DecodeSettings(modes=(mode,) if mode != "AR" else ("S",)))
    row = next(iter(own.values()))
    harness_correct = [bool(s["exact_match"]) for s in h["samples"]]
    assert [s["doc"]["prompt"] for s in h["samples"]] == [e.prompt for e in examples]
    assert harness_correct == row["correct"]  # prompt by prompt
    assert [is_correct(e, s["filtered_resps"][0]) for e, s in zip(examples, h["samples"])] == row["correct"]
    assert h["metrics"]["exact_match,none"] == pytest.approx(row["accuracy"])


@pytest.mark.parametrize("folder", [AR_DIR, BD_DIR])
def test_multiple_choice_accuracy_is_the_argmax_of_blockdiffs_loglikelihood(tasks, folder):
    h = run(tasks, {"model": str(folder), "mc_samples": 8, "seed": 5}, "blockdiff_tasks_mc", N_MC)
    lm = BlockdiffLM(model=str(folder))
    hits = []
    for s in h["samples"]:
        d = s["doc"]
        scores = loglikelihood(lm.loaded.model, [lm._split(d["prompt"], o) for o in d["options"]], samples=8, seed=5)
        ll = [x.logprob for x in scores]
        assert [r[0][0] for r in s["resps"]] == pytest.approx(ll, abs=1e-4)  # the harness got our numbers
        hits.append(max(range(len(ll)), key=ll.__getitem__) == d["gold"])
    assert h["metrics"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    assert h["metrics"]["acc,none"] >= 0.5  # well above chance (0.25) on the bundled models


def test_generate_until_cuts_at_stop_strings_and_budget():
    from lm_eval.api.instance import Instance

    lm = BlockdiffLM(model=str(BD_DIR), mode="S")
    reqs = [Instance("generate_until", {}, ("sort 5 3 9 1=", {"until": [" 5"], "max_gen_toks": 32}), 0),
            Instance("generate_until", {}, ("sort 5 3 9 1=", {"until": [], "max_gen_toks": 2}), 1)]
    full = lm.generate_until([Instance("generate_until", {}, ("sort 5 3 9 1=", {"until": []}), 0)])[0]
    cut, short = lm.generate_until(reqs)
    assert full.startswith("1 3 5")
    assert cut == full[:full.index(" 5")]
    assert len(lm.tok.encode(short)) <= 2 and full.startswith(short)


@pytest.mark.parametrize("args, needle", [
    ({}, "model=FOLDER is required"),
    ({"model": "no/such"}, "not a model folder"),
    ({"model": str(BD_DIR), "mode": "fast"}, "fast"),
    ({"model": str(BD_DIR), "mc_samples": "0"}, "mc_samples"),
    ({"model": str(BD_DIR), "colour": "red"}, "unknown colour"),
])
def test_bad_model_args_are_named(args, needle):
    with pytest.raises(ValueError, match=needle):
        BlockdiffLM(**args)


def test_one_line_launcher_runs_offline(tmp_path):
    out = tmp_path / "lm"
    cmd = [sys.executable, "-m", "blockdiff.eval.harness", "--model", "blockdiff", "--model_args",
           f"model={BD_DIR},mode=Q,mc_samples=4", "--tasks", "blockdiff_tasks_gen", "blockdiff_tasks_mc",
           "--limit", "4", "--output_path", str(out)]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "blockdiff_tasks_gen" in p.stdout and "exact_match" in p.stdout and "acc" in p.stdout
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert set(results) == {"blockdiff_tasks_gen", "blockdiff_tasks_mc"}


def test_chat_template_when_asked(tasks):
    lm = BlockdiffLM(model=str(BD_DIR))
    text = lm.apply_chat_template([{"role": "user", "content": "add 1+2="}])
    from blockdiff.data.chat_template import ChatTemplate

    assert text == ChatTemplate(lm.tok).render([{"role": "user", "content": "add 1+2="}], add_generation_prompt=True)
    res = simple_evaluate(model=lm, tasks=["blockdiff_tasks_gen"], task_manager=tasks, limit=2, log_samples=True,
                          apply_chat_template=True)
    ctx = res["samples"]["blockdiff_tasks_gen"][0]["arguments"][0][0]
    assert ctx.startswith(text[:text.index("add 1+2=")]) and "add 475+2=" in ctx


def test_greedy_check_decodes_the_context():
    from lm_eval.api.instance import Instance

    lm = BlockdiffLM(model=str(BD_DIR), mode="S", greedy_check="true", mc_samples=2)
    full = lm.generate_until([Instance("generate_until", {}, ("sort 5 3 9 1=", {"until": []}), 0)])[0]
    reqs = [Instance("loglikelihood", {}, ("sort 5 3 9 1=", full), 0),
            Instance("loglikelihood", {}, ("sort 5 3 9 1=", "9 5 3 1"), 1)]
    (_, own), (_, other) = lm.loglikelihood(reqs)
    assert own is True and other is False
    assert all(g is False for _, g in BlockdiffLM(model=str(BD_DIR), mc_samples=2).loglikelihood(reqs))
