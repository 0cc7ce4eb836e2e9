"""`blockdiff generate` with the batched engine: modes, batches of prompts, streaming, --trace, stop strings, and
bad input -> exit 2 with one line naming the problem (and no trace file left behind)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from cli_helpers import assert_usage_error, run_cli

from blockdiff.data.tokenizer import load_tokenizer
from blockdiff.decode.engine import DecodeConfig, generate
from blockdiff.model.hf_io import load_pretrained


@pytest.mark.parametrize("mode", ["threshold", "S", "Q", "dinfer", "factor", "credit"])
def test_generate_modes_print_what_the_engine_generates(tiny_bd_dir, mode):
    """The CLI's text and its counts are those of `decode.engine.generate` on the same checkpoint, prompt and
    setting (the CLI defaults for everything not given: steps 32, temperature 0, ...)."""
    code, stdout, stderr = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "add 1+2=", "--mode", mode,
                                    "--max-new-tokens", 8, "--block-size", 4])
    assert code == 0, stderr
    model, tok = load_pretrained(tiny_bd_dir).eval(), load_tokenizer(tiny_bd_dir)
    [g] = generate(model, [tok.encode("add 1+2=")], DecodeConfig(mode=mode, block_size=4, max_new_tokens=8),
                   mask_id=model.cfg.diffusion.mask_token_id, eos_ids=tok.eos_ids,
                   generator=torch.Generator().manual_seed(0))
    assert stdout == tok.decode(g.tokens) + "\n"
    assert (f"[1 prompt(s), {g.n_generated} tokens, {g.forwards} forwards, TPF {g.n_generated / g.forwards:.2f}, "
            in stderr), stderr
    assert re.search(r"tokens/s, \d+ thread\(s\)\]", stderr), stderr


def test_generate_batch_equals_single(tiny_bd_dir, tmp_path):
    prompts = ["add 1+2=", "reverse abc=", "sort 3 1 2="]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts[1:]) + "\n\n")
    code, stdout, stderr = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", prompts[0], "--prompt-file", pf,
                                    "--max-new-tokens", 6, "--block-size", 4, "--ignore-eos"])
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert "3 prompt(s)" in stderr and "18 tokens" in stderr
    for k, p in enumerate(prompts):
        c1, single, _ = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", p, "--max-new-tokens", 6,
                                 "--block-size", 4, "--ignore-eos"])
        assert c1 == 0
        assert f"[{k + 1}] {single.rstrip(chr(10))}" in lines


def test_generate_stream_and_trace(tiny_bd_dir, tmp_path):
    trace = tmp_path / "t.jsonl"
    code, stdout, stderr = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "add 1+2=", "--mode", "S",
                                    "--max-new-tokens", 12, "--block-size", 4, "--stream", "--trace", trace,
                                    "--ignore-eos"])
    assert code == 0, stderr
    code2, plain, _ = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "add 1+2=", "--mode", "S",
                               "--max-new-tokens", 12, "--block-size", 4, "--ignore-eos"])
    assert stdout == plain  # streamed pieces add up to the same text
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert lines[0]["type"] == "meta" and lines[-1]["type"] == "done"
    assert any(x["type"] == "event" and x["kind"] == "m2t" for x in lines)
    assert all("text" in x for x in lines if x["type"] == "event")


def test_generate_stop_string(tiny_bd_dir):
    args = ["generate", "--model", tiny_bd_dir, "--prompt", "add 1+2=", "--max-new-tokens", 16, "--block-size", 4,
            "--ignore-eos", "--threshold", "0.5"]
    code, full, _ = run_cli(args)
    text = full.rstrip("\n")
    assert code == 0 and len(text) > 4
    stop = text[3:5]
    code, cut, _ = run_cli(args + ["--stop", stop])
    assert code == 0 and cut.rstrip("\n") == text[:text.find(stop)]


@pytest.mark.parametrize("extra,needle", [
    (["--threshold", "1.5"], "threshold must be in [0, 1], got 1.5"),
    (["--edit-threshold", "-1"], "--edit-threshold must be in [0, 1]"),
    (["--top-p", "0"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_generate_bad_decoding_args(tiny_bd_dir, tmp_path, extra, needle):
    trace = tmp_path / "t.jsonl"
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "hi", "--trace", trace] + extra)
    assert_usage_error(code, err, "generate", needle)
    assert not trace.exists() and not list(tmp_path.iterdir())


def test_generate_bad_prompts(tiny_bd_dir, tmp_path):
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir])
    assert_usage_error(code, err, "generate", "--prompt")
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir, "--prompt-file", tmp_path / "none.txt"])
    assert_usage_error(code, err, "generate", "none.txt", "does not exist")
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "hi", "--trace",
                            tmp_path / "no" / "t.jsonl"])
    assert_usage_error(code, err, "generate", "does not exist")


def test_chat_session(tiny_bd_dir, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("add 1+2\n\n/reset\nsort 3 1 2\n/exit\nnever read\n"))
    code, stdout, stderr = run_cli(["chat", "--model", tiny_bd_dir, "--mode", "Q", "--max-new-tokens", 8,
                                    "--block-size", 4, "--system", "Answer with the result only."])
    assert code == 0, stderr
    assert len(stdout.splitlines()) == 2  # one reply per user turn; blank line skipped, /exit stops
    assert "history cleared" in stderr and stderr.count("TPF") == 2 and "chat template" in stderr


def test_chat_bad_model(tmp_path):
    code, _, err = run_cli(["chat", "--model", tmp_path / "missing"])
    assert_usage_error(code, err, "chat", str(tmp_path / "missing"))


def test_show_trace(tiny_bd_dir, tmp_path):
    trace = tmp_path / "t.jsonl"
    code, _, err = run_cli(["generate", "--model", tiny_bd_dir, "--prompt", "add 1+2=", "--prompt", "sort 2 1=",
                            "--mode", "S", "--max-new-tokens", 8, "--block-size", 4, "--trace", trace])
    assert code == 0, err
    events = [json.loads(x) for x in trace.read_text().splitlines()]
    code, out, err = run_cli(["show-trace", trace, "--row", 1])
    assert code == 0, err
    lines = out.splitlines()
    steps = sorted({e["step"] for e in events if e["type"] == "event" and e["row"] == 1})
    assert len(lines) == len(steps) and all(line.startswith("step") for line in lines)
    assert lines[0].count("[") >= 1  # the first step's writes are bracketed
    code, _, err = run_cli(["show-trace", trace, "--row", 2])
    assert_usage_error(code, err, "show-trace", "row 2 is not in this trace")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "meta"}\nnot json\n')
    code, _, err = run_cli(["show-trace", bad])
    assert_usage_error(code, err, "show-trace", "bad.jsonl:2")
