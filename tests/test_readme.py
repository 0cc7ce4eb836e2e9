"""The README's and the docs' commands run as written, in the order shown, from a fresh folder.

Every `blockdiff ...` line of the ```bash blocks under the sections named in SECTIONS (a file and a `## ` heading:
the README's quick start, then the command pages the README's reference moved to, issue 21 item 17) is run in
process, in that order, in a temporary folder holding only what a fresh clone has (`recipes/`, `assets/`), with
short budgets appended (fewer examples, one step per phase, a few tokens): the commands must succeed as written,
each one finding what the earlier ones produced. Lines that are not `blockdiff` commands (`source
.venv/bin/activate`, `make ...`) are skipped; `make demo` is itself `make-data` + `convert` of the bundled recipe,
which the quick start repeats.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
from pathlib import Path

import pytest
from cli_helpers import run_cli

from blockdiff.train.recipe import tomllib  # tomli on Python 3.10

REPO = Path(__file__).resolve().parents[1]
# (file, `## ` heading) whose bash blocks are a user's first commands, in the order a user meets them
SECTIONS = (("README.md", "Quick start"),
            ("docs/cli.md", "Commands, in order"),
            ("docs/post_training.md", "Running it"))


def section_commands(path: str, heading: str) -> list[list[str]]:
    """argv of every `blockdiff` line in the bash blocks under `## heading` of path (comments dropped)."""
    text = (REPO / path).read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    bodies = [body for title, body in zip(parts[1::2], parts[2::2]) if title.strip() == heading]
    assert len(bodies) == 1, f"{path} has {len(bodies)} sections '## {heading}'"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", bodies[0], flags=re.S):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "blockdiff":
                commands.append(argv[1:])
    assert commands, f"no blockdiff command under '## {heading}' of {path}"
    return commands


def readme_commands() -> list[list[str]]:
    """argv of every `blockdiff` line of SECTIONS, in order."""
    return [argv for path, heading in SECTIONS for argv in section_commands(path, heading)]


def short_budget(argv: list[str], cwd: Path) -> list[str]:
    """The same command with budgets a test can afford (argparse keeps the last value of a repeated flag)."""
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
    if cmd in ("generate", "chat"):
        return argv + ["--max-new-tokens", "8"]
    return argv


def test_readme_commands_run_in_order(tmp_path, monkeypatch):
    commands = readme_commands()
    verbs = [c[0] for c in commands]
    assert {"make-data", "convert", "merge", "generate", "chat", "show-trace", "train"} <= set(verbs), verbs
    for name in ("recipes", "assets"):
        shutil.copytree(REPO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        full = short_budget(argv, tmp_path)
        if argv[0] == "chat":
            monkeypatch.setattr("sys.stdin", io.StringIO("add 12+2=\n/exit\n"))
        code, out, err = run_cli(full)
        assert code == 0, f"`blockdiff {shlex.join(argv)}` failed (exit {code}):\n{err[-2000:]}"
        if argv[0] in ("generate", "chat"):
            assert "TPF" in err, err


@pytest.mark.parametrize("needle", ["source .venv/bin/activate", ".venv/bin/blockdiff"])
def test_readme_says_how_to_reach_the_cli(needle):
    assert needle in (REPO / "README.md").read_text(encoding="utf-8")
