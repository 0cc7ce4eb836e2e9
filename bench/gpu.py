"""The GPU check (issue 20 part 7): every GPU path the README claims, measured in one run on one CUDA device, with
its baseline beside it, written to one dated JSON -- so the first session lent a GPU gets all the numbers in one call.

    python bench/gpu.py                          # one GPU (~6 min on an H100, estimated): results/gpu-<date>.{md,json}
    python bench/gpu.py --sections attention,moe # a subset (the others are recorded as not selected)
    python bench/gpu.py --dry --out /tmp/gpu     # CPU, smallest sizes (automatic without CUDA): results/gpu-dry-<date>

Sections, in this order (each in its own subprocess with a timeout, so a crash, a hang or a CUDA error in one is
recorded as that section's error and the others still run):
  tests      `pytest -m gpu tests` (tests/test_gpu.py, the CUDA MoE tests): passed / failed / skipped counts and
             the failures' messages (junit XML).
  attention  one training step (diffusion_loss forward + backward, [x_t ; x0], clean stream causal, AR loss,
             two documents per row, bf16 autocast as the loop runs it) with the FlexAttention block mask (what
             `build_mask` picks on CUDA) against the dense boolean mask + SDPA on the same model and batch:
             median step ms, peak CUDA memory, first-step loss and gradient agreement. Model: a random
             Qwen2.5-0.5B shape (config only, no weights). The objective has no backend switch, so the bench swaps
             `objectives.diffusion.build_mask`, as tests/test_gpu.py does.
  decode     bench/decode.py's measurement (`decode.child`, in this process) on assets/tiny-bd against its parent
             assets/tiny-ar: HF generate on the parent (the baseline), the converted checkpoint as AR (own-ar),
             threshold / S / Q and spec, at batch 1 and 16: held-out task accuracy, tokens/s, TPF, vs AR, and
             spec's agreement with own-ar (lossless: must be 1).
  moe        bench/moe.py's `run`: the MoE layer's expert forward (on CUDA bf16 sm90+ torch's grouped GEMM,
             `use_grouped_mm`) against the per-expert masked loop, forward and forward + backward, outputs equal.
  fsdp       `blockdiff convert` on the bundled model, the plain loop and `torchrun --nproc-per-node 1` (FSDP2,
             nccl on CUDA, bf16 parameters) on the same recipe (bench/scale.py's `run`): step ms, tokens/s, every
             loss finite, first-step loss of the two runs equal within bf16 rounding.
  shape      the per-forward cost curve of decoding (bench/cost.py's `measure`) on the random Qwen2.5-0.5B shape in
             bf16, batch 1 and 16: ms of a cached forward of k query tokens, cost(k)/cost(1), spec's break-even at
             the default draft length; and end-to-end tokens/s of AR, S and spec at batch 1 on those random weights
             (TPF about 1: it measures the engine's cost per forward at a real width, not a decoding speed-up).

--dry (automatic without CUDA) runs every section on the CPU at its smallest size: the same code up to the CUDA-only
numbers, which are recorded as "skipped: no CUDA" (flex backward, peak CUDA memory, grouped GEMM, bf16, passing
GPU tests); tests/test_gpu_script.py runs it in CI. --budget-s (default 420) bounds the whole run: a section that
would start after it is skipped, and a running one is stopped 30 s past it, each recorded so.

Section status: "ok" (measured), "failed" (measured, but a check such as loss or output equality did not hold:
`failed_checks`), "error" (an exception, a crash or a timeout: `error`), "skipped" (`reason`). Prints the tables and
ends with one JSON line (machine.write_results).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from machine import cpu_name, write_results

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = "skipped: no CUDA"
SECTIONS = ("tests", "attention", "decode", "moe", "fsdp", "shape")
GRACE_S = 30  # a running section may overrun the budget by this much before it is stopped

# Qwen/Qwen2.5-0.5B's config.json (the decoder fields; read by the project's own reader, ModelConfig.from_hf). No
# weights are downloaded: the bench initialises them at random, which is enough for cost and equality checks.
QWEN25_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
              "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
              "tie_word_embeddings": True}
# --dry: the same family at the smallest size that still has GQA, RoPE, biases and tied embeddings.
QWEN_DRY = QWEN25_05B | {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2}


@dataclass
class Run:
    """What every section gets: dry (CPU, smallest sizes) or the CUDA device, and a scratch folder."""

    dry: bool
    tmp: Path

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.dry else "cuda")

    def pick(self, dry, gpu):
        """The --dry value or the GPU value of a size."""
        return dry if self.dry else gpu

    def sync(self) -> None:
        import torch

        if not self.dry:
            torch.cuda.synchronize()

    def cuda(self, value):
        """A CUDA-only measurement: `value` on a GPU, NO_CUDA in a dry run."""
        return NO_CUDA if self.dry else value


def _round(x, n: int = 4):
    return None if x is None else float(f"{x:.{n}g}")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def random_model(run: Run, dtype=None):
    """The Qwen2.5-0.5B shape (QWEN_DRY in a dry run) at random init on the run's device, with block-diffusion
    facts as the main job leaves them (labels shift, clean stream causal, B = 32; the last id stands for [MASK])."""
    import torch

    from blockdiff.model.build import build_model
    from blockdiff.model.config import DiffusionInfo, ModelConfig

    cfg = ModelConfig.from_hf(run.pick(QWEN_DRY, QWEN25_05B), source="Qwen2.5-0.5B config")
    cfg.diffusion = DiffusionInfo(mask_token_id=cfg.vocab_size - 1, block_size=run.pick(8, 32), labels="shift",
                                  clean_stream="causal")
    model = build_model(cfg)
    model.init_weights(seed=0)
    model.to(run.device)
    for p in model.parameters():  # parameters only: the RoPE frequencies stay fp32, as load_pretrained keeps them
        p.data = p.data.to(dtype or torch.float32)
    return model


# ----------------------------------------------------------------------------------------------- sections
def section_tests(run: Run) -> dict:
    """`pytest -m gpu tests` in a child process; counts and failures from its junit XML."""
    junit = run.tmp / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}", "-q", "-rs",
           "tests"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if not junit.is_file():
        raise RuntimeError(f"pytest exited {p.returncode} without a report:\n{(p.stdout + p.stderr)[-3000:]}")
    cases, problems, skips = 0, [], {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        cases += 1
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        for tag in ("failure", "error"):
            for el in case.findall(tag):
                problems.append({"test": name, "kind": tag, "message": (el.get("message") or "")[:500]})
        for el in case.findall("skipped"):
            skips[name] = (el.get("message") or "")[:200]
    failed = len({x["test"] for x in problems})
    passed = cases - failed - len(skips)
    out = {"cmd": "pytest -m gpu tests", "exit_code": p.returncode, "collected": cases, "skipped": len(skips),
           "skip_reasons": skips, "passed": run.cuda(passed), "failed": run.cuda(failed), "failures": problems,
           "summary": f"{cases} gpu tests: " + (f"all skipped ({NO_CUDA})" if run.dry else
                                                f"{passed} passed, {failed} failed, {len(skips)} skipped")}
    out["md"] = "\n".join([f"- {x['test']} ({x['kind']}): {x['message']}" for x in problems]
                          + [f"- {t} skipped: {why}" for t, why in skips.items()]) or "(no failures, nothing skipped)"
    if cases == 0:
        out["failed_checks"] = ["no test marked gpu was collected"]
    elif problems:
        out["failed_checks"] = [f"{x['test']}: {x['kind']}" for x in problems]
    return out


@contextlib.contextmanager
def mask_backend(kind: str):
    """diffusion_loss builds its mask through objectives.diffusion.build_mask (flex on CUDA, dense on CPU) and src
    has no switch between them: swap that one function for the duration (tests/test_gpu.py does the same)."""
    import blockdiff.objectives.diffusion as diff
    from blockdiff.model.masks import dense_mask, flex_block_mask

    builder = {"dense": dense_mask, "flex": flex_block_mask}[kind]
    original = diff.build_mask
    diff.build_mask = builder
    try:
        yield
    finally:
        diff.build_mask = original


def section_attention(run: Run) -> dict:
    """FlexAttention vs dense SDPA mask: one training step on the same model and batch."""
    import torch

    from blockdiff.objectives.diffusion import DiffusionLossConfig, diffusion_loss
    from blockdiff.train.loop import autocast_dtype

    dev = run.device
    model = random_model(run).train()
    info = model.cfg.diffusion
    b, L, B = run.pick((2, 64, 8), (4, 1024, 32))
    warmup, repeats = run.pick((0, 2), (2, 5))
    cfg = DiffusionLossConfig(mask_token_id=info.mask_token_id, block_size=B, shift=info.shift,
                              clean_causal=info.causal_clean, ar_weight=1.0)
    x0 = torch.randint(0, info.mask_token_id, (b, L), generator=torch.Generator().manual_seed(0)).to(dev)
    doc = torch.zeros_like(x0)
    doc[:, 5 * L // 8:] = 1  # two documents per row: the mask's document rule is exercised
    batch = {"input_ids": x0, "doc_ids": doc}
    amp = autocast_dtype("auto", dev)

    def loss_of(kind: str):
        with mask_backend(kind), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss, _ = diffusion_loss(model, batch, cfg, generator=torch.Generator().manual_seed(0))
        return loss

    def train_step(kind: str) -> float:
        model.zero_grad(set_to_none=True)
        loss = loss_of(kind)
        loss.backward()
        return float(loss.detach())

    res: dict = {"model": f"random Qwen2.5-0.5B shape ({model.cfg.num_parameters() / 1e6:.1f}M params)"
                 if not run.dry else f"random Qwen2 miniature ({model.cfg.num_parameters() / 1e3:.0f}k params)",
                 "batch": b, "seq_len": L, "block_size": B, "dtype": "bfloat16 autocast" if amp else "float32"}
    grads: dict = {}
    kinds = ("dense",) if run.dry else ("dense", "flex")  # CPU flex has no backward in torch 2.13
    for kind in kinds:
        first = train_step(kind)  # flex: compiles here
        grads[kind] = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        for _ in range(warmup):
            train_step(kind)
        model.zero_grad(set_to_none=True)
        if not run.dry:
            torch.cuda.reset_peak_memory_stats()
        base = 0 if run.dry else torch.cuda.memory_allocated()  # the weights alone
        times = []
        for _ in range(repeats):
            run.sync()
            t0 = time.perf_counter()
            train_step(kind)
            run.sync()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = 0 if run.dry else torch.cuda.max_memory_allocated()
        res[kind] = {"loss": first, "step_ms": round(statistics.median(times), 2),
                     "peak_mib": run.cuda(round(peak / 2**20, 1)),
                     "peak_over_weights_mib": run.cuda(round((peak - base) / 2**20, 1))}
    model.zero_grad(set_to_none=True)
    if run.dry:  # CPU flex runs forward only (eager): the same loss through both masks without grad
        with torch.no_grad():
            fwd = {kind: float(loss_of(kind)) for kind in ("dense", "flex")}
    else:  # the first training step's forward (a no-grad call would only recompile the flex kernel)
        fwd = {kind: res[kind]["loss"] for kind in ("dense", "flex")}
    res["forward_loss"] = fwd
    tol = 1e-2 if amp is not None else 1e-4  # relative; bf16 autocast rounds differently in the two kernels
    res["loss_tolerance_rel"] = tol
    checks = []
    if not _rel(fwd["flex"], fwd["dense"]) <= tol:
        checks.append(f"forward loss flex {fwd['flex']:.6g} vs dense {fwd['dense']:.6g}")
    if run.dry:
        res["flex"] = {"loss": NO_CUDA, "step_ms": NO_CUDA, "peak_mib": NO_CUDA, "peak_over_weights_mib": NO_CUDA}
        res.update(flex_speedup=NO_CUDA, flex_memory_ratio=NO_CUDA, grad_rel_diff=NO_CUDA)
        res["summary"] = (f"dense step {res['dense']['step_ms']:.1f} ms (CPU); flex forward loss = dense within "
                          f"{_rel(fwd['flex'], fwd['dense']):.1e}; flex training {NO_CUDA}")
    else:
        d, f = res["dense"], res["flex"]
        num = sum(float((grads["flex"][n] - g).square().sum()) for n, g in grads["dense"].items())
        den = sum(float(g.square().sum()) for g in grads["dense"].values())
        res.update(flex_speedup=round(d["step_ms"] / f["step_ms"], 3),
                   flex_memory_ratio=round(f["peak_over_weights_mib"] / max(d["peak_over_weights_mib"], 1e-9), 3),
                   grad_rel_diff=_round(math.sqrt(num / max(den, 1e-30))))
        if not res["grad_rel_diff"] <= 5e-2:
            checks.append(f"gradients differ: |g_flex - g_dense| / |g_dense| = {res['grad_rel_diff']}")
        res["summary"] = (f"flex {f['step_ms']:.1f} ms vs dense {d['step_ms']:.1f} ms per step "
                          f"({res['flex_speedup']:.2f}x), activation memory {res['flex_memory_ratio']:.2f}x, "
                          f"loss diff {_rel(f['loss'], d['loss']):.1e}, grad diff {res['grad_rel_diff']:.1e}")
    res["failed_checks"] = checks
    res["md"] = "\n".join(
        [f"{res['model']}, batch {b} x {L} tokens ([x_t ; x0]: 2 x {L}), B = {B}, {res['dtype']}", "",
         "| mask | first loss | step ms | peak MiB | peak over weights MiB | forward loss |",
         "|---|---:|---:|---:|---:|---:|"]
        + [f"| {k} | {res[k]['loss']} | {res[k]['step_ms']} | {res[k]['peak_mib']} | {res[k]['peak_over_weights_mib']} | "
           f"{fwd[k]:.6g} |" for k in ("dense", "flex")])
    return res


DECODERS = ("ar", "own-ar", "threshold", "S", "Q", "spec")


def section_decode(run: Run) -> dict:
    """bench/decode.py's per-decoder measurement on the bundled checkpoints, every mode, batch 1 and 16."""
    import decode as decode_bench

    from blockdiff.decode.config import DEFAULT_DRAFT_LEN

    batches = run.pick((1, 2), (1, 16))
    base = dict(model=str(REPO / "assets/tiny-bd"), parent=str(REPO / "assets/tiny-ar"), tasks=run.pick(4, 64),
                speed_prompts=run.pick(2, 16), speed_tokens=run.pick(8, 64), device=str(run.device), threads=0,
                draft_len=DEFAULT_DRAFT_LEN)
    results: dict[int, dict[str, dict]] = {}
    for b in batches:
        for d in DECODERS:
            print(f"[gpu] decode batch {b} {d}", file=sys.stderr, flush=True)
            results.setdefault(b, {})[d] = decode_bench.child(SimpleNamespace(**base, child=d, batch=b))
    summary = {f"batch{b}": decode_bench.summarize(res) for b, res in results.items()}
    checks = [f"batch {b}: spec output != own-ar's ({s['spec']['agreement_ar']:.3f} / {s['spec']['code_agreement_ar']:.3f})"
              for b, s in zip(batches, summary.values())
              if s["spec"]["agreement_ar"] != 1 or s["spec"]["code_agreement_ar"] != 1]
    big = summary[f"batch{batches[-1]}"]
    head = ", ".join(f"{d} {big[d]['task_vs_ar']:.2f}x" for d in DECODERS[1:])
    return {"settings": base | {"batches": list(batches)}, **summary, "failed_checks": checks,
            "summary": f"task tokens/s vs HF AR at batch {batches[-1]}: {head}; accuracy AR "
                       f"{big['ar']['accuracy']:.2f}, S {big['S']['accuracy']:.2f}, spec {big['spec']['accuracy']:.2f}",
            "md": f"settings: {json.dumps(base)}\n\n" + decode_bench.table(results, summary)}


def section_moe(run: Run) -> dict:
    """bench/moe.py's grouped-vs-loop comparison: forward and forward + backward."""
    import moe as moe_bench
    import torch

    from blockdiff.model.moe import use_grouped_mm

    dev, dtype = run.device, run.pick(torch.float32, torch.bfloat16)
    # hidden x tokens x experts; expert width hidden / 2: LLaDA2-mini's experts (512 wide, 256 of them, top-8)
    # at a training-like batch and at one / eight decoding blocks of 32 tokens
    sizes = run.pick(["64x64x16"], ["1024x4096x64", "1024x4096x256", "1024x32x256", "1024x256x256"])
    rows, checks = [], []
    for backward in (False, True):
        args = SimpleNamespace(top_k=8, repeats=run.pick(2, 10), backward=backward)
        for size in sizes:
            hidden, tokens, experts = (int(v) for v in size.split("x"))
            row = {"hidden": hidden, "tokens": tokens, "experts": experts, "backward": backward}
            try:  # moe.run exits when the outputs differ: keep the other sizes
                row |= moe_bench.run(hidden, tokens, experts, args, dev, dtype)
            except SystemExit as e:
                row |= {"outputs_equal": False, "error": str(e)}
                checks.append(f"{size} {'fwd+bwd' if backward else 'fwd'}: {e}")
            rows.append(row)
    grouped_mm = use_grouped_mm(torch.zeros(1, device=dev, dtype=dtype))
    if not (run.dry or grouped_mm):
        checks.append("the grouped GEMM path was not taken (use_grouped_mm: CUDA bf16 on sm90+)")
    lines = ["| hidden | tokens | experts | pass | grouped ms | loop ms | speedup | outputs equal |",
             "|---:|---:|---:|---|---:|---:|---:|---|"]
    lines += [f"| {r['hidden']} | {r['tokens']} | {r['experts']} | {'fwd+bwd' if r['backward'] else 'fwd'} | "
              f"{r.get('grouped_ms', '-')} | {r.get('loop_ms', '-')} | {r.get('speedup', '-')}x | {r['outputs_equal']} |"
              for r in rows]
    speed = [r["speedup"] for r in rows if "speedup" in r] or [float("nan")]
    return {"dtype": str(dtype).removeprefix("torch."), "grouped_mm": run.cuda(grouped_mm), "rows": rows,
            "speedup_min": min(speed), "speedup_max": max(speed), "failed_checks": checks,
            "summary": f"{'grouped_mm' if grouped_mm else 'sorted grouped'} vs per-expert loop "
                       f"{min(speed):.2f}x-{max(speed):.2f}x, outputs equal in "
                       f"{sum(r['outputs_equal'] for r in rows)}/{len(rows)}", "md": "\n".join(lines)}


def recipe_toml(run: Run, data: Path, fsdp: str, steps: int) -> str:
    """bench/scale.py's recipe at this run's size and device (threads 0: torch's default)."""
    import scale as scale_bench

    b, L = run.pick((2, 32), (16, 256))
    return scale_bench.recipe_toml(REPO / "assets" / "tiny-ar", data, batch=b, seq_len=L, steps=steps, threads=0,
                                   fsdp=fsdp, device=run.device, block_size=run.pick(8, 32))


def section_fsdp(run: Run) -> dict:
    """`blockdiff convert`: the plain loop vs torchrun FSDP2 on one rank, the same recipe (bench/scale.py's run)."""
    import scale as scale_bench

    from blockdiff.data.bundled import write_bundled_corpus

    os.environ["BLOCKDIFF_CACHE"] = str(run.tmp / "cache")  # the tokenised corpus: nothing left in ~/.cache
    data = run.tmp / "data"
    write_bundled_corpus(data, train_examples=run.pick(60, 2000), train_code_chars=run.pick(4000, 200_000),
                         valid_examples=4, valid_code_chars=1000)
    steps, warmup = run.pick((3, 1), (12, 4))
    res: dict = {}
    for name, nproc, fsdp in (("plain", 0, "off"), ("fsdp2 x1", 1, "auto")):
        toml = run.tmp / f"{nproc}.toml"
        toml.write_text(recipe_toml(run, data, fsdp, steps))
        out = run.tmp / f"run{nproc}"
        r = scale_bench.run(name, nproc, toml, out, warmup)
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(x)]
        res[name] = {"step_ms": round(r["step_ms"], 2), "tokens_per_s": round(r["tokens_per_s"], 1),
                     "losses": [round(x, 5) for x in losses], "all_finite": all(math.isfinite(x) for x in losses)}
    plain, sharded = res["plain"], res["fsdp2 x1"]
    tol = run.pick(1e-4, 2e-2)  # relative; bf16 parameters under FSDP vs bf16 autocast over fp32 weights
    diff = _rel(sharded["losses"][0], plain["losses"][0])
    checks = [f"{n}: a loss is not finite" for n, r in res.items() if not r["all_finite"]]
    checks += [f"first-step loss fsdp2 {sharded['losses'][0]} vs plain {plain['losses'][0]}"] if diff > tol else []
    return {**res, "steps": steps, "timed_after_step": warmup, "first_loss_rel_diff": _round(diff),
            "loss_tolerance_rel": tol, "fsdp_overhead": round(sharded["step_ms"] / plain["step_ms"] - 1, 4),
            "precision": run.pick(f"{NO_CUDA} (fp32 and gloo on the CPU)", "bf16 (param_dtype / dtype auto on CUDA: "
                                  "bf16 FSDP2 parameters, bf16 autocast in the plain loop), nccl"),
            "failed_checks": checks,
            "summary": f"FSDP2 x1 {sharded['step_ms']:.1f} ms vs plain {plain['step_ms']:.1f} ms per step, losses "
                       f"finite {plain['all_finite'] and sharded['all_finite']}, first loss diff {diff:.1e}",
            "md": "\n".join(["| run | step ms | tokens/s | losses |", "|---|---:|---:|---|"]
                            + [f"| {n} | {r['step_ms']} | {r['tokens_per_s']} | {r['losses']} |" for n, r in res.items()])}


def section_shape(run: Run) -> dict:
    """Decoding cost at a real width: bench/cost.py's curve and end-to-end tokens/s on random weights."""
    import cost as cost_bench
    import torch

    from blockdiff.decode.config import DEFAULT_DRAFT_LEN, DecodeConfig
    from blockdiff.decode.engine import ar_generate, generate

    dev = run.device
    model = random_model(run, dtype=run.pick(torch.float32, torch.bfloat16)).eval()
    d = DEFAULT_DRAFT_LEN
    ks = sorted(set(run.pick([1, 4], [1, 2, 4, 8, 16, 32])) | {cost_bench.spec_tokens(d)})
    prefix, warmup, repeats = run.pick((16, 1, 2), (256, 2, 7))
    curves, fits = {}, {}
    for b in run.pick((1, 2), (1, 16)):
        ms = cost_bench.measure(model, b, ks, prefix, warmup, repeats, dev)
        c, beta = cost_bench.fit(ms)
        curves[b] = {"ms": {k: round(v, 3) for k, v in ms.items()},
                     "ratio": {k: round(ms[k] / ms[1], 3) for k in ks}, "fit_c_ms": round(c, 3),
                     "fit_beta": round(beta, 4), f"spec_break_even_d{d}": round(ms[cost_bench.spec_tokens(d)] / ms[1], 3)}
    # end to end at batch 1 (eos ignored: every decoder generates the same count)
    info, n_new = model.cfg.diffusion, run.pick(8, 64)
    prompt = torch.randint(0, info.mask_token_id, (prefix,), generator=torch.Generator().manual_seed(1)).tolist()
    e2e = {}
    with torch.no_grad():
        for name in ("ar", "S", "spec"):
            def once():
                if name == "ar":
                    return ar_generate(model, prompt, max_new_tokens=n_new, eos_ids=())
                cfg = DecodeConfig(mode=name, block_size=info.block_size, steps=info.block_size,
                                   max_new_tokens=n_new, ignore_eos=True)
                return generate(model, [prompt], cfg, mask_id=info.mask_token_id, eos_ids=())[0]
            once()  # warm-up
            run.sync()
            t0 = time.perf_counter()
            g = once()
            run.sync()
            secs = time.perf_counter() - t0
            e2e[name] = {"tokens": g.n_generated, "tps": round(g.n_generated / secs, 1), "tpf": round(g.tpf, 3)}
    for r in e2e.values():
        r["vs_ar"] = round(r["tps"] / e2e["ar"]["tps"], 3)
    lines = ["| batch | " + " | ".join(f"k={k}" for k in ks) + " | fit c ms | beta |",
             "|---:|" + "---:|" * (len(ks) + 2)]
    lines += [f"| {b} (ms) | " + " | ".join(f"{c['ms'][k]:.2f}" for k in ks) + f" | {c['fit_c_ms']} | {c['fit_beta']} |"
              for b, c in curves.items()]
    lines += [f"| {b} (x k=1) | " + " | ".join(f"{c['ratio'][k]:.2f}" for k in ks) + " | | |" for b, c in curves.items()]
    lines += ["", "| decoder (batch 1, random weights) | tokens/s | TPF | vs AR |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r['tps']} | {r['tpf']} | {r['vs_ar']}x |" for n, r in e2e.items()]
    shape = run.pick("Qwen2 miniature (QWEN_DRY)", "Qwen2.5-0.5B shape")
    bs = list(curves)
    return {"model": f"random {shape}, {model.cfg.num_parameters() / 1e6:.2f}M params, "
                     f"{run.pick('float32', 'bfloat16')}", "prefix": prefix, "cost": curves, "e2e_batch1": e2e,
            "summary": f"cost(k={ks[-1]})/cost(1): " + ", ".join(f"batch {b} {curves[b]['ratio'][ks[-1]]:.2f}" for b in bs)
                       + f"; spec break-even (d={d}) " + ", ".join(f"{curves[b][f'spec_break_even_d{d}']:.2f}" for b in bs)
                       + f"; AR {e2e['ar']['tps']:.0f} tokens/s",
            "md": "\n".join(lines)}


RUNNERS = {"tests": section_tests, "attention": section_attention, "decode": section_decode, "moe": section_moe,
           "fsdp": section_fsdp, "shape": section_shape}
assert tuple(RUNNERS) == SECTIONS


# ------------------------------------------------------------------------------------------------- harness
def child(name: str, dry: bool, tmp: Path, result: Path) -> None:
    """Run one section in this process and write its record to `result` (an exception becomes its error)."""
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        rec = RUNNERS[name](Run(dry, tmp))
        checks = rec.pop("failed_checks", [])
        rec = {"status": "failed" if checks else "ok", **({"failed_checks": checks} if checks else {}), **rec}
    except BaseException as e:  # SystemExit too (bench/moe.py and bench/scale.py exit on a failed check)
        if isinstance(e, KeyboardInterrupt):
            raise
        rec = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
               "traceback": traceback.format_exc()[-4000:]}
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    result.write_text(json.dumps(_finite(rec)))


def _finite(x):
    """JSON without NaN / inf (written as strings, so a diverged loss is still visible and the file still parses)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def run_section(name: str, dry: bool, tmp: Path, timeout: float) -> dict:
    """One section in a child process of its own session (killed with everything it started on timeout)."""
    result = tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result", str(result),
           "--tmp", str(tmp / name)] + (["--dry"] if dry else [])
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        return {"status": "error", "error": f"stopped after {timeout:.0f} s (--budget-s)",
                "log_tail": log[-2000:], "seconds": round(time.perf_counter() - t0, 1)}
    if not result.is_file():
        return {"status": "error", "error": f"the section's process exited {p.returncode} without a result",
                "log_tail": log[-3000:], "seconds": round(time.perf_counter() - t0, 1)}
    return json.loads(result.read_text())


def markdown(meta: dict, sections: dict[str, dict], details: dict[str, str]) -> str:
    lines = [f"# GPU check {meta['date']} on {meta['device']}", "",
             f"torch {meta['torch']} (CUDA {meta['cuda']}), git {meta['git']}, {'dry run (CPU, smallest sizes)' if meta['dry'] else 'CUDA'}"
             f", {meta['seconds']:.0f} s of --budget-s {meta['budget_s']}", "",
             "| section | status | seconds | result |", "|---|---|---:|---|"]
    for name, s in sections.items():
        text = s.get("summary") or s.get("reason") or s.get("error", "")
        if s.get("failed_checks"):
            text += "; FAILED: " + "; ".join(s["failed_checks"])
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {text.replace('|', '/')} |")
    for name, md in details.items():
        lines += ["", f"## {name}", "", md]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, smallest sizes (the default without CUDA)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for gpu-<date>.{md,json}")
    ap.add_argument("--budget-s", type=float, default=420, help="total seconds; later sections are skipped")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        child(args.section, args.dry, Path(args.tmp), Path(args.result))
        return
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")

    import torch

    dry = args.dry or not torch.cuda.is_available()
    t_start = time.perf_counter()
    sections: dict[str, dict] = {}
    details: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="blockdiff-gpu-") as tmp:
        for name in SECTIONS:
            spent = time.perf_counter() - t_start
            if name not in chosen:
                sections[name] = {"status": "skipped", "reason": "not selected (--sections)"}
            elif spent >= args.budget_s:
                sections[name] = {"status": "skipped",
                                  "reason": f"budget: {spent:.0f} s of --budget-s {args.budget_s:.0f} spent before it"}
            else:
                print(f"[gpu] {name} ...", file=sys.stderr, flush=True)
                sections[name] = run_section(name, dry, Path(tmp), args.budget_s - spent + GRACE_S)
            s = sections[name]
            if "md" in s:
                details[name] = s.pop("md")
            print(f"[gpu] {name}: {s['status']} ({s.get('seconds', 0)} s) "
                  f"{s.get('summary') or s.get('reason') or s.get('error', '')}", file=sys.stderr, flush=True)
    date = dt.date.today().isoformat()
    meta = {"bench": "gpu", "date": date, "dry": dry, "device": cpu_name() if dry else torch.cuda.get_device_name(0),
            "cpu": cpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "budget_s": args.budget_s, "seconds": round(time.perf_counter() - t_start, 1),
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip()}
    summary = meta | {"sections": sections}
    write_results(args.out, f"gpu-dry-{date}" if dry else f"gpu-{date}", markdown(meta, sections, details), summary)


if __name__ == "__main__":
    main()
