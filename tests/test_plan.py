"""The memory plan (train/plan.py, `blockdiff plan`) against measured peaks of the bundled model on CPU, and its
CLI (issue 14 part 5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_usage_error, run_cli

from blockdiff.model.hf_io import load_config
from blockdiff.train.plan import plan_memory

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "assets" / "tiny-ar"

# Child process: RSS growth (peak minus current before the first step) over 3 AdamW steps of the real objective,
# fp32, 1 thread -- the part of the plan that is not the resident weights.
MEASURE = """
import json, sys, torch
from blockdiff.load import load_checkpoint
from blockdiff.objectives.diffusion import DiffusionLossConfig, ar_loss, diffusion_loss
torch.set_num_threads(1)
folder, kind, b, L, B = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = load_checkpoint(folder, train=True).model.train()
V = model.cfg.vocab_size
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
g = torch.Generator().manual_seed(0)
batch = {"input_ids": torch.randint(0, V - 1, (b, L), generator=g)}
cfg = DiffusionLossConfig(mask_token_id=V - 1, block_size=B)
with open("/proc/self/statm") as f:
    base = int(f.read().split()[1]) * 4096
for _ in range(3):
    loss, _ = ar_loss(model, batch) if kind == "ar" else diffusion_loss(model, batch, cfg, generator=g)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
# VmHWM: this process image's peak RSS. Not ru_maxrss, which Linux carries across exec from the parent (pytest's
# own RSS at fork time would become the "peak" late in a test session).
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({"growth": hwm - base}))
"""


@pytest.mark.parametrize("kind,b,L,B", [("diffusion", 8, 256, 32), ("diffusion", 8, 256, 256), ("ar", 8, 256, 1)],
                         ids=["bd-B32", "mdlm", "ar"])
def test_plan_matches_measured_cpu_peak(kind, b, L, B):
    out = subprocess.run([sys.executable, "-c", MEASURE, str(BUNDLED), kind, str(b), str(L), str(B)],
                         capture_output=True, text=True, timeout=300, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    plan = plan_memory(load_config(BUNDLED), seq_len=L, batch_size=b, block_size=B, kind=kind, device="cpu")
    planned = plan.total - plan.rows["weights"]  # the weights were resident before the baseline
    assert abs(planned - measured) <= 0.25 * measured, f"plan {planned / 2**20:.0f} MiB vs measured {measured / 2**20:.0f} MiB"


def test_plan_scales_with_devices_and_sequence():
    cfg = load_config(BUNDLED)
    one = plan_memory(cfg, seq_len=4096, batch_size=1, block_size=32, devices=1, device="cuda")
    eight = plan_memory(cfg, seq_len=4096, batch_size=1, block_size=32, devices=8, device="cuda")
    assert eight.rows["optimizer"] * 8 == one.rows["optimizer"] == cfg.num_parameters() * 8
    assert eight.rows["activations"] == one.rows["activations"]  # data parallel: same micro-batch per device
    bd = plan_memory(cfg, seq_len=1024, batch_size=1, block_size=32, device="cuda")
    ar = plan_memory(cfg, seq_len=1024, batch_size=1, block_size=1, kind="ar", device="cuda")
    assert bd.rows["activations"] > 1.8 * (ar.rows["activations"] - 1024 * cfg.vocab_size * 8)  # [x_t ; x0]: T = 2L
    ac = plan_memory(cfg, seq_len=1024, batch_size=1, block_size=32, device="cuda", ac=True)
    assert ac.rows["activations"] < bd.rows["activations"]


def test_plan_cli(tmp_path):
    code, out, _ = run_cli(["plan", "--model", BUNDLED, "--devices", 8, "--device", "h100", "--seq-len", 4096])
    assert code == 0
    last = json.loads(out.strip().splitlines()[-1])
    assert last["devices"] == 8 and last["fits"] is True and last["device_memory"] == 80 * 2**30
    assert "optimizer" in out and "activations" in out and "KV cache" in out
    recipe = REPO / "recipes" / "tiny_wsd.toml"
    code, out, _ = run_cli(["plan", "--recipe", recipe, "--model", BUNDLED, "--device", "cpu", "--devices", 2])
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["devices"] == 2
    for argv, needle in ((["--model", BUNDLED, "--devices", 0], "--devices must be >= 1"),
                         (["--model", BUNDLED, "--device", "tpu"], "--device must be"),
                         (["--model", tmp_path], "no config.json")):
        code, _, err = run_cli(["plan", *argv])
        assert_usage_error(code, err, "plan", needle)
