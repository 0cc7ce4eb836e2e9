"""Running the `blockdiff` command line in process, shared by the CLI test modules (test_cli, test_cli_generate)."""

from __future__ import annotations

import contextlib
import io

from blockdiff.cli import main


def run_cli(argv: list) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `blockdiff *argv` run in this process; arguments may be paths or numbers."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_usage_error(code: int, stderr: str, cmd: str, *needles: str) -> None:
    """Bad input: exit code 2 and one stderr line `blockdiff <cmd>: error: ...` holding every needle, no traceback."""
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"blockdiff {cmd}: error: "), stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
