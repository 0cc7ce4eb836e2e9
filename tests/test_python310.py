"""pyproject.toml says Python >= 3.10; the suite itself runs on 3.11. What is checked for 3.10, and how:

- always (on the suite's interpreter): the source parses with 3.10's grammar (`ast.parse(feature_version=(3, 10))`,
  which refuses `except*`; star-unpacking in subscripts is checked separately) and uses none of the 3.11+ standard
  library (`tomllib` outside its guarded import, `ExceptionGroup`, `typing.Self`, `enum.StrEnum`, `datetime.UTC`,
  `asyncio.TaskGroup`, ... listed in NEW_IN_311);
- where a Python 3.10 interpreter exists (pyenv's, or `python3.10` on PATH; skipped with the reason elsewhere): the
  package compiles under it; every module whose module-level imports reach only the standard library (directly or
  through other such modules) imports under it for real; and `blockdiff.train.recipe` imports and parses every
  bundled recipe under it to the same result as here, with the third-party modules it imports at module level
  (torch, ...) replaced by empty stand-ins. No 3.10 interpreter gets torch: torch for 3.10 is not installed by the
  project and nothing is downloaded at test time, so the torch-using code paths are not run under 3.10 (the recipe
  reader uses torch only for types and defaults that the stand-ins satisfy).
The 3.10 recipe reader is `tomli` (a declared dependency on 3.10); where that interpreter has no `tomli`, the copy
that pip vendors (`pip._vendor.tomli`, the same package) stands in.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "blockdiff"

# 3.11+ standard library a 3.10 interpreter lacks: module -> names new in 3.11 (None: the whole module is new)
NEW_IN_311: dict[str, set[str] | None] = {
    "tomllib": None,
    "wsgiref.types": None,
    "builtins": {"ExceptionGroup", "BaseExceptionGroup"},
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "TypeVarTuple",
               "Unpack", "Required", "NotRequired", "dataclass_transform", "get_overloads", "clear_overloads"},
    "enum": {"StrEnum", "ReprEnum", "EnumCheck", "FlagBoundary", "verify", "member", "nonmember", "global_enum",
             "show_flag_values"},
    "datetime": {"UTC"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner", "Timeout", "Barrier", "BrokenBarrierError"},
    "contextlib": {"chdir"},
    "hashlib": {"file_digest"},
    "operator": {"call"},
    "math": {"exp2", "cbrt"},
    "logging": {"getLevelNamesMapping"},
    "inspect": {"getmembers_static", "markcoroutinefunction"},
    "re": {"NOFLAG"},
    "sqlite3": {"Blob"},
}
STUBBED_ROOTS = ("torch", "numpy", "safetensors", "tokenizers", "transformers", "tqdm", "jinja2", "matplotlib")


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


PY310 = python310()
needs_310 = pytest.mark.skipif(PY310 is None, reason="no Python 3.10 interpreter here (pyenv's or python3.10 on "
                                                     "PATH): only the static 3.10 checks ran")


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _guarded(tree: ast.AST) -> set[int]:
    """Line numbers inside a `try` whose handler catches ImportError / ModuleNotFoundError, or under an
    `if sys.version_info ...` test: 3.11-only names used there have a 3.10 fallback."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        body = None
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                or isinstance(h.type, ast.Tuple) and any(getattr(e, "id", "") in ("ImportError", "ModuleNotFoundError")
                                                         for e in h.type.elts) for h in node.handlers):
            body = node.body
        elif isinstance(node, ast.If) and "version_info" in ast.unparse(node.test):
            body = node.body
        for stmt in body or ():
            lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def uses_of_311(path: Path) -> list[str]:
    """`file:line what` for each 3.11+ construct of one source file (see the module docstring)."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    try:
        tree = ast.parse(text, filename=str(path), feature_version=(3, 10))
    except SyntaxError as e:
        return [f"{rel}:{e.lineno} {e.msg}"]
    guarded = _guarded(tree)
    aliases: dict[str, str] = {}  # local name -> module it names
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name in NEW_IN_311 and NEW_IN_311[a.name] is None and node.lineno not in guarded:
                    found.append(f"{rel}:{node.lineno} import {a.name} (3.11+)")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            new = NEW_IN_311.get(node.module, set())
            for a in node.names:
                if (new is None or a.name in new) and node.lineno not in guarded:
                    found.append(f"{rel}:{node.lineno} from {node.module} import {a.name} (3.11+)")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            mod = aliases.get(node.value.id)
            if mod and node.attr in (NEW_IN_311.get(mod) or set()) and node.lineno not in guarded:
                found.append(f"{rel}:{node.lineno} {mod}.{node.attr} (3.11+)")
        elif isinstance(node, ast.Name) and node.id in NEW_IN_311["builtins"] and node.lineno not in guarded:
            found.append(f"{rel}:{node.lineno} {node.id} (3.11+)")
        elif isinstance(node, ast.Subscript):
            elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if any(isinstance(e, ast.Starred) for e in elts):
                found.append(f"{rel}:{node.lineno} star-unpacking in a subscript (3.11+)")
    return found


def test_requires_python_matches_the_recipe_reader():
    text = (REPO / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.10"' in text
    assert "tomli>=2.0; python_version < '3.11'" in text  # the 3.10 recipe parser is a declared dependency


def test_source_uses_nothing_newer_than_python_310():
    found = [f for path in sources() for f in uses_of_311(path)]
    assert not found, "3.11+ only, in a package that says Python >= 3.10:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet, needle", [
    ("import tomllib\n", "import tomllib"),
    ("try:\n    import tomllib\nexcept ModuleNotFoundError:\n    import tomli as tomllib\n", None),
    ("import sys\nif sys.version_info >= (3, 11):\n    import tomllib\n", None),
    ("try:\n    f()\nexcept* ValueError:\n    pass\n", "Exception groups"),
    ("raise ExceptionGroup('x', [ValueError()])\n", "ExceptionGroup"),
    ("from typing import Self\n", "typing import Self"),
    ("import enum\nclass A(enum.StrEnum):\n    a = 'a'\n", "enum.StrEnum"),
    ("import datetime as dt\nt = dt.datetime.now(dt.UTC)\n", "datetime.UTC"),
    ("from datetime import UTC\n", "datetime import UTC"),
    ("x: tuple[*Ts]\n", "star-unpacking"),
])
def test_the_310_check_sees_each_construct(tmp_path, snippet, needle):
    path = tmp_path / "m.py"
    path.write_text(snippet)
    found = uses_of_311(path)
    assert (needle is None and not found) or (needle and any(needle in f for f in found)), (snippet, found)


def stdlib_only_modules() -> list[str]:
    """Modules of the package whose module-level imports reach only the standard library, directly or through other
    such modules of the package (function-level imports are not run by an import)."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    deps: dict[str, set[str]] = {}
    third: dict[str, bool] = {}
    for path in sources():
        name = module_name(path)
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own, outside = set(), False
        for node in tree.body + [n for t in tree.body if isinstance(t, (ast.Try, ast.If)) for n in ast.walk(t)]:
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "blockdiff":
                        own.add(a.name)
                    elif a.name.split(".")[0] not in stdlib:
                        outside = True
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                    target = f"{base}.{node.module}" if node.module else base
                    own.add(target)
                    if not node.module:
                        own.update(f"{base}.{a.name}" for a in node.names)
                elif node.module.split(".")[0] == "blockdiff":
                    own.add(node.module)
                elif node.module.split(".")[0] not in stdlib and node.module != "tomli":
                    outside = True
        parents = name.split(".")
        own.update(".".join(parents[:i]) for i in range(1, len(parents)))  # importing a.b.c runs a and a.b first
        deps[name], third[name] = own - {name}, outside
    names = set(deps)

    def free(n: str, seen: frozenset = frozenset()) -> bool:
        if n not in names:
            return n.rpartition(".")[0] in names and free(n.rpartition(".")[0], seen)  # `from pkg import name`
        if third[n]:
            return False
        return all(d in seen or free(d, seen | {n}) for d in deps[n])

    return sorted(n for n in names if free(n))


RUNNER_310 = r'''
import importlib, importlib.abc, importlib.machinery, json, sys, types
try:
    import tomli
except ImportError:  # the interpreter has no tomli of its own: pip's vendored copy is the same package
    import pip._vendor.tomli as tomli
    sys.modules["tomli"] = tomli
job = json.loads(sys.argv[1])
sys.path.insert(0, job["src"])


class _Meta(type):  # a stand-in class: any attribute, call, subscript or union is another stand-in
    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Meta(name, (_Any,), {})

    def __call__(cls, *a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else _Meta("result", (_Any,), {})

    def __getitem__(cls, k):
        return cls

    def __or__(cls, o):
        return cls

    __ror__ = __or__


class _Any(metaclass=_Meta):
    def __init__(self, *a, **k):
        pass


class StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in job["stub"]:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []
        m.__getattr__ = lambda n: _Meta(n, (_Any,), {})
        return m

    def exec_module(self, m):
        pass


if job["stub"]:
    sys.meta_path.insert(0, StandIns())
out = {"version": sys.version.split()[0], "imported": [], "recipes": {}}
for name in job["modules"]:
    importlib.import_module(name)
    out["imported"].append(name)
if job["recipes"]:
    from blockdiff.train.recipe import load_recipe
    for path in job["recipes"]:
        out["recipes"][path] = repr(load_recipe(path))
print(json.dumps(out))
'''


def run_310(tmp_path, modules: list[str], recipes: list[str], stub: tuple[str, ...] = ()) -> dict:
    job = json.dumps({"src": str(SRC), "modules": modules, "recipes": recipes, "stub": list(stub)})
    p = subprocess.run([PY310, "-I", "-c", RUNNER_310, job], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPYCACHEPREFIX": str(tmp_path)})  # no 3.10 .pyc files in the tree
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["version"].startswith("3.10")
    return out


@needs_310
def test_package_compiles_under_python_310(tmp_path):
    out = subprocess.run([PY310, "-m", "compileall", "-q", "-d", "src", str(PACKAGE)],
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPYCACHEPREFIX": str(tmp_path)})  # leave no 3.10 .pyc files in the tree
    assert out.returncode == 0, out.stdout + out.stderr


@needs_310
def test_standard_library_only_modules_import_under_python_310(tmp_path):
    modules = stdlib_only_modules()
    assert {"blockdiff", "blockdiff.fields", "blockdiff.machine"} <= set(modules), modules
    assert run_310(tmp_path, modules, [])["imported"] == modules


@needs_310
def test_recipes_parse_under_python_310_as_here(tmp_path):
    from blockdiff.train.recipe import load_recipe

    recipes = sorted(str(p) for p in (REPO / "recipes").glob("*.toml"))
    assert len(recipes) >= 5
    out = run_310(tmp_path, ["blockdiff.train.recipe"], recipes, stub=STUBBED_ROOTS)
    assert out["recipes"] == {r: repr(load_recipe(r)) for r in recipes}
