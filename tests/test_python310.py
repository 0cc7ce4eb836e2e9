"""pyproject.toml says Python >= 3.10: the package must at least compile there, and read recipes without the 3.11
standard library's tomllib (it uses tomli on 3.10). Runs where a 3.10 interpreter exists, skips elsewhere."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def python310() -> str | None:
    """A working Python 3.10 (pyenv shims exist without a usable interpreter behind them: try each)."""
    candidates = [*sorted(map(str, Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))), shutil.which("python3.10")]
    for c in filter(None, candidates):
        try:
            ok = subprocess.run([c, "--version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if ok.returncode == 0 and ok.stdout.startswith("Python 3.10"):
            return c
    return None


def test_requires_python_matches_the_recipe_reader():
    text = (REPO / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.10"' in text
    assert "tomli>=2.0; python_version < '3.11'" in text  # the 3.10 recipe parser is a declared dependency


@pytest.mark.skipif(python310() is None, reason="no Python 3.10 interpreter on this machine")
def test_package_compiles_under_python_310(tmp_path):
    out = subprocess.run([python310(), "-m", "compileall", "-q", "-d", "src", str(REPO / "src" / "blockdiff")],
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPYCACHEPREFIX": str(tmp_path)})  # leave no 3.10 .pyc files in the tree
    assert out.returncode == 0, out.stdout + out.stderr
    # the only 3.11-only import is tomllib, and it is guarded
    for path in (REPO / "src" / "blockdiff").rglob("*.py"):
        for line in path.read_text().splitlines():
            if line.strip().startswith("import tomllib") and "recipe.py" not in path.name:
                pytest.fail(f"{path}: unguarded `import tomllib` (3.11+)")
