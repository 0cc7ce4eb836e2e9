"""Decoding speed and quality of every decoder in one run: our engine (LLaDA2.1 S and Q modes, LLaDA2.0 threshold
0.95, lossless self-speculation "spec"), the converted checkpoint decoded as an AR model through our engine
("own-ar"), the no-cache reference decoder, and the AR parent decoded by HF transformers `generate` ("ar", KV cache
on: the baseline every ratio is taken against).

    python bench/decode.py [--model MODEL] [--parent assets/tiny-ar] [--tasks 200] [--speed-prompts 8]
                           [--speed-tokens 256] [--draft-len 3] [--threads 1] [--no-save]

Both workloads for every decoder, at batch 1 and batch 8 (b prompts per call):
  tasks  held-out synthetic task prompts with EOS honoured (max 32 new tokens): exact-answer accuracy (fraction in
         [0, 1]) with its 95% Wilson interval, task_tps = generated tokens (up to and including EOS) / wall seconds
         of the decoding calls, task_tpf = generated tokens / forwards, task_vs_ar = task_tps / the parent's.
  code   --speed-tokens generated tokens per prompt, EOS ignored (every decoder produces the same count),
         continuing held-out Python source (64-token prompts from stdlib files never trained on): tps, tpf, vs_ar
         (tps / the parent's tps), vs_reference.
Forwards: the engine's block modes count forwards after the prefill; AR decoders (HF, own-ar) and spec count the
prefill too, because it yields the first token (and spec's first drafts), so AR's TPF is exactly 1.
The reference decoder recomputes the whole prefix every step (the official HF generate of LLaDA2.x has no cache),
runs the S-mode algorithm (so its tokens must equal the engine's: checked, `reference_agreement`) and decodes
the rows of a batch one after the other. own-ar decodes one prompt at a time (`Loaded.generate(ar=True)`).
spec must reproduce own-ar token for token at temperature 0: `agreement_ar` / `code_agreement_ar` are the
fractions of prompts whose output equals own-ar's in this run (own-ar is run whenever spec is); `acceptance` /
`task_acceptance` = accepted drafts / drafted.
Each decoder x batch runs in a fresh subprocess so its peak memory is its own: the child's peak RSS (VmHWM, reset
after loading the model and one warm-up call) minus its RSS then; on CUDA the peak allocated memory.

Goals (issue 3): batch 1, S-mode tokens/s >= 3x the AR parent and >= 10x the reference at 256 generated tokens;
S accuracy within 2 points of Q; Q accuracy within 2 points of the AR parent. spec: agreement 1.0 with own-ar.
Prints a table, writes results/decode-<date>.{md,json} (unless --no-save), ends with one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name, describe, peak_rss_mb, reset_peak_rss, rss_mb

REPO = Path(__file__).resolve().parents[1]
DECODERS = ("ar", "own-ar", "reference", "S", "Q", "threshold", "spec")
WINDOWED = ("S-w4", "Q-w4", "threshold-w4")  # block modes with DecodeConfig.window = 4 (decode/window.py)
LABELS = {"ar": "AR parent, HF generate", "own-ar": "converted as AR (own-ar)", "S-w4": "S, window 4",
          "Q-w4": "Q, window 4", "threshold-w4": "threshold, window 4"}
DEFAULT_MODELS = ("assets/tiny-bd", "runs/tiny-wsd/merged")
TASK_TOKENS = 32  # max new tokens per task prompt


# --------------------------------------------------------------------------------------------------- child
def _batches(items, b):
    return [items[i:i + b] for i in range(0, len(items), b)]


def _hf_runner(parent: str, tok, device):
    import torch
    from transformers import AutoModelForCausalLM

    from blockdiff.decode.config import Generation

    hf = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).to(device).eval()
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    eos = set(tok.eos_ids)

    @torch.no_grad()
    def run(prompts: list[list[int]], max_new: int, ignore_eos: bool) -> list[Generation]:
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
            cut = None if ignore_eos else next((i for i, t in enumerate(row) if t in eos), None)
            n_gen = len(row) if cut is None else cut + 1
            res.append(Generation(row if cut is None else row[:cut], n_gen, n_gen, 0.0, cut is not None))
        return res  # one forward per generated token (the prefill yields the first), as ar_generate counts

    return run


def _runner(name: str, loaded, args, device):
    """run(prompts, max_new, ignore_eos) -> list[Generation] for one decoder."""
    from blockdiff.decode.engine import DecodeConfig, ar_generate, generate
    from blockdiff.decode.reference import reference_generate

    tok = loaded.tokenizer
    if name == "ar":
        return _hf_runner(args.parent, tok, device)
    model, info = loaded.model, loaded.info
    if info is None:
        raise SystemExit(f"{args.model} is not a block-diffusion model (no blockdiff section in config.json)")
    if name == "own-ar":
        def run(prompts, max_new, ignore_eos):
            if ignore_eos:  # Loaded.generate(ar=True) is ar_generate per prompt; it has no ignore_eos flag
                return [ar_generate(model, p, max_new_tokens=max_new, eos_ids=()) for p in prompts]
            return loaded.generate(prompts, ar=True, max_new_tokens=max_new)
        return run
    mode, _, w = ("S" if name == "reference" else name).partition("-w")

    def run(prompts, max_new, ignore_eos):
        cfg = DecodeConfig(mode=mode, block_size=info.block_size, steps=info.block_size, max_new_tokens=max_new,
                           ignore_eos=ignore_eos, draft_len=args.draft_len, window=int(w or 0))
        if name == "reference":
            return [reference_generate(model, p, cfg, mask_id=info.mask_token_id, eos_ids=tok.eos_ids)
                    for p in prompts]
        return generate(model, prompts, cfg, mask_id=info.mask_token_id, eos_ids=tok.eos_ids)
    return run


def child(args) -> dict:
    import torch

    from blockdiff.data.corpus import stdlib_documents
    from blockdiff.data.tasks import generate_examples
    from blockdiff.eval.task_accuracy import score
    from blockdiff.load import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name, b = args.child, args.batch
    loaded = load_checkpoint(args.parent if name == "ar" else args.model, device=device)
    tok = loaded.tokenizer
    examples = generate_examples("heldout", args.tasks, seed=1)
    task_prompts = [tok.encode(ex.prompt) for ex in examples]
    code = [d for d in stdlib_documents("heldout", 400_000) if len(tok.encode(d)) >= 64]
    speed_prompts = [tok.encode(d)[:64] for d in code[:args.speed_prompts]]
    if len(speed_prompts) < args.speed_prompts:
        raise SystemExit(f"only {len(speed_prompts)} held-out source documents of >= 64 tokens")
    run = _runner(name, loaded, args, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(prompts, max_new, ignore_eos):
        gens, secs = [], 0.0
        for chunk in _batches(prompts, b):
            t0 = time.perf_counter()
            gens += run(chunk, max_new, ignore_eos)
            sync()
            secs += time.perf_counter() - t0
        return gens, secs

    run(task_prompts[:b], 8, False)  # warm-up
    sync()
    base = rss_mb()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    task_gens, task_secs = timed(task_prompts, TASK_TOKENS, False)
    code_gens, code_secs = timed(speed_prompts, args.speed_tokens, True)
    peak = (torch.cuda.max_memory_allocated() - base_cuda) / 1024**2 if device.type == "cuda" else peak_rss_mb() - base
    q = score(examples, [tok.decode(g.tokens) for g in task_gens], task_gens, task_secs)
    c_tok, c_fwd = sum(g.n_generated for g in code_gens), sum(g.forwards for g in code_gens)

    def acceptance(gens):
        drafted = sum(g.drafted for g in gens)
        return sum(g.accepted for g in gens) / drafted if drafted else None

    return {"decoder": name, "batch": b, "accuracy": q["accuracy"], "accuracy_ci": q["ci95"],
            "task_tps": q["tps"], "task_tpf": q["tpf"], "task_tokens": q["generated_tokens"],
            "task_acceptance": acceptance(task_gens), "tps": c_tok / code_secs, "tpf": c_tok / max(c_fwd, 1),
            "speed_tokens": c_tok, "acceptance": acceptance(code_gens), "peak_mb": max(peak, 0.0),
            "outputs": [g.tokens for g in task_gens], "code_outputs": [g.tokens for g in code_gens]}


# --------------------------------------------------------------------------------------------------- parent
def resolve_model(arg: str | None) -> str:
    if arg:
        return arg
    for cand in DEFAULT_MODELS:
        if (REPO / cand / "config.json").is_file():
            return str(REPO / cand)
    raise SystemExit(f"no converted model found ({', '.join(DEFAULT_MODELS)}); run `make demo` or pass --model")


def agreement(a: list, b: list) -> float:
    """Fraction of prompts whose outputs are equal."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


def summarize(res: dict[str, dict]) -> dict:
    """One batch size's JSON: per decoder both workloads, ratios to the parent ("ar") and the reference."""
    ar, ref = res.get("ar"), res.get("reference")
    s: dict = {}
    for d, r in res.items():
        x = {"accuracy": r["accuracy"], "accuracy_ci": r["accuracy_ci"], "task_tps": round(r["task_tps"], 1),
             "task_tpf": round(r["task_tpf"], 3), "tps": round(r["tps"], 1), "tpf": round(r["tpf"], 3),
             "peak_mb": round(r["peak_mb"], 1)}
        if ar:
            x.update(task_vs_ar=round(r["task_tps"] / ar["task_tps"], 3), vs_ar=round(r["tps"] / ar["tps"], 3))
        if ref:
            x["vs_reference"] = round(r["tps"] / ref["tps"], 3)
        if d == "spec":
            x.update(acceptance=r["acceptance"] and round(r["acceptance"], 4),
                     task_acceptance=r["task_acceptance"] and round(r["task_acceptance"], 4))
            if "own-ar" in res:
                x.update(agreement_ar=agreement(r["outputs"], res["own-ar"]["outputs"]),
                         code_agreement_ar=agreement(r["code_outputs"], res["own-ar"]["code_outputs"]))
        s[d] = x
    if ref and "S" in res:
        s["reference_agreement"] = agreement(ref["outputs"], res["S"]["outputs"])
    return s


def table(results: dict[int, dict[str, dict]], summary: dict) -> str:
    rows = ["| batch | decoder | accuracy [95% CI] | task tokens/s | task TPF | task vs AR | code tokens/s | "
            "code TPF | code vs AR | vs reference | acceptance (task / code) | = own AR (task / code) | peak MB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    num = lambda v, fmt=".2f", unit="": "-" if v is None else f"{v:{fmt}}{unit}"  # noqa: E731
    for b, res in results.items():
        for d in res:
            x = summary[f"batch{b}"][d]
            lo, hi = x["accuracy_ci"]
            spec = d == "spec"
            acc = f"{num(x.get('task_acceptance'))} / {num(x.get('acceptance'))}" if spec else ""
            agree = f"{num(x.get('agreement_ar'), '.3f')} / {num(x.get('code_agreement_ar'), '.3f')}" if spec else ""
            rows.append(f"| {b} | {LABELS.get(d, d)} | {x['accuracy']:.3f} [{lo:.2f}, {hi:.2f}] | "
                        f"{x['task_tps']:.1f} | {x['task_tpf']:.2f} | {num(x.get('task_vs_ar'), unit='x')} | "
                        f"{x['tps']:.1f} | {x['tpf']:.2f} | {num(x.get('vs_ar'), unit='x')} | "
                        f"{num(x.get('vs_reference'), unit='x')} | "
                        f"{acc} | {agree} | {x['peak_mb']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    from blockdiff.decode.config import DEFAULT_DRAFT_LEN, MAX_DRAFT_LEN

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"converted model folder (default: first of {DEFAULT_MODELS})")
    ap.add_argument("--parent", default=str(REPO / "assets/tiny-ar"), help="AR parent folder (HF generate baseline)")
    ap.add_argument("--tasks", type=int, default=200, help="held-out task prompts for accuracy (count)")
    ap.add_argument("--speed-prompts", type=int, default=8, help="source prompts for the code workload (count)")
    ap.add_argument("--speed-tokens", type=int, default=256, help="generated tokens per code prompt")
    ap.add_argument("--draft-len", type=int, default=DEFAULT_DRAFT_LEN,
                    help=f"spec: tokens drafted per forward, 0..{MAX_DRAFT_LEN} (default: DecodeConfig's)")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--decoders", default=",".join(DECODERS + WINDOWED),
                    help="subset of " + ",".join(DECODERS + WINDOWED))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for decode-<date>.{md,json}")
    ap.add_argument("--no-save", action="store_true", help="print only, write no result files")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = resolve_model(args.model)
    if args.child:
        print(json.dumps(child(args)))
        return
    if not 0 <= args.draft_len <= MAX_DRAFT_LEN:
        ap.error(f"--draft-len must be in [0, {MAX_DRAFT_LEN}], got {args.draft_len}")
    decoders = [d for d in args.decoders.split(",") if d]
    unknown = [d for d in decoders if d not in DECODERS + WINDOWED]
    if unknown:
        ap.error(f"--decoders: unknown {', '.join(unknown)}; allowed: {', '.join(DECODERS + WINDOWED)}")
    if "spec" in decoders and "own-ar" not in decoders:  # spec's agreement is measured against own-ar, same run
        decoders.insert(decoders.index("spec"), "own-ar")
    batches = [int(x) for x in args.batches.split(",")]

    results: dict[int, dict[str, dict]] = {}
    for b in batches:
        for d in decoders:
            cmd = [sys.executable, __file__, "--child", d, "--batch", str(b), "--model", args.model, "--parent",
                   args.parent, "--tasks", str(args.tasks), "--speed-prompts", str(args.speed_prompts),
                   "--speed-tokens", str(args.speed_tokens), "--draft-len", str(args.draft_len),
                   "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"child {d} batch {b} failed")
            r = results.setdefault(b, {})[d] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"[bench] batch {b} {d}: acc {r['accuracy']:.3f}, tasks {r['task_tps']:.1f} tok/s, "
                  f"code {r['tps']:.1f} tok/s, TPF {r['task_tpf']:.2f} / {r['tpf']:.2f}", file=sys.stderr, flush=True)

    import torch

    date = dt.date.today().isoformat()
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else None
    summary: dict = {f"batch{b}": summarize(res) for b, res in results.items()}
    summary["meta"] = {"bench": "decode", "date": date, "cpu": cpu_name(), "gpu": gpu, "device": args.device,
                       "threads": args.threads, "load1": describe(args.threads)["load1"],
                       "model": Path(args.model).name, "parent": Path(args.parent).name, "tasks": args.tasks,
                       "task_max_new_tokens": TASK_TOKENS, "speed_prompts": args.speed_prompts,
                       "speed_tokens": args.speed_tokens, "draft_len": args.draft_len, "torch": torch.__version__,
                       "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                             text=True).stdout.strip()}
    hw = gpu or f"{cpu_name()}, {args.threads} thread(s)"
    head = (f"# decode bench {date} on {hw} ({args.device}, load {summary['meta']['load1']}), model "
            f"{Path(args.model).name}, parent {Path(args.parent).name}\n\n"
            f"tasks: {args.tasks} held-out task prompts, EOS honoured, max {TASK_TOKENS} new tokens; code: "
            f"{args.speed_prompts} held-out source prompts x {args.speed_tokens} generated tokens (EOS ignored); "
            f"spec draft_len {args.draft_len}; ratios against the AR parent (HF generate) of the same run")
    md = table(results, summary)
    print(head + "\n\n" + md)
    if not args.no_save:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"decode-{date}"
        stem.with_suffix(".md").write_text(f"{head}\n\n{md}\n\n```json\n{json.dumps(summary)}\n```\n")
        stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
