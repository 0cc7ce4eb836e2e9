"""Self-distillation corpus for converting a chat model (issue 22 part 3): the parent's OWN greedy answers to
train-split prompts (`blockdiff.data.real_prompts.corpus_prompts`), each rendered with the parent's chat template
as one jsonl document (`text` = the prompt with the generation header + the answer; also the two parts as `prompt`
and `answer`, which `blockdiff eval --ppl` reads). A `kind = "diffusion"` recipe
reads it (recipes/smollm2_wsd.toml); the loader appends EOS (for SmolLM2 `<|im_end|>`, the end of the turn) and
`eos_pad_multiple` pads with it, so the converted model learns to end its answer and fill the block with EOS.

    python scripts/chat_distill_data.py --model runs/smollm2-135m --out runs/smollm2-data \
        [--prompts 1200] [--valid 64] [--max-new 160] [--batch 32] [--threads 2]

Why the parent's own text: conversion should change how the model decodes, not what it knows or how it talks;
training on its own greedy answers keeps its distribution (DFlash and dParallel train on target-generated text for
the same reason), needs no download and is deterministic. Answers cut by --max-new (no end of turn) are dropped and
counted, so every document ends where the parent ended it.

Generation: HF transformers' batched greedy `generate` (left padding) on the parent folder; the `hf` extra.
Held-out prompts (the "dev" and "final" splits of real_prompts) are never used here. meta.json records the
counts, token totals, timing and the parent folder's weights hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/smollm2-135m", help="the AR chat parent (HF folder)")
    ap.add_argument("--out", required=True, help="output folder (train.jsonl, valid.jsonl, meta.json)")
    ap.add_argument("--prompts", type=int, default=1200, help="train-split prompts to answer (count)")
    ap.add_argument("--prompts-file", default=None,
                    help="your own prompts instead, one per line (the first --prompts of them)")
    ap.add_argument("--raw", action="store_true",
                    help="continue each prompt as plain text, without the chat template (a base model's corpus)")
    ap.add_argument("--valid", type=int, default=64, help="of those, documents held back for valid.jsonl")
    ap.add_argument("--max-new", type=int, default=160, help="answer budget in tokens (longer answers are dropped)")
    ap.add_argument("--batch", type=int, default=32, help="prompts per generate call")
    ap.add_argument("--seed", type=int, default=0, help="prompt order")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = ap.parse_args()
    for name in ("prompts", "max_new", "batch", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= a.valid < a.prompts:
        ap.error("--valid must be in [0, --prompts)")
    folder = Path(a.model)
    if not (folder / "config.json").is_file():
        ap.error(f"--model {folder}: not an HF model folder (no config.json); run `make smollm2` first")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blockdiff.atomic import write_json, write_text
    from blockdiff.data.real_prompts import corpus_prompts

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if a.prompts_file:
        pf = Path(a.prompts_file)
        if not pf.is_file():
            ap.error(f"--prompts-file {pf} does not exist")
        prompts = [x for x in pf.read_text().splitlines() if x.strip()][:a.prompts]
        if len(prompts) <= a.valid:
            ap.error(f"--prompts-file {pf}: {len(prompts)} prompts, need more than --valid {a.valid}")
    else:
        prompts = corpus_prompts(a.prompts, seed=a.seed)
    if not a.raw and not tok.chat_template:
        ap.error(f"--model {folder}: the tokenizer has no chat template; pass --raw to continue plain text")
    headers = prompts if a.raw else [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts]
    docs, dropped, n_tokens = [], 0, 0
    t0 = time.perf_counter()
    for i in range(0, len(headers), a.batch):
        chunk = headers[i:i + a.batch]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=a.max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        for head, row in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist()):
            if tok.eos_token_id not in row:
                dropped += 1
                continue
            ans = row[:row.index(tok.eos_token_id)]
            n_tokens += len(ans)
            answer = tok.decode(ans)
            docs.append({"text": head + answer, "prompt": head, "answer": answer})
        done = min(i + a.batch, len(headers))
        el = time.perf_counter() - t0
        print(f"{done}/{len(headers)} prompts, {n_tokens} answer tokens, {dropped} cut, {el:.0f} s "
              f"({n_tokens / el:.0f} tokens/s)", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    valid, train = docs[:a.valid], docs[a.valid:]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "train.jsonl", "".join(json.dumps(d) + "\n" for d in train))
    write_text(out_dir / "valid.jsonl", "".join(json.dumps(d) + "\n" for d in valid))
    weights = sorted(folder.glob("*.safetensors"))
    meta = {"model": str(folder), "weights_sha256": {w.name: hashlib.sha256(w.read_bytes()).hexdigest()
                                                      for w in weights},
            "prompts": len(prompts), "prompts_file": a.prompts_file, "raw": a.raw, "seed": a.seed, "max_new": a.max_new, "batch": a.batch, "threads": a.threads,
            "train_docs": len(train), "valid_docs": len(valid), "cut": dropped, "answer_tokens": n_tokens,
            "seconds": round(seconds, 1), "torch": torch.__version__}
    write_json(out_dir / "meta.json", meta)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
