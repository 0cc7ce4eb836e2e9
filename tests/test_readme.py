"""The README's and the docs' commands run as written, in the order shown, from a fresh folder.

Every `blockdiff ...` line of the ```bash blocks under the sections named in SECTIONS (a file and a `## ` heading:
the README's quick start, then the command pages the README's reference moved to, issue 21 item 17) is run in
process, in that order, in a temporary folder holding only what a fresh clone has (`recipes/`, `assets/`), with
short budgets appended (fewer examples, one step per phase, a few tokens): the commands must succeed as written,
each one finding what the earlier ones produced. Where the page shows a command's output (the `# ` lines right
after it) and that output is deterministic (greedy decoding of the bundled models), the printed text must equal it
line for line, and the `[... prompt(s), tokens, forwards, TPF ...]` line its deterministic part; `blockdiff eval`'s
table must equal docs/evaluation.md's in every column but tokens/s. The lm-evaluation-harness lines
(`python -m blockdiff.eval.harness ...`) run in process with `--limit 4` (their table is measured on all 200 items:
bench/results/harness-2026-12-07.json, checked by tests/test_figures.py) and must show progress and no CUDA note.
Lines that are neither (`source .venv/bin/activate`, `make ...`, `torchrun ...`) are skipped; `make demo` is itself
`make-data` + `convert` of the bundled recipe, which the quick start repeats.

`test_serve_block_answers_as_documented` starts docs/cli.md's `blockdiff serve` line as a real process (on a free
port instead of 8000) and runs that section's `curl` line and Python block against it: each must print what the
page shows.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_helpers import run_cli
from doc_helpers import section

from blockdiff.train.recipe import tomllib  # tomli on Python 3.10

REPO = Path(__file__).resolve().parents[1]
# (file, `## ` heading) whose bash blocks are a user's first commands, in the order a user meets them
SECTIONS = (("README.md", "Quick start"),
            ("docs/cli.md", "Commands, in order"),
            ("docs/post_training.md", "Running it"),
            ("docs/evaluation.md", "Quick start on the bundled models"),
            ("docs/distributed.md", "Running it"))
HARNESS = ["python", "-m", "blockdiff.eval.harness"]
STATS = re.compile(r"^\[(\d+ prompt\(s\), \d+ tokens, \d+ forwards, TPF [\d.]+),")  # the part that is not speed


@dataclass
class Command:
    argv: list[str]  # after `blockdiff`, or the harness launcher's arguments
    harness: bool = False
    shown: list[str] = field(default_factory=list)  # the `# ` lines under it: what the page says it prints


def ansi_c_quotes(line: str) -> str:
    """bash's $'...' strings (`--stop $'\\n\\n'`) as plain shell quoting, which shlex reads."""
    return re.sub(r"\$'((?:[^'\\]|\\.)*)'",
                  lambda m: shlex.quote(m.group(1).encode().decode("unicode_escape")), line)


def section_commands(path: str, heading: str) -> list[Command]:
    """Every `blockdiff` and harness line in the bash blocks under `## heading` of path (comments dropped), with the
    comment lines right under it."""
    commands: list[Command] = []
    for block in re.findall(r"```bash\n(.*?)```", section(path, heading), flags=re.S):
        current = None
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():  # continuation lines joined
            if line.startswith("#") and current is not None:
                current.shown.append(line)
                continue
            argv = shlex.split(ansi_c_quotes(line), comments=True)
            current = None
            if argv[:1] == ["blockdiff"]:
                current = Command(argv[1:])
            elif argv[:3] == HARNESS:
                current = Command(argv[3:], harness=True)
            if current is not None:
                commands.append(current)
    assert commands, f"no blockdiff command under '## {heading}' of {path}"
    return commands


def readme_commands() -> list[Command]:
    """Every command of SECTIONS, in order."""
    return [c for path, heading in SECTIONS for c in section_commands(path, heading)]


def shown_output(shown: list[str]) -> tuple[list[str], str | None, bool]:
    """(printed lines, the stats line's deterministic part, whether the lines are only the first ones) of a command's
    `# ` lines: a line starting with `(` begins prose about the output; `...` elides the rest; an annotation after
    four or more spaces, `(...)`, is not output."""
    lines, stats, partial = [], None, False
    for raw in shown:
        text = raw[2:] if raw.startswith("# ") else raw[1:]
        if text.startswith("("):
            break
        if text.strip() == "...":
            partial = True
            break
        m = STATS.match(text)
        if m:
            stats = m.group(1)
            continue
        lines.append(re.sub(r"(?<=\S)\s{4,}\(.*\)$", "", text).rstrip())
    return lines, stats, partial


def short_budget(argv: list[str], cwd: Path, shows_output: bool = False) -> list[str]:
    """The same command with budgets a test can afford (argparse keeps the last value of a repeated flag); a
    command whose output the page shows keeps its budget, so that it prints that output."""
    cmd = argv[0]
    if cmd == "make-data":
        return argv + ["--train-examples", "300", "--valid-examples", "20", "--code-chars", "20000"]
    if cmd in ("convert", "train"):
        recipe = tomllib.loads((cwd / argv[argv.index("--recipe") + 1]).read_text())
        extra = ["--set", "train.batch_size=2", "--set", "data.valid_rows=2", "--no-progress"]
        for i, phase in enumerate(recipe.get("phases", []), start=1):
            extra += ["--set", f"phases.{i}.steps=1"] + (["--set", f"phases.{i}.tokens=0"] if "tokens" in phase else [])
        if recipe.get("eval", {}).get("tasks"):
            extra += ["--set", "eval.tasks=4", "--set", "eval.max_new_tokens=8"]
        if "rollout" in recipe:
            extra += ["--set", "rollout.prompts_per_step=1", "--set", "rollout.decode.max_new_tokens=4"]
        if "merge" in recipe and recipe["merge"].get("top_k"):
            extra += ["--set", "merge.top_k=1"]
        return argv + extra
    if cmd == "chat" or (cmd == "generate" and not shows_output):
        return argv + ["--max-new-tokens", "8"]
    if cmd == "eval" and "--run" in argv:  # a small frontier
        return argv + ["--prompts", "8", "--batch-size", "8", "--sweep-thresholds", "0.9", "--sweep-pairs", "0.5:0.0"]
    if cmd == "eval":  # docs/evaluation.md's table: all its prompts (accuracy, TPF, forwards do not depend on batch)
        return argv + ["--no-frontier", "--batch-size", "16"]
    return argv


def markdown_table(text: str, first_header: str) -> list[dict[str, str]]:
    """Rows (header -> cell) of the first markdown table in text whose first header cell is first_header."""
    for block in re.findall(r"((?:^\|.*\|\n)+)", text, flags=re.M):
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()]
        if rows[0][0] == first_header:
            return [dict(zip(rows[0], r)) for r in rows[2:]]
    raise AssertionError(f"no table starting with '{first_header}'")


def check_eval_table(out_dir: Path) -> None:
    """`blockdiff eval --model ...`'s eval.md equals docs/evaluation.md's table in every column the page shows but
    tokens/s (speed); rows matched by model and decoding."""
    doc = markdown_table(section("docs/evaluation.md", "Quick start on the bundled models"), "model")
    got = {(r["model"], r["decoding"]): r for r in markdown_table((out_dir / "eval.md").read_text(), "model")}
    assert len(doc) == 4
    for row in doc:
        mine = got[(row["model"], row["decoding"])]
        for col, value in row.items():
            if col != "tokens/s":
                assert mine[col] == value, f"eval {row['model']} {row['decoding']}: {col} {mine[col]}, docs {value}"


def run_harness(argv: list[str]) -> tuple[int, str]:
    """The harness launcher in process (it is lm_eval's command line): (exit code, stderr)."""
    from blockdiff.eval import harness

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            harness.main(argv)
        except SystemExit as e:
            code = e.code or 0
    return code, err.getvalue()


def test_readme_commands_run_in_order(tmp_path, monkeypatch):
    commands = readme_commands()
    verbs = [c.argv[0] for c in commands if not c.harness]
    assert {"make-data", "convert", "merge", "generate", "chat", "show-trace", "train", "eval", "plan"} <= set(verbs)
    assert sum(c.harness for c in commands) == 2
    assert sum(bool(c.shown) for c in commands) >= 8
    for name in ("recipes", "assets"):
        shutil.copytree(REPO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["lm_eval"])  # the launcher replaces it
    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf"))):
        monkeypatch.setenv(var, value)
    for c in commands:
        name = ("python -m blockdiff.eval.harness " if c.harness else "blockdiff ") + shlex.join(c.argv)
        lines, stats, partial = shown_output(c.shown)
        if c.harness:
            code, err = run_harness(c.argv + ["--limit", "4"])
            assert code == 0, f"`{name}` failed (exit {code}):\n{err[-2000:]}"
            assert "Running loglikelihood requests: 100%" in err, err[-2000:]  # progress (issue 21 item 14)
            assert "not available" not in err and "cuda" not in err.lower(), err[-2000:]  # no CUDA note on a CPU
            assert list((tmp_path / "runs/lm-eval").rglob("results_*.json")), "no --output_path results"
            continue
        full = short_budget(c.argv, tmp_path, shows_output=bool(lines or stats))
        if c.argv[0] == "chat":
            monkeypatch.setattr("sys.stdin", io.StringIO("add 12+2=\n/exit\n"))
        code, out, err = run_cli(full)
        assert code == 0, f"`{name}` failed (exit {code}):\n{err[-2000:]}"
        if c.argv[0] in ("generate", "chat"):
            assert "TPF" in err, err
        printed = [line.rstrip() for line in out.splitlines() if line.strip()]
        if lines:
            assert (printed[:len(lines)] if partial else printed) == lines, f"`{name}` printed:\n{out}"
        if stats:
            got = [m.group(1) for m in map(STATS.match, err.splitlines()) if m]
            assert got == [stats], f"`{name}`: {got} where the page shows [{stats}, ...]"
        if c.argv[0] == "eval" and "--run" not in c.argv:
            check_eval_table(tmp_path / c.argv[c.argv.index("--out") + 1])


def test_shown_outputs_are_read_as_written():
    lines, stats, partial = shown_output(["# [1] bxznso", "# [2] 7          (wrong: the answer is 1)",
                                          "#         if x(a):", "# [3 prompt(s), 11 tokens, 18 forwards, TPF 0.61, "
                                          "119.0 tokens/s, 1 thread(s)]", "# (prose", "# more prose)"])
    assert lines == ["[1] bxznso", "[2] 7", "        if x(a):"] and stats == "3 prompt(s), 11 tokens, 18 forwards, " \
        "TPF 0.61" and not partial
    assert shown_output(["# step 1 | [a]", "# ...", "# step 9"]) == (["step 1 | [a]"], None, True)


def wait_for_health(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"blockdiff serve exited with {proc.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no /health within {timeout} s:\n{log.read_text()}"
        time.sleep(0.2)


def test_serve_block_answers_as_documented(tmp_path):
    """docs/cli.md's serve section as a user runs it: its `blockdiff serve` line (docs/serving.md's is the same
    command), then its curl line and its Python block against that server, each printing what the page shows."""
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
    pytest.importorskip("openai", reason="the openai client is not installed (pip install -e '.[test]')")
    from serve_helpers import free_port, stop_server

    text = section("docs/cli.md", "`blockdiff serve`")
    serve = [c.argv for c in section_commands("docs/cli.md", "`blockdiff serve`") if c.argv[0] == "serve"]
    serving_md = (REPO / "docs/serving.md").read_text(encoding="utf-8")
    assert len(serve) == 1 and f"blockdiff {shlex.join(serve[0])} " in serving_md  # the same line in both pages
    argv, port = list(serve[0]), free_port()
    argv[argv.index("--port") + 1] = str(port)
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "blockdiff.cli", *argv, "--threads", "1"], cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_health(proc, f"http://127.0.0.1:{port}", log)
        blocks = re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)
        bash = next(b for kind, b in blocks if kind == "bash" and "curl " in b)
        line = next(ln for ln in re.sub(r"\\\n\s*", " ", bash).splitlines() if ln.startswith("curl "))
        curl = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in shlex.split(line, comments=True)]
        got = json.loads(subprocess.run(curl, capture_output=True, text=True, timeout=60, check=True).stdout)
        want = json.loads(bash.split("\n# ", 1)[1].strip())
        for key in ("id", "created"):  # per request
            got.pop(key), want.pop(key)
        assert got == want

        code = next(b for kind, b in blocks if kind == "python").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        shown = next(b for kind, b in blocks if kind == "text" and b.startswith("# prints"))
        assert printed.stdout.strip().splitlines() == shown.strip().splitlines()[1:]
    finally:
        code = stop_server(proc)
    assert code == 130, log.read_text()  # Ctrl-C: exit 130 (issue 21 item 11)


@pytest.mark.parametrize("needle", ["source .venv/bin/activate", ".venv/bin/blockdiff"])
def test_readme_says_how_to_reach_the_cli(needle):
    assert needle in (REPO / "README.md").read_text(encoding="utf-8")
