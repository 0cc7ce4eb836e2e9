"""bench/realsize.py end to end on the Qwen2 miniature (issue 20 part 6): the same code path the real-size numbers come
from, so a broken step fails here and not after an hour on a 0.5B shape. Checks what the bench reports against
what it ran: the report's evaluation held to its budget, spec equal to the model's own AR, every decoder measured,
the server's KV-cache line and an answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_realsize_bench_runs_on_the_miniature(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "realsize.py"), "--shape", "qwen2-miniature",
                          "--steps", "2", "--eval-tasks", "4", "--decode-tasks", "2", "--speed-tokens", "8",
                          "--threads", "1", "--work", str(tmp_path / "work"), "--no-save"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    c = r["convert"]
    assert c["steps"] == 2 and 1 <= c["eval_prompts"] <= c["eval_prompts_asked"] == 4
    assert c["train_tokens_per_s"] > 0 and c["peak_rss_gib"] > 0 and c["plan_gib"] > 0
    assert set(r["decode"]) >= {"ar", "own-ar", "S", "Q", "threshold", "spec"}
    assert r["decode"]["spec"]["agreement_ar"] == 1.0 and r["decode"]["spec"]["code_agreement_ar"] == 1.0
    assert r["cost"]["batch1"]["c_ms"] > 0
    assert r["serve"]["status"] == 200 and r["serve"]["kv_cache_gib"] is not None
    assert "## Decoding at batch 1" in out.stdout and "| spec" in out.stdout
