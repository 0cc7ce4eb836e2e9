"""Training-step cost of block diffusion against its AR baseline, through the objectives users train with.

    python bench/train.py [--model assets/tiny-ar] [--steps 10] [--warmup 3] [--batch-size 16] [--seq-len 256]

One training step = forward + backward + grad clip + AdamW step, as in `blockdiff.train.loop`, on the same model and
the same packed batch (bundled corpus: synthetic tasks + stdlib source, written to a temp folder and packed with
document ids) for each mode:

  ar    `ar_loss`: next-token CE, causal + document mask, L tokens per row (the baseline);
  bd    `diffusion_loss` with B = --block-size (32): the [x_t ; x0] layout, 2L tokens per row internally;
  mdlm  `diffusion_loss` with B = L: MDLM, clean half dropped, full attention inside each document.

tokens/s counts L tokens per row for every mode (the 2L of the bd layout is the cost being measured). Each mode runs
in a fresh subprocess so that peak memory is its own: on CPU the growth of the process's peak RSS (VmHWM,
`machine.peak_rss_mb`; not ru_maxrss, which Linux carries over from the forking parent) from just before the first
step to after the last (params/grads/AdamW state/activations/allocator caching, not the
imported libraries), on CUDA `torch.cuda.max_memory_allocated` above what was allocated before the first step.
Time is the median over --steps timed steps after --warmup steps. Goals (issue): bd throughput >= 0.45x AR, bd peak
memory <= 2.5x AR. Prints a table, then one JSON line; both saved as bench/results/train-<date>.{md,json}
(`--out`).

Without the model folder (the bundled model not built yet) a random model of the bundled shape (hidden 256, 4 layers,
BPE vocab 1024, tied embeddings) is built in the temp folder: step cost does not depend on the weights.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name, describe, peak_rss_mb, write_results

from blockdiff.data.bundled import write_bundled_corpus
from blockdiff.data.documents import read_documents
from blockdiff.data.packing import BatchStream, pack, tokenize_documents
from blockdiff.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer
from blockdiff.model.config import ModelConfig
from blockdiff.load import load_checkpoint
from blockdiff.model.hf_io import save_pretrained
from blockdiff.model.transformer import Transformer, resize_vocab
from blockdiff.objectives.diffusion import DiffusionLossConfig, ar_loss, diffusion_loss

REPO = Path(__file__).resolve().parents[1]
MODES = ("ar", "bd", "mdlm")


def random_model_dir(folder: Path, corpus_texts: list[str]) -> Path:
    """A random model shaped like the bundled one (scripts/make_base_model.py defaults), saved as an HF folder."""
    tok = train_bpe_tokenizer(corpus_texts, 1024, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, folder, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tk = load_tokenizer(folder)
    cfg = ModelConfig(family="llama", vocab_size=tk.vocab_size, hidden_size=256, intermediate_size=688, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    save_pretrained(model, folder, tokenizer=tk)
    return folder


def prepare(args, work: Path) -> tuple[Path, Path, str]:
    """Write the corpus, pick or build the model, pack one batch; returns (model dir, batch file, model label)."""
    corpus = write_bundled_corpus(work / "data", train_examples=3000, train_code_chars=300_000,
                                  valid_examples=1, valid_code_chars=2000, seed=0)
    docs = read_documents([corpus.train])
    model_dir = Path(args.model)
    label = str(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"[bench] {model_dir} not found: using a random model of the bundled shape", file=sys.stderr)
        model_dir = random_model_dir(work / "model", [d.text for d in docs])
        label = "random-init(hidden256,4L,vocab1024)"
    tok = load_tokenizer(model_dir)
    data = pack(tokenize_documents(docs, tok), args.seq_len, pad_id=tok.pad_id)
    if len(data) < args.batch_size:
        print(f"[bench] only {len(data)} packed rows for batch {args.batch_size}: rows repeat", file=sys.stderr)
    batch = BatchStream(data, args.batch_size, seed=0).next_batch()
    torch.save(batch, work / "batch.pt")
    return model_dir, work / "batch.pt", label


def run_mode(args) -> dict:
    """Child process: time and measure one mode; prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = load_checkpoint(args.model, device=device, train=True).model
    if model.cfg.diffusion is not None:
        mask_id = model.cfg.diffusion.mask_token_id
    else:  # an AR checkpoint: add [MASK] as the conversion does (train.loop.prepare_model), for every mode alike
        mask_id = model.cfg.vocab_size
        resize_vocab(model, mask_id + 1)
    model.train()
    batch = {k: v.to(device) for k, v in torch.load(args.batch, weights_only=True).items()}
    b, L = batch["input_ids"].shape
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    gen = torch.Generator().manual_seed(0)
    mode = args.child
    if mode == "ar":
        def objective():
            return ar_loss(model, batch)
    else:
        cfg = DiffusionLossConfig(mask_token_id=mask_id, block_size=args.block_size if mode == "bd" else L)

        def objective():
            return diffusion_loss(model, batch, cfg, generator=gen)

    def step() -> float:
        loss, _ = objective()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = peak_rss_mb()
    for _ in range(args.warmup):
        step()
    times, losses = [], []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 1024**2
    else:
        peak = peak_rss_mb() - rss0
    sec = statistics.median(times)
    return {"mode": mode, "step_ms": sec * 1e3, "tokens_per_s": b * L / sec, "peak_mb": peak,
            "peak_rss_mb": peak_rss_mb(), "loss": statistics.mean(losses), "threads": torch.get_num_threads(),
            "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "assets" / "tiny-ar"),
                    help="HF model folder (default: assets/tiny-ar)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode (default: 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per step (default: 16)")
    ap.add_argument("--seq-len", type=int, default=256, help="L, tokens per row (default: 256)")
    ap.add_argument("--block-size", type=int, default=32, help="B of the bd mode (default: 32)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    ap.add_argument("--out", default="bench/results", help="folder for train-<date>.{md,json} (default: bench/results)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--batch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args)))
        return
    modes = [m for m in args.modes.split(",") if m]
    if "ar" not in modes or any(m not in MODES for m in modes):
        ap.error(f"--modes must include ar (the baseline) and only use {MODES}")

    with tempfile.TemporaryDirectory(prefix="blockdiff-bench-") as tmp:
        model_dir, batch_file, label = prepare(args, Path(tmp))
        rows = {}
        for m in modes:
            cmd = [sys.executable, __file__, "--child", m, "--model", str(model_dir), "--batch", str(batch_file),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--block-size", str(args.block_size),
                   "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows[m] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"[bench] {m}: {rows[m]['step_ms']:.0f} ms/step", file=sys.stderr)

    ar = rows["ar"]
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"{cpu_name()} ({os.cpu_count()} logical CPUs)"
    mem_kind = "cuda max_memory_allocated" if cuda else "peak RSS growth"
    lines = [f"model {label} | {args.batch_size} x {args.seq_len} tokens | B={args.block_size} | {device}, "
             f"{ar['threads']} threads | median of {args.steps} steps after {args.warmup} warm-up", "",
             f"| mode | tokens/s | step ms | peak MB ({mem_kind}) | throughput vs AR | memory vs AR | loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"ar": "AR (causal+doc)", "bd": f"BD B={args.block_size} (x_t+x0, 2L)", "mdlm": "MDLM (B=L, x_t only)"}
    for m, r in rows.items():
        lines.append(f"| {names[m]} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | {r['peak_mb']:.1f} | "
                     f"{r['tokens_per_s'] / ar['tokens_per_s']:.2f}x | {r['peak_mb'] / max(ar['peak_mb'], 1e-9):.2f}x | "
                     f"{r['loss']:.3f} |")
    result = {
        "bench": "train_step", "model": label, "device": device, "torch": torch.__version__,
        "date": dt.date.today().isoformat(), "batch": args.batch_size, "seq_len": args.seq_len,
        "block_size": args.block_size, "threads": ar["threads"], "load1": describe()["load1"], "steps": args.steps,
        "warmup": args.warmup,
        "memory_metric": mem_kind,
        "ar_tokens_per_s": round(ar["tokens_per_s"], 1), "ar_step_ms": round(ar["step_ms"], 2),
        "ar_peak_mb": round(ar["peak_mb"], 1), "ar_loss": round(ar["loss"], 4),
    }
    for m in (x for x in modes if x != "ar"):
        r = rows[m]
        result.update({
            f"{m}_tokens_per_s": round(r["tokens_per_s"], 1), f"{m}_step_ms": round(r["step_ms"], 2),
            f"{m}_peak_mb": round(r["peak_mb"], 1), f"{m}_loss": round(r["loss"], 4),
            f"{m}_vs_ar_throughput": round(r["tokens_per_s"] / ar["tokens_per_s"], 3),
            f"{m}_vs_ar_memory": round(r["peak_mb"] / max(ar["peak_mb"], 1e-9), 3),
        })
    if "bd" in rows:
        result["goals_met"] = {"bd_throughput_ge_0.45x": result["bd_vs_ar_throughput"] >= 0.45,
                               "bd_memory_le_2.5x": result["bd_vs_ar_memory"] <= 2.5}
    write_results(REPO / args.out, f"train-{result['date']}", "\n".join(lines) + "\n", result)


if __name__ == "__main__":
    main()
