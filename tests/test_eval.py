"""The one evaluation path (eval/compare.py, eval/frontier.py) and `blockdiff eval`, on the bundled models.

Equivalences: the compare path gives the numbers the plain per-prompt reference gives (Loaded.generate one prompt at
a time, scored by is_correct); batching changes neither accuracy nor TPF nor forwards at temperature 0; a frontier
point with a mode's default thresholds is the table row of that mode.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from blockdiff.data.tasks import generate_examples, is_correct
from blockdiff.eval.compare import Decoding, DecodeSettings, evaluate_model, run_decoding
from blockdiff.eval.command import run_models
from blockdiff.eval.frontier import sweep
from blockdiff.eval.task_accuracy import evaluate_checkpoint, wilson_interval
from blockdiff.load import load_checkpoint
from cli_helpers import assert_usage_error, run_cli

REPO = Path(__file__).resolve().parents[1]
AR_DIR, BD_DIR = REPO / "assets/tiny-ar", REPO / "assets/tiny-bd"
EXAMPLES = generate_examples("heldout", 12, seed=123)


@pytest.fixture(scope="module")
def bd():
    return load_checkpoint(BD_DIR)


@pytest.fixture(scope="module")
def ar():
    return load_checkpoint(AR_DIR)


def reference(loaded, cfg):
    """Per prompt, alone: (correct flags, generated tokens, forwards)."""
    flags, toks, fws = [], 0, 0
    for ex in EXAMPLES:
        g = loaded.generate([loaded.tokenizer.encode(ex.prompt)], cfg)[0]
        flags.append(is_correct(ex, loaded.tokenizer.decode(g.tokens)))
        toks, fws = toks + g.n_generated, fws + g.forwards
    return flags, toks, fws


@pytest.mark.parametrize("mode", ["threshold", "S", "Q"])
def test_block_rows_equal_per_prompt_reference_and_batching(bd, mode):
    cfg = bd.decode_config(mode=mode, steps=32, max_new_tokens=32)
    flags, toks, fws = reference(bd, cfg)
    for bs in (1, 5):
        r = evaluate_model(bd, EXAMPLES, DecodeSettings(modes=(mode,), batch_size=bs))[mode]
        assert r["correct"] == flags
        assert r["accuracy"] == sum(flags) / len(flags)
        assert (r["generated_tokens"], r["forwards"]) == (toks, fws)
        assert r["tpf"] == pytest.approx(toks / fws)
        assert r["ci95"] == list(wilson_interval(sum(flags), len(flags)))


def test_ar_checkpoint_gets_one_greedy_row(ar):
    rows = evaluate_model(ar, EXAMPLES, DecodeSettings())
    assert list(rows) == ["AR"] and rows["AR"]["decoding"] == "greedy AR, KV cache"
    flags, toks, fws = reference(ar, ar.decode_config(max_new_tokens=32))
    assert rows["AR"]["correct"] == flags and rows["AR"]["tpf"] == 1.0 and rows["AR"]["forwards"] == fws
    with pytest.raises(ValueError, match="AR checkpoint cannot decode with block mode"):
        run_decoding(ar, EXAMPLES, Decoding("S"), DecodeSettings())


def test_evaluate_checkpoint_keeps_the_report_fields(bd):
    res = evaluate_checkpoint(BD_DIR, EXAMPLES[:4], modes=("threshold", "S"))
    assert list(res) == ["threshold", "S"]
    assert res["threshold"]["decoding"].startswith("threshold 0.95, B=32, steps=32, labels shift")
    assert res["S"]["decoding"].startswith("S (M2T 0.5, T2T 0.0), B=32")
    for key in ("accuracy", "ci95", "per_task", "ci95_per_task", "tpf", "tpf_per_task", "tps", "forwards", "samples"):
        assert key in res["S"]


def test_frontier_point_at_default_thresholds_is_the_mode_row(bd):
    settings = DecodeSettings(modes=("S", "Q"))
    rows = evaluate_model(bd, EXAMPLES, settings)
    pts = sweep(bd, "bd", EXAMPLES, settings, [("joint", Decoding("joint", 0.5, 0.0)), ("joint", Decoding("joint", 0.7, 0.5))])
    assert len(pts) == 1 and pts[0]["kind"] == "joint"
    s, q = pts[0]["points"]
    assert (s["marked"], q["marked"]) == ("S", "Q")
    for pt, row in ((s, rows["S"]), (q, rows["Q"])):
        assert (pt["accuracy"], pt["tpf"], pt["forwards"]) == (row["accuracy"], row["tpf"], row["forwards"])


def test_cli_eval_side_by_side_and_frontier(tmp_path):
    out = tmp_path / "ev"
    code, stdout, stderr = run_cli(["eval", "--model", f"parent={AR_DIR}", "--model", f"converted={BD_DIR}",
                                    "--prompts", 8, "--modes", "S,Q", "--sweep-thresholds", "0.5,0.95",
                                    "--sweep-pairs", "0.5:0.0,0.9:0.5", "--out", out, "--threads", 1])
    assert code == 0, stderr
    assert "| parent | greedy AR, KV cache |" in stdout and "| converted | S (M2T 0.5, T2T 0.0)" in stdout
    data = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in data["models"]] == ["parent", "converted"]
    assert list(data["models"][1]["rows"]) == ["S", "Q"]
    assert {(s["model"], s["kind"], len(s["points"])) for s in data["sweeps"]} == {("converted", "threshold", 2),
                                                                                     ("converted", "joint", 2)}
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "frontier.png" in (out / "eval.md").read_text()


@pytest.mark.parametrize("argv, needle", [
    (["--model", "no/such/folder"], "--model no/such/folder"),
    (["--model", str(BD_DIR), "--modes", "S,fast"], "--modes: unknown fast"),
    (["--model", str(BD_DIR), "--sweep-pairs", "0.5"], "--sweep-pairs"),
    (["--model", str(BD_DIR), "--sweep-thresholds", "0.5,1.5"], "sweep thresholds must be in [0, 1]"),
    (["--model", str(BD_DIR), "--tasks", "add,mul"], "--tasks: unknown mul"),
    ([], "give at least one --model"),
    (["--run", "no/such/run"], "--run: no/such/run is not a folder"),
])
def test_cli_eval_bad_input_is_one_line(argv, needle):
    code, _, stderr = run_cli(["eval", "--prompts", 2, "--no-frontier", *argv])
    assert_usage_error(code, stderr, "eval", needle)


def test_run_folder_expands_to_parent_merged_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    for sub in ("merged", "checkpoints/step_000100", "checkpoints/step_000400"):
        (run / sub).mkdir(parents=True)
        shutil.copy(BD_DIR / "config.json", run / sub / "config.json")
    (run / "report.json").write_text(json.dumps({"parent": str(AR_DIR)}))
    names = lambda which: [n for n, _ in run_models(run, which)]  # noqa: E731
    assert names("last") == ["parent", "merged", "step_400"]
    assert names("all") == ["parent", "merged", "step_100", "step_400"]
    assert names("none") == ["parent", "merged"]
    assert names("100") == ["parent", "merged", "step_100"]
    with pytest.raises(ValueError, match=r"has no step \[7\]"):
        run_models(run, "7")


def test_conversion_report_rows_are_the_compare_rows():
    """The conversion report (convert.py) evaluates parent and converted model through the same path: its rows are
    evaluate_model's on the same prompts, and its table prints them."""
    from blockdiff.convert import evaluate_parent_and_converted, format_report
    from blockdiff.train.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes/tiny_wsd.toml", {"eval.tasks": 8})
    t = evaluate_parent_and_converted(recipe, AR_DIR, BD_DIR)
    examples = generate_examples("heldout", 8, seed=123)
    settings = DecodeSettings(max_new_tokens=recipe.eval.max_new_tokens, steps=recipe.eval.steps,
                              threshold=recipe.eval.threshold)
    for rows, folder in ((t["parent_rows"], AR_DIR), (t["converted_rows"], BD_DIR)):
        ref = evaluate_model(folder, examples, settings)
        assert list(rows) == list(ref)
        for k in rows:
            assert (rows[k]["correct"], rows[k]["forwards"], rows[k]["decoding"]) == \
                   (ref[k]["correct"], ref[k]["forwards"], ref[k]["decoding"])
    md = format_report({"parent": str(AR_DIR), "model": str(BD_DIR), "steps": 0, "train_tokens_per_s": 0,
                        "wall_s": 0, "device": "cpu", "phases": [], "tasks": t})
    s = t["converted_rows"]["S"]
    assert f"| converted | {s['decoding']} | {s['accuracy']:.3f} |" in md
    # the bundled model has labels shift + a causal clean stream: the report has a spec row, and spec is lossless,
    # so its answers are the converted model's own greedy AR answers (Loaded.generate(ar=True)), prompt by prompt
    assert list(t["converted_rows"])[1:] == ["S", "Q", "spec"] and list(t["parent_rows"]) == ["AR"]
    spec = t["converted_rows"]["spec"]
    own = evaluate_model(BD_DIR, examples, settings, decodings=[Decoding("AR")])["AR"]
    assert spec["correct"] == own["correct"] and spec["accuracy"] == own["accuracy"]
    assert spec["generated_tokens"] == own["generated_tokens"] and spec["forwards"] <= own["forwards"]
    assert spec["decoding"].startswith("spec (draft_len 3; lossless")
    assert f"| converted | {spec['decoding']} | {spec['accuracy']:.3f} |" in md


def test_conversion_report_evaluation_is_held_to_its_budget():
    """issue 20 part 6: the report's evaluation of a real-size model cost more than its training. With a budget
    that one prompt already fills, only that prompt is evaluated (its rows are evaluate_model's on it, and the
    report says how many were asked for); with room for all, every prompt is, and nothing is marked."""
    from blockdiff.convert import evaluate_parent_and_converted, format_report
    from blockdiff.train.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes/tiny_wsd.toml", {"eval.tasks": 6, "eval.max_new_tokens": 8})
    cut = evaluate_parent_and_converted(recipe, AR_DIR, BD_DIR, budget_s=1e-3)
    assert cut["prompts"] == 1 and cut["time_limited"]["asked"] == 6 and cut["eval_s"] > 0
    one = generate_examples("heldout", 6, seed=123)[:1]
    settings = DecodeSettings(max_new_tokens=8, steps=recipe.eval.steps, threshold=recipe.eval.threshold)
    for rows, folder in ((cut["parent_rows"], AR_DIR), (cut["converted_rows"], BD_DIR)):
        ref = evaluate_model(folder, one, settings)
        assert {k: v["correct"] for k, v in rows.items()} == {k: v["correct"] for k, v in ref.items()}
    md = format_report({"parent": str(AR_DIR), "model": str(BD_DIR), "steps": 0, "train_tokens_per_s": 0,
                        "wall_s": 0, "train_wall_s": 0, "device": "cpu", "phases": [], "tasks": cut})
    assert "Only 1 of the 6 prompts asked for" in md and "the report's evaluation" in md
    full = evaluate_parent_and_converted(recipe, AR_DIR, BD_DIR, budget_s=1e6)
    assert full["prompts"] == 6 and "time_limited" not in full
    with pytest.raises(ValueError, match="time_share must be >= 0"):
        load_recipe(REPO / "recipes/tiny_wsd.toml", {"eval.time_share": -1})


def test_spec_row_only_where_the_checkpoint_can_run_it(tmp_path, bd):
    """Default modes add spec for a shift / causal checkpoint only; the same weights declared in LLaDA2's layout
    (labels same, block-causal clean stream) get threshold, S and Q, and asking spec of them is an error."""
    from blockdiff.eval.task_accuracy import BLOCK_MODES, default_modes

    assert default_modes(bd.model) == (*BLOCK_MODES, "spec")
    folder = tmp_path / "same"
    shutil.copytree(BD_DIR, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["blockdiff"].update(labels="same", clean_stream="block_causal")
    (folder / "config.json").write_text(json.dumps(cfg))
    same = load_checkpoint(folder)
    assert default_modes(same.model) == BLOCK_MODES
    assert list(evaluate_model(same, EXAMPLES[:2], DecodeSettings(max_new_tokens=4))) == list(BLOCK_MODES)
    with pytest.raises(ValueError, match='mode "spec" needs a checkpoint with labels "shift"'):
        run_decoding(same, EXAMPLES[:2], Decoding("spec"), DecodeSettings(max_new_tokens=4))
