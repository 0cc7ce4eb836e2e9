"""The command line answers at once where it has nothing to compute: `blockdiff --help`, `--version`, the help of
every verb whose flags need no heavy module, and a mistyped path never import torch (they run in a fresh process,
which checks `sys.modules`). The top-level help lists every verb. `--mode` takes any case; a bad mode is one line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from cli_helpers import assert_usage_error, run_cli

from blockdiff import __version__
from blockdiff.cli import build_parser

# verbs whose --help needs torch: the --mode help lists every mode's default thresholds (decode/config.py MODES),
# and eval's module imports its frontier sweeps
HELP_NEEDS_TORCH = {"generate", "chat", "serve", "eval"}

PROBE = """
import contextlib, io, json, sys
from blockdiff.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    text, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    out.append({"argv": argv, "code": code, "stdout": text.getvalue(), "stderr": err.getvalue(),
                "torch": "torch" in sys.modules})
print(json.dumps(out))
"""


def probe(*argvs: list[str]) -> list[dict]:
    """Run `main(argv)` for each argv, in order, in one fresh interpreter: exit code, output, and whether torch was
    imported by then."""
    p = subprocess.run([sys.executable, "-c", PROBE, json.dumps([[str(a) for a in argv] for argv in argvs])],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def verbs() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_help_version_and_light_verbs_help_do_not_import_torch():
    light = [v for v in verbs() if v not in HELP_NEEDS_TORCH]
    assert {"make-data", "train", "convert", "merge", "show-trace", "plan"} <= set(light)
    results = probe(["--help"], ["--version"], *([v, "--help"] for v in light))
    for r in results:
        assert r["code"] == 0 and not r["torch"], (r["argv"], r["torch"], r["stderr"][-500:])
    top, version = results[0]["stdout"], results[1]["stdout"]
    assert version.strip() == f"blockdiff {__version__}"
    listed = {line.split()[1] for line in top.splitlines() if line.startswith("    blockdiff ")}
    assert listed == set(verbs()), f"the top-level help lists {sorted(listed)}, the parser has {verbs()}"


def test_a_mistyped_path_is_one_line_without_importing_torch(tmp_path):
    missing = tmp_path / "missing"
    cases = [(["generate", "--model", missing, "--prompt", "hi"], "model folder not found"),
             (["chat", "--model", missing], "model folder not found"),
             (["convert", "--recipe", missing, "--out", tmp_path / "o"], "recipe file not found"),
             (["train", "sft", "--recipe", missing, "--out", tmp_path / "o"], "recipe file not found"),
             (["merge", "--run", missing, "--out", tmp_path / "m"], "run folder not found"),
             (["show-trace", missing], "does not exist"),
             (["generate", "--model", tmp_path, "--prompt-file", missing], "does not exist")]
    for r, (argv, needle) in zip(probe(*(a for a, _ in cases)), cases):
        assert_usage_error(r["code"], r["stderr"], argv[0], str(missing), needle)
        assert not r["torch"], argv
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def test_eval_stub_says_what_the_eval_parser_says():
    """eval's parser is built only when eval runs; until then its one-line help is a copy, kept equal here."""
    from blockdiff.eval.command import add_eval_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    real = argparse.ArgumentParser().add_subparsers()
    add_eval_parser(real)
    helps = lambda s: {a.dest: a.help for a in s._choices_actions}  # noqa: E731
    assert helps(sub)["eval"] == helps(real)["eval"]
    assert "eval" in sub.lazy  # still a stub: nothing above built it


def test_mode_takes_any_case_and_a_bad_mode_is_one_line(tiny_bd_dir):
    argv = ["generate", "--model", tiny_bd_dir, "--prompt", "add 1+2=", "--max-new-tokens", 8]
    code, upper, err = run_cli([*argv, "--mode", "S"])
    assert code == 0, err
    for spelling in ("s", "q", "Threshold", "SPEC"):
        code, out, err = run_cli([*argv, "--mode", spelling])
        if spelling == "SPEC":  # the conftest model has no causal stream: spec is refused, naming the mode
            assert_usage_error(code, err, "generate", 'mode "spec" needs')
        else:
            assert code == 0, (spelling, err)
    assert run_cli([*argv, "--mode", "s"])[1] == upper
    code, _, err = run_cli([*argv, "--mode", "turbo"])
    assert_usage_error(code, err, "generate", "--mode turbo", "threshold, S, Q, joint")


def test_every_recipe_the_readme_names_exists():
    """A recipe the README or a docs page passes to --recipe is in the repository, or that page copies one to it
    first (`cp recipes/x.toml my.toml`), or shows a complete recipe to save under that name (a ```toml block with
    [model] and [[phases]]). The docs pages hold the commands the README's reference moved to (issue 21 item 17)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    pages = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    missing, named_anywhere = [], set()
    for page in pages:
        text = page.read_text(encoding="utf-8")
        named = set(re.findall(r"--recipe\s+(\S+\.toml)", text))
        named_anywhere |= named
        copied = {dst for src, dst in re.findall(r"^cp\s+(\S+\.toml)\s+(\S+\.toml)", text, re.M)
                  if (repo / src).is_file()}
        shown = any("[model]" in block and "[[phases]]" in block
                    for block in re.findall(r"```toml\n(.*?)```", text, re.S))
        missing += [f"{page.relative_to(repo)}: {r}" for r in sorted(named)
                    if not (repo / r).is_file() and r not in copied and not shown]
    assert named_anywhere and not missing, missing


def test_posttrain_bench_leaves_no_untracked_file(tmp_path):
    """`bench/posttrain.py` as the README runs it writes to runs/bench (git-ignored), never into bench/results
    unless asked (--out); --no-save writes nothing."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    status = lambda: subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "bench"], cwd=repo,  # noqa: E731
                                    capture_output=True, text=True).stdout
    before = status()
    cmd = [sys.executable, str(repo / "bench" / "posttrain.py"), "instruct", "--models", f"m={repo / 'assets' / 'tiny-bd'}",
           "--n", "2", "--name", "test-leaves-no-file"]
    p = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    written = sorted(f.name for f in tmp_path.iterdir())
    assert len(written) == 2 and all(f.startswith("posttrain-test-leaves-no-file-") for f in written), written
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # the default: runs/bench
    assert p.returncode == 0, p.stderr
    default = sorted((repo / "runs" / "bench").glob("posttrain-test-leaves-no-file-*"))
    assert len(default) == 2, default
    for f in default:
        f.unlink()
    assert status() == before
