"""Decoding speed and quality: our engine (LLaDA2.1 S and Q modes, LLaDA2.0 threshold 0.95) against the no-cache
reference decoder and the AR parent decoded by HF transformers `generate` (KV cache on), in one run.

    python bench/decode.py [--model MODEL] [--parent assets/tiny-ar] [--tasks 100] [--speed-prompts 8]
                           [--speed-tokens 256] [--threads 1]

Two measurements per decoder, at batch 1 and batch 8:
  quality  held-out synthetic task prompts (exact-answer accuracy, fraction in [0, 1]); generation stops at EOS
           (max 32 new tokens); TPF = generated tokens (up to and including EOS) / forwards after prefill.
  speed    --speed-tokens generated tokens per prompt (EOS ignored, so every decoder produces the same number)
           continuing held-out Python source (64-token prompts from stdlib files never trained on); tokens/s =
           generated tokens / wall seconds of the whole call (prefill included), batch b = b prompts per call.
The reference decoder recomputes the whole prefix every step (the official HF generate of LLaDA2.x has no cache),
runs the S-mode algorithm (so its tokens must equal the engine's: checked, `reference_agreement`) and decodes
the rows of a batch one after the other. Each decoder x batch runs in a fresh subprocess so its peak memory is
its own: growth of the process's peak RSS over the RSS after loading the model and one warm-up call.

Goals (issue 3): batch 1, S-mode tokens/s >= 3x the AR parent and >= 10x the reference at 256 generated tokens;
S accuracy within 2 points of Q; Q accuracy within 2 points of the AR parent. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name, describe, peak_rss_mb, rss_mb

REPO = Path(__file__).resolve().parents[1]
DECODERS = ("ar", "reference", "S", "Q", "threshold")
DEFAULT_MODELS = ("assets/tiny-bd", "runs/tiny-wsd/merged")


# --------------------------------------------------------------------------------------------------- child
def _batches(items, b):
    return [items[i:i + b] for i in range(0, len(items), b)]


def _hf_runner(parent: str, tok, device):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).to(device).eval()
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id

    @torch.no_grad()
    def run(prompts: list[list[int]], max_new: int, ignore_eos: bool):
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), pad, dtype=torch.long)
        att = torch.zeros((len(prompts), n), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding, as HF generate expects for decoder-only models
            ids[i, n - len(p):] = torch.tensor(p)
            att[i, n - len(p):] = 1
        kw = dict(max_new_tokens=max_new, do_sample=False, use_cache=True, pad_token_id=pad,
                  eos_token_id=tok.eos_ids)
        if ignore_eos:
            kw.update(min_new_tokens=max_new)
        out = hf.generate(input_ids=ids.to(device), attention_mask=att.to(device), **kw)[:, n:].tolist()
        res = []
        for row in out:
            cut = next((i for i, t in enumerate(row) if t in set(tok.eos_ids)), None) if not ignore_eos else None
            res.append((row[:cut] if cut is not None else row, (cut + 1) if cut is not None else len(row),
                        (cut + 1) if cut is not None else len(row)))
        return res  # (tokens, n_generated, forwards)

    return run


def child(args) -> dict:
    import torch

    from blockdiff.data.corpus import stdlib_documents
    from blockdiff.data.tasks import generate_examples, is_correct
    from blockdiff.decode.engine import DecodeConfig, generate
    from blockdiff.decode.reference import reference_generate
    from blockdiff.load import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name, b = args.child, args.batch
    path = args.parent if name == "ar" else args.model
    loaded = load_checkpoint(path, device=device)
    tok = loaded.tokenizer
    examples = generate_examples("heldout", args.tasks, seed=1)
    task_prompts = [tok.encode(ex.prompt) for ex in examples]
    code = [d for d in stdlib_documents("heldout", 400_000) if len(tok.encode(d)) >= 64]
    speed_prompts = [tok.encode(d)[:64] for d in code[:args.speed_prompts]]
    if len(speed_prompts) < args.speed_prompts:
        raise SystemExit(f"only {len(speed_prompts)} held-out source documents of >= 64 tokens")

    if name == "ar":
        hf_run = _hf_runner(path, tok, device)

        def run(prompts, max_new, ignore_eos):
            return hf_run(prompts, max_new, ignore_eos)
    else:
        model, info = loaded.model, loaded.info
        if info is None:
            raise SystemExit(f"{path} is not a block-diffusion model (no blockdiff section in config.json)")
        mode = "S" if name == "reference" else name

        def run(prompts, max_new, ignore_eos):
            cfg = DecodeConfig(mode=mode, block_size=info.block_size, steps=info.block_size, max_new_tokens=max_new,
                               ignore_eos=ignore_eos)
            if name == "reference":
                gens = [reference_generate(model, p, cfg, mask_id=info.mask_token_id, eos_ids=tok.eos_ids)
                        for p in prompts]
            else:
                gens = generate(model, prompts, cfg, mask_id=info.mask_token_id, eos_ids=tok.eos_ids)
            return [(g.tokens, g.n_generated, g.forwards) for g in gens]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(task_prompts[:b], 8, False)  # warm-up
    sync()
    base = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    # quality
    outputs, n_tok, n_fwd, correct, secs = [], 0, 0, 0, 0.0
    for chunk_ex, chunk in zip(_batches(examples, b), _batches(task_prompts, b)):
        t0 = time.perf_counter()
        res = run(chunk, 32, False)
        sync()
        secs += time.perf_counter() - t0
        for ex, (toks, n, f) in zip(chunk_ex, res):
            outputs.append(toks)
            correct += is_correct(ex, tok.decode(toks))
            n_tok += n
            n_fwd += f
    # speed
    s_tok, s_fwd, s_secs = 0, 0, 0.0
    for chunk in _batches(speed_prompts, b):
        t0 = time.perf_counter()
        res = run(chunk, args.speed_tokens, True)
        sync()
        s_secs += time.perf_counter() - t0
        s_tok += sum(n for _, n, _ in res)
        s_fwd += sum(f for _, _, f in res)
    peak = (torch.cuda.max_memory_allocated() - base_cuda) / 1024**2 if device.type == "cuda" else peak_rss_mb() - base
    return {"decoder": name, "batch": b, "accuracy": correct / len(examples), "task_tpf": n_tok / max(n_fwd, 1),
            "task_tps": n_tok / secs, "tps": s_tok / s_secs, "tpf": s_tok / max(s_fwd, 1), "speed_tokens": s_tok,
            "peak_mb": max(peak, 0.0), "outputs": outputs}


# --------------------------------------------------------------------------------------------------- parent
def resolve_model(arg: str | None) -> str:
    if arg:
        return arg
    for cand in DEFAULT_MODELS:
        if (REPO / cand / "config.json").is_file():
            return str(REPO / cand)
    raise SystemExit(f"no converted model found ({', '.join(DEFAULT_MODELS)}); run `make demo` or pass --model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"converted model folder (default: first of {DEFAULT_MODELS})")
    ap.add_argument("--parent", default=str(REPO / "assets/tiny-ar"), help="AR parent folder (HF generate baseline)")
    ap.add_argument("--tasks", type=int, default=100, help="held-out task prompts for accuracy (count)")
    ap.add_argument("--speed-prompts", type=int, default=8, help="source prompts for the speed run (count)")
    ap.add_argument("--speed-tokens", type=int, default=256, help="generated tokens per speed prompt")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--decoders", default=",".join(DECODERS), help="subset of " + ",".join(DECODERS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = resolve_model(args.model)
    if args.child:
        print(json.dumps(child(args)))
        return

    batches = [int(x) for x in args.batches.split(",")]
    decoders = [d for d in args.decoders.split(",") if d]
    results: dict[int, dict[str, dict]] = {}
    for b in batches:
        for d in decoders:
            cmd = [sys.executable, __file__, "--child", d, "--batch", str(b), "--model", args.model, "--parent",
                   args.parent, "--tasks", str(args.tasks), "--speed-prompts", str(args.speed_prompts),
                   "--speed-tokens", str(args.speed_tokens), "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"child {d} batch {b} failed")
            results.setdefault(b, {})[d] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[b][d]
            print(f"[bench] batch {b} {d}: acc {r['accuracy']:.3f}, {r['tps']:.1f} tok/s, TPF {r['tpf']:.2f}",
                  file=sys.stderr, flush=True)

    print(f"# decode bench {dt.date.today()} on {cpu_name()} ({args.device}, threads={args.threads}), "
          f"model {Path(args.model).name}, parent {Path(args.parent).name}")
    print(f"# quality: {args.tasks} held-out task prompts; speed: {args.speed_prompts} prompts x "
          f"{args.speed_tokens} generated tokens (EOS ignored)")
    print("| batch | decoder | accuracy | task TPF | tokens/s (speed) | TPF (speed) | vs AR | vs reference | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, dict] = {}
    for b, res in results.items():
        ar_tps = res.get("ar", {}).get("tps")
        ref_tps = res.get("reference", {}).get("tps")
        for d, r in res.items():
            vs_ar = f"{r['tps'] / ar_tps:.2f}x" if ar_tps else "-"
            vs_ref = f"{r['tps'] / ref_tps:.2f}x" if ref_tps else "-"
            print(f"| {b} | {d} | {r['accuracy']:.3f} | {r['task_tpf']:.2f} | {r['tps']:.1f} | {r['tpf']:.2f} | "
                  f"{vs_ar} | {vs_ref} | {r['peak_mb']:.1f} |")
        s = {}
        if "ar" in res:
            s.update(ar_tps=round(res["ar"]["tps"], 1), ar_accuracy=res["ar"]["accuracy"],
                     ar_peak_mb=round(res["ar"]["peak_mb"], 1))
        if "reference" in res:
            s.update(reference_tps=round(res["reference"]["tps"], 2), reference_accuracy=res["reference"]["accuracy"])
            if "S" in res:
                same = sum(x == y for x, y in zip(res["reference"]["outputs"], res["S"]["outputs"]))
                s["reference_agreement"] = same / len(res["S"]["outputs"])
        for d in ("S", "Q", "threshold"):
            if d in res:
                r = res[d]
                s[d] = {"tps": round(r["tps"], 1), "tpf": round(r["tpf"], 2), "accuracy": r["accuracy"],
                        "task_tpf": round(r["task_tpf"], 2), "peak_mb": round(r["peak_mb"], 1)}
                if ar_tps:
                    s[d]["vs_ar"] = round(r["tps"] / ar_tps, 2)
                if ref_tps:
                    s[d]["vs_reference"] = round(r["tps"] / ref_tps, 2)
        summary[f"batch{b}"] = s
    summary["meta"] = {"date": str(dt.date.today()), "cpu": cpu_name(), "device": args.device, "threads": args.threads,
                       "load1": describe()["load1"],
                       "model": Path(args.model).name, "tasks": args.tasks, "speed_prompts": args.speed_prompts,
                       "speed_tokens": args.speed_tokens}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
