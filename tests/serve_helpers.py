"""A real `blockdiff serve` process on 127.0.0.1 for the server tests (test_serve, test_serve_browser): started with
the CLI on a free port, waited for on /health, stopped at the end. No mocks: the tests talk HTTP to it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, *flags, log: Path, threads: int = 1, startup_s: float = 120.0):
    """Start `blockdiff serve --model model_dir *flags` on a free port and wait for /health: (process, base URL).
    The caller stops it (`stop_server`, or a signal of its own)."""
    port = free_port()
    cmd = [sys.executable, "-m", "blockdiff.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--threads", str(threads), *map(str, flags)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"blockdiff serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"blockdiff serve did not answer /health within {startup_s} s:\n{log.read_text()}")
            time.sleep(0.2)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """Ctrl-C (SIGINT) and wait; killed if it does not exit within `timeout` s. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@contextmanager
def running_server(model_dir: Path, *flags, log: Path, threads: int = 1, startup_s: float = 120.0):
    """Yield the base URL of a `blockdiff serve --model model_dir *flags` process."""
    proc, url = start_server(model_dir, *flags, log=log, threads=threads, startup_s=startup_s)
    try:
        yield url
    finally:
        stop_server(proc)


def metric(url: str, name: str) -> float:
    """One unlabelled sample of the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=5).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
