"""The `blockdiff` command line, in process (`main(argv)`) and once as a real process: help texts, make-data,
the user story (a checkpoint written by HF transformers -> `convert` -> a folder that loads in transformers and
in blockdiff, `generate`s, and `merge`s), and bad input -> exit code 2 with a one-line message."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blockdiff.cli import main
from cli_helpers import assert_usage_error, run_cli
from blockdiff.data.tokenizer import load_tokenizer
from blockdiff.load import load_checkpoint
from blockdiff.model.hf_io import load_pretrained

transformers = pytest.importorskip("transformers")

FLAGS = {
    "make-data": ["--out", "--train-examples", "--valid-examples", "--code-chars", "--seed", "--kind"],
    "train": ["--recipe", "--out", "--model", "--resume", "--set", "--no-progress"],
    "convert": ["--recipe", "--out", "--model", "--resume", "--set", "--no-progress"],
    "merge": ["--run", "--k", "--out", "--block-size"],
    "generate": ["--model", "--prompt", "--prompt-file", "--mode", "--max-new-tokens", "--block-size", "--steps",
                 "--threshold", "--edit-threshold", "--max-post-steps", "--temperature", "--top-k", "--top-p",
                 "--ignore-eos", "--repeat-penalty", "--seed", "--stop", "--stream", "--trace", "--ar"],
    "chat": ["--model", "--system", "--mode", "--max-new-tokens", "--block-size", "--steps", "--threshold",
             "--edit-threshold", "--max-post-steps", "--temperature", "--top-k", "--top-p", "--ignore-eos",
             "--repeat-penalty", "--seed", "--ar"],
    "show-trace": ["--row"],
}

RECIPE = """\
[model]
path = "{model}"
[data]
train = ["train.jsonl"]
valid = ["valid.jsonl"]
seq_len = 32
valid_rows = 8
[train]
batch_size = 4
eval_every = 2
save_every = 2
threads = 1
device = "cpu"
[[phases]]
block_size = 1
steps = 2
lr = 1e-3
[[phases]]
block_size = 32
steps = 2
lr = 1e-3
[[phases]]
block_size = {last_block}
steps = 4
lr = 1e-3
[merge]
top_k = 2
[eval]
tasks = 4
max_new_tokens = 8
"""


def write_recipe(folder: Path, tiny_data, model: Path, last_block: int = 8) -> Path:
    """Recipe with data paths relative to its own folder."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_data["train"], folder / "train.jsonl")
    shutil.copy(tiny_data["valid"], folder / "valid.jsonl")
    path = folder / "recipe.toml"
    path.write_text(RECIPE.format(model=model, last_block=last_block))
    return path


@pytest.fixture(scope="module")
def hf_dir(tiny_ar_dir, tmp_path_factory) -> Path:
    """A tiny random Llama written by HF transformers itself (untied head), plus a tokenizer without a mask token."""
    folder = tmp_path_factory.mktemp("hf") / "llama"
    vocab = load_tokenizer(tiny_ar_dir).vocab_size
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False))
    model.save_pretrained(folder)
    for f in tiny_ar_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def converted(hf_dir, tiny_ar_dir, tiny_data, tmp_path_factory):
    """`blockdiff convert` on the HF folder (given with --model, over the recipe's [model] path), batch size 2
    through --set."""
    root = tmp_path_factory.mktemp("convert")
    recipe = write_recipe(root / "recipe", tiny_data, model=tiny_ar_dir)
    out = root / "run"
    code, stdout, stderr = run_cli(["convert", "--recipe", recipe, "--out", out, "--model", hf_dir,
                                    "--set", "train.batch_size=2", "--no-progress"])
    assert code == 0, stderr
    return out, stdout


# ------------------------------------------------------------------------------ help
@pytest.mark.parametrize("cmd", list(FLAGS))
def test_help_mentions_every_flag(cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in FLAGS[cmd]:
        assert flag in text, f"{cmd} --help does not mention {flag}"


def test_help_in_a_real_process():
    p = subprocess.run([sys.executable, "-m", "blockdiff.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert all(cmd in p.stdout for cmd in FLAGS)


def test_usage_error_exit_code_in_a_real_process(tmp_path):
    p = subprocess.run([sys.executable, "-m", "blockdiff.cli", "convert", "--recipe", str(tmp_path / "nope.toml"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"blockdiff convert: error: {tmp_path / 'nope.toml'}: recipe file not found"]


# ------------------------------------------------------------------------------ make-data
def test_make_data(tmp_path):
    code, stdout, _ = run_cli(["make-data", "--out", tmp_path, "--train-examples", 20, "--valid-examples", 5,
                               "--code-chars", 3000])
    assert code == 0 and "train.jsonl" in stdout
    for name, at_least in (("train.jsonl", 20 + 1), ("valid.jsonl", 5)):
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert len(rows) >= at_least and all(isinstance(r["text"], str) and r["text"].strip() for r in rows)


# ------------------------------------------------------------------------------ the user story
def test_convert_writes_report(converted, hf_dir):
    out, stdout = converted
    report = json.loads((out / "report.json").read_text())
    assert report["parent"] == str(hf_dir.resolve()), "--model must override the recipe's [model] path"
    assert report["model"] == str(out / "merged")
    assert [p["block_size"] for p in report["phases"]] == [1, 32, 8]
    assert all(p["val_elbo_ppl"] > 0 for p in report["phases"])
    assert report["merge"]["k"] == 2 and len(report["merge"]["chosen"]) == 2
    tasks = report["tasks"]
    assert tasks["prompts"] == 4
    for side in ("ar_parent", "converted"):
        assert 0.0 <= tasks[side]["accuracy"] <= 1.0 and tasks[side]["n"] == 4
    assert set(tasks["converted_rows"]) == {"threshold", "S", "Q"} and set(tasks["parent_rows"]) == {"AR"}
    for res in tasks["converted_rows"].values():
        lo, hi = res["ci95"]
        assert lo <= res["accuracy"] <= hi and set(res["tpf_per_task"]) == set(res["per_task"])
    md = (out / "report.md").read_text()
    assert "| AR parent |" in md and "| converted | S (M2T 0.5, T2T 0.0)" in md and "phase3-B8" in md
    assert f"report: {out / 'report.json'}" in stdout
    last = json.loads(stdout.strip().splitlines()[-3])  # the one-JSON-line summary before model:/report:
    assert "ar_accuracy" in last and "converted_accuracy" in last and set(last["converted_modes"]) == {"threshold", "S", "Q"}

    ckpt = out / "checkpoints/step_000002"
    assert json.loads((ckpt / "recipe.json").read_text())["train"]["batch_size"] == 2  # --set applied
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["data"]["epoch"] * state["data"]["n_sequences"] + state["data"]["index"] == 2 * 2


def test_converted_folder_loads_in_hf_and_blockdiff(converted, hf_dir):
    out, _ = converted
    result = out / "merged"
    parent_vocab = load_tokenizer(hf_dir).vocab_size
    loaded = load_checkpoint(result)
    ours = loaded.model
    assert ours.cfg.diffusion is not None and ours.cfg.diffusion.block_size == 8
    assert ours.cfg.diffusion.mask_token_id == parent_vocab == loaded.tokenizer.mask_id
    assert ours.cfg.vocab_size == parent_vocab + 1 and not ours.cfg.tie_word_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(result, attn_implementation="eager").eval()
    ids = torch.randint(0, parent_vocab, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids, torch.arange(10)[None], torch.ones(10, 10, dtype=torch.bool).tril()[None, None])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_generate_with_converted_model(converted):
    out, _ = converted
    code, stdout, stderr = run_cli(["generate", "--model", out / "merged", "--prompt", "add 1+2=",
                                    "--max-new-tokens", 8])
    assert code == 0, stderr
    assert stdout.endswith("\n") and "TPF" in stderr and "no blockdiff diffusion section" not in stderr


def test_generate_ar_on_parent(hf_dir):
    code, stdout, stderr = run_cli(["generate", "--model", hf_dir, "--prompt", "add 1+2=", "--ar",
                                    "--max-new-tokens", 4])
    assert code == 0, stderr
    assert stdout.endswith("\n") and "TPF" in stderr


def test_merge_command_matches_convert_merge(converted, tmp_path):
    out, _ = converted
    code, stdout, stderr = run_cli(["merge", "--run", out, "--k", 2, "--out", tmp_path / "m"])
    assert code == 0, stderr
    assert "averaged 2 checkpoints at block size 8" in stdout
    a, b = load_pretrained(out / "merged").state_dict(), load_pretrained(tmp_path / "m").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ bad input -> exit 2, one line


def test_missing_recipe(tmp_path):
    code, _, err = run_cli(["convert", "--recipe", tmp_path / "nope.toml", "--out", tmp_path / "o", "--no-progress"])
    assert_usage_error(code, err, "convert", "nope.toml", "not found")
    assert not (tmp_path / "o").exists()


def test_bad_block_size(tmp_path, tiny_data, tiny_ar_dir):
    recipe = write_recipe(tmp_path / "r", tiny_data, model=tiny_ar_dir, last_block=5)
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", tmp_path / "o", "--no-progress"])
    assert_usage_error(code, err, "convert", "block_size 5 does not divide seq_len 32")
    assert not (tmp_path / "o").exists()


def test_missing_model_folder(tmp_path, tiny_data, tiny_ar_dir):
    recipe = write_recipe(tmp_path / "r", tiny_data, model=tiny_ar_dir)
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", tmp_path / "o", "--model", tmp_path / "missing",
                            "--no-progress"])
    assert_usage_error(code, err, "convert", str(tmp_path / "missing"))
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("item,needle", [("train.batch_size", "expected section.field=value"),
                                         ("batch_size=2", "expected section.field"),
                                         ("train.batch_size=0", "batch_size must be >= 1"),
                                         ("train.nope=1", "unknown field(s) nope")])
def test_malformed_set(item, needle, tmp_path, tiny_data, tiny_ar_dir):
    recipe = write_recipe(tmp_path / "r", tiny_data, model=tiny_ar_dir)
    code, _, err = run_cli(["convert", "--recipe", recipe, "--out", tmp_path / "o", "--set", item, "--no-progress"])
    assert_usage_error(code, err, "convert", needle)


def test_other_commands_bad_input(tmp_path):
    code, _, err = run_cli(["merge", "--run", tmp_path, "--out", tmp_path / "m"])
    assert_usage_error(code, err, "merge", "no checkpoints")
    code, _, err = run_cli(["generate", "--model", tmp_path / "missing", "--prompt", "hi"])
    assert_usage_error(code, err, "generate", str(tmp_path / "missing"))
