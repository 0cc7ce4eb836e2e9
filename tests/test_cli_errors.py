"""A new user's mistakes and interruptions: every one ends in exit 2 (or 130 for Ctrl-C) with one line that names
the file, flag or field -- never a traceback -- and nothing is silently wrong or left half-done on disk."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_usage_error, run_cli
from train_helpers import toml_text
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def model_copy(tiny_bd_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_bd_dir, folder)
    return folder


def generate(model, *extra):
    return run_cli(["generate", "--model", model, "--prompt", "add 1+2=", "--max-new-tokens", "4", *extra])


# ------------------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("damage", ["truncated", "random", "bad header"])
def test_damaged_safetensors_is_one_line_naming_the_file(model_copy, damage):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        f.write_bytes(os.urandom(4096))
    else:
        f.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    code, _, err = generate(model_copy)
    assert_usage_error(code, err, "generate", str(f), "not a readable safetensors file")


def test_nan_weights_are_refused_naming_the_tensor(model_copy):
    f = model_copy / "model.safetensors"
    tensors = load_file(f)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, f)
    code, _, err = generate(model_copy)
    assert_usage_error(code, err, "generate", name, "NaN/inf")


# ------------------------------------------------------------------------------------- flags and values
@pytest.mark.parametrize("extra, needle", [
    (["--max-new-tokens", "1000000000"], "1000000000"),
    (["--max-new-tokens", "1000000000", "--ar"], "1000000000"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--threshold", "1.5"], "--threshold must be in [0, 1]"),
    (["--top-p", "0"], "--top-p"),
    (["--mode", "joint"], "--mode joint takes your thresholds"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--block-size", "-4"], "--block-size must be >= 0"),
])
def test_decoding_flags(tiny_bd_dir, extra, needle):
    code, _, err = generate(tiny_bd_dir, *extra)
    assert_usage_error(code, err, "generate", needle)


def test_stream_with_several_prompts_is_refused(tiny_bd_dir):
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "a", "--prompt", "b", "--stream"])
    assert_usage_error(code, err, "generate", "--stream", "2 prompts")


def test_binary_prompt_file_names_the_file(tiny_bd_dir, tmp_path):
    f = tmp_path / "prompts.bin"
    f.write_bytes(b"\xff\xfe\x00\x81" * 10)
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir, "--prompt-file", f])
    assert_usage_error(code, err, "generate", f"--prompt-file {f}", "not UTF-8")


def test_ar_on_a_diffusion_checkpoint_says_so(tiny_bd_dir):
    code, _, err = generate(tiny_bd_dir, "--ar")
    assert code == 0 and "--ar: decoding the block-diffusion checkpoint" in err


@pytest.mark.parametrize("argv, needle", [
    (["--train-examples", "-1"], "--train-examples must be >= 0"),
    (["--code-chars", "-5"], "--code-chars must be >= 0"),
])
def test_make_data_flags(tmp_path, argv, needle):
    code, _, err = run_cli(["make-data", "--out", tmp_path / "d", *argv])
    assert_usage_error(code, err, "make-data", needle)
    assert not (tmp_path / "d").exists()


def test_make_data_out_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = run_cli(["make-data", "--out", f, "--kind", "chat", "--train-examples", "2"])
    assert_usage_error(code, err, "make-data", f"--out {f} exists and is not a folder")


# ------------------------------------------------------------------------------------- recipes and runs
def write_recipe(tmp_path: Path, model: Path, data: dict, steps: int = 4) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(toml_text({
        "model": {"path": str(model)},
        "data": {"train": [str(data["train"])], "valid": [str(data["valid"])], "seq_len": 32, "valid_rows": 2},
        "train": {"batch_size": 2, "save_every": 2, "eval_every": 2, "threads": 1, "device": "cpu"},
        "phases": [{"block_size": 8, "steps": steps, "lr": 1e-3}]}))
    return path


@pytest.mark.parametrize("setting, needle", [
    ("train.device=gpu", "[train] device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("train.threads=-1", "[train] threads must be >= 0"),
    ("phases.3.steps=1", "phases.N.field with N in 1..1"),
])
def test_bad_settings(tiny_ar_dir, tiny_data, tmp_path, setting, needle):
    recipe = write_recipe(tmp_path, tiny_ar_dir, tiny_data)
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", tmp_path / "run", "--set", setting])
    assert_usage_error(code, err, "convert", needle)
    assert not (tmp_path / "run").exists()


def test_failed_run_leaves_no_empty_out_folder(tiny_ar_dir, tiny_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    recipe = write_recipe(tmp_path, tiny_ar_dir, {"train": bad, "valid": tiny_data["valid"]})
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", tmp_path / "run", "--no-progress"])
    assert_usage_error(code, err, "convert", f"{bad}:2")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_says_how_to_resume_and_resume_reports_the_whole_run(tiny_ar_dir, tiny_data, tmp_path, monkeypatch):
    import blockdiff.train.tasks as tasks

    recipe = write_recipe(tmp_path, tiny_ar_dir, tiny_data, steps=4)
    real, calls = tasks.diffusion_loss, []

    def interrupt_at_step_3(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(tasks, "diffusion_loss", interrupt_at_step_3)
    out = tmp_path / "run"
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", out, "--no-progress"])
    lines = err.strip().splitlines()
    assert code == 130 and "Traceback" not in err
    assert lines[-1].startswith("blockdiff convert: interrupted: the last checkpoint is ")
    assert "(step 2)" in lines[-1] and f"--out {out}" in lines[-1] and lines[-1].endswith("--resume")
    monkeypatch.setattr(tasks, "diffusion_loss", real)
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", out, "--resume", "--no-progress"])
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    state = json.loads(next((out / "checkpoints").glob("step_000002")).joinpath("trainer_state.json").read_text())
    # the report covers all 4 steps: the 2 before the interruption (saved in the checkpoint) and the 2 after
    assert state["wall_s"] > 0 and report["train_wall_s"] + 0.05 >= state["wall_s"]
    assert state["tokens"] == 2 * 2 * 32  # steps x batch x seq_len before the interruption, carried into the report
    assert report["train_tokens_per_s"] > 0
    assert {"cpu", "cores", "threads", "load1"} <= set(report["machine"])
    # a completed run resumed again trains nothing and still reports the whole run's throughput
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", out, "--resume", "--no-progress"])
    assert code == 0 and json.loads((out / "report.json").read_text())["train_tokens_per_s"] > 0


def test_ctrl_c_before_any_checkpoint_removes_the_folder(tiny_ar_dir, tiny_data, tmp_path, monkeypatch):
    import blockdiff.train.tasks as tasks

    def interrupt(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks, "diffusion_loss", interrupt)
    recipe = write_recipe(tmp_path, tiny_ar_dir, tiny_data)
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", tmp_path / "run", "--no-progress"])
    assert code == 130 and "no checkpoint was written yet" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_overwrite_deletes_only_a_previous_run(tiny_ar_dir, tiny_data, tmp_path):
    recipe = write_recipe(tmp_path, tiny_ar_dir, tiny_data, steps=2)
    out = tmp_path / "run"
    assert run_cli(["convert", "--recipe", recipe, "--out", out, "--no-progress"])[0] == 0
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", out, "--no-progress"])
    assert_usage_error(code, err, "convert", "--resume", "new --out")
    assert run_cli(["convert", "--recipe", recipe, "--out", out, "--no-progress", "--overwrite"])[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", out, "--no-progress", "--overwrite"])
    assert_usage_error(code, err, "convert", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and (out / "final").is_dir()


def test_run_files_follow_the_umask(tiny_ar_dir, tiny_data, tmp_path):
    """Weights, plots, metrics and reports are ordinary files: 0644 under the usual umask 022, not 0600."""
    old = os.umask(0o022)
    try:
        recipe = write_recipe(tmp_path, tiny_ar_dir, tiny_data, steps=2)
        assert run_cli(["convert", "--recipe", recipe, "--out", tmp_path / "run", "--no-progress"])[0] == 0
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
    assert any(f.name == "model.safetensors" for f in files) and any(f.suffix == ".png" for f in files)
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644, f"{f} has mode {oct(f.stat().st_mode & 0o777)}"


def test_token_cache_goes_to_the_user_cache(tiny_ar_dir, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKDIFF_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path, tiny_ar_dir, tiny_data, steps=1)
    assert run_cli(["convert", "--recipe", recipe, "--out", tmp_path / "run", "--no-progress"])[0] == 0
    assert list((tmp_path / "cache" / "tokens").glob("tokens-*/meta.json"))  # data/token_cache.py
    assert not (tmp_path / ".cache").exists()  # nothing beside --out


def test_merge_says_when_it_averages_fewer_than_asked(tiny_ar_dir, tiny_data, tmp_path):
    recipe = write_recipe(tmp_path, tiny_ar_dir, tiny_data, steps=4)
    assert run_cli(["convert", "--recipe", recipe, "--out", tmp_path / "run", "--no-progress"])[0] == 0
    code, out, err = run_cli(["merge", "--run", tmp_path / "run", "--k", "50", "--out", tmp_path / "m"])
    assert code == 0 and "--k 50: the run has only 2 checkpoint(s)" in err
    code, _, err = run_cli(["merge", "--run", tmp_path / "run", "--k", "0", "--out", tmp_path / "m2"])
    assert_usage_error(code, err, "merge", "--k must be >= 1")


# ------------------------------------------------------------------------------------- pipes and help
def test_show_trace_into_a_closed_pipe_is_quiet(tiny_bd_dir, tmp_path):
    trace = tmp_path / "t.jsonl"
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "def f(", "--max-new-tokens", "64",
                            "--trace", trace, "--ignore-eos"])
    assert code == 0, err
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m blockdiff.cli show-trace {trace} | head -1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1
    assert proc.stderr == "", proc.stderr


def subcommands() -> list[str]:
    from blockdiff.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("cmd", subcommands())
def test_help_shows_only_meaningful_defaults(cmd, capsys, monkeypatch):
    from blockdiff.cli import main

    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    for line in text.splitlines():
        assert line.count("default") <= 1, line
    if cmd == "generate":
        for mode in ("threshold", "S", "Q", "joint", "dinfer", "factor", "credit"):
            assert f"{mode} = " in text.replace("\n", " ")


def test_top_level_help_cites_only_files_in_the_repository(capsys):
    from blockdiff.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    for ref in re.findall(r"[\w/-]+\.md", capsys.readouterr().out):  # docs/real-model.md is one name
        assert (REPO / ref).is_file(), ref
