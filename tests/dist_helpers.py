"""Helpers of the multi-process tests (tests/test_distributed.py): recipes as TOML files and real `torchrun` launches
of the `blockdiff` CLI (gloo on CPU, one thread per rank)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (e.g. [rollout] decode = { ... })
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def write_toml(raw: dict, path: Path) -> Path:
    """The recipe dict of train_helpers.make_recipe (flat tables, [[phases]]) as a TOML file."""
    lines = []
    for section, table in raw.items():
        if section == "phases":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for ph in raw.get("phases", []):
        lines.append("[[phases]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in ph.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
            "-m", "blockdiff.cli", *args]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `blockdiff <args>` on `nproc` ranks; fails the test with the output when it does not exit 0."""
    p = subprocess.run(torchrun_cmd(nproc, args), capture_output=True, text=True, timeout=timeout, env=_env(),
                       cwd=REPO)
    assert p.returncode == 0, f"torchrun exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p


def torchrun_killed(nproc: int, args: list[str], when: Path, timeout: float = 300) -> None:
    """Start `blockdiff <args>` on `nproc` ranks and SIGKILL the whole launch (agent and ranks) as soon as the
    path `when` exists: a crash at an arbitrary point after that checkpoint, possibly mid-save."""
    p = subprocess.Popen(torchrun_cmd(nproc, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=_env(), cwd=REPO, start_new_session=True)
    t0 = time.monotonic()
    try:
        while not when.exists():
            if p.poll() is not None:
                raise AssertionError(f"the run ended (exit {p.returncode}) before {when} appeared:\n"
                                     f"{p.stderr.read()[-6000:]}")
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{when} did not appear within {timeout} s")
            time.sleep(0.02)
    finally:
        # torchrun starts each rank in its own session: kill the ranks by pid, then the launcher
        for pid in [*_descendants(p.pid), p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
        p.stderr.close()


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def state(folder: Path) -> dict[str, torch.Tensor]:
    from blockdiff.model.hf_io import load_pretrained

    return load_pretrained(folder).state_dict()


def assert_close_weights(a: Path, b: Path, *, exact: bool = False, atol: float = 1e-5) -> None:
    wa, wb = state(a), state(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=atol, msg=lambda m: f"{k}: {m}")
