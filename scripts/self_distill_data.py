"""Self-distillation corpus for spec decoding (issue 18 part 4): a checkpoint's OWN greedy continuations of
train-split prompts, written as jsonl documents (`text` = prompt + continuation) that a `kind = "diffusion"`
recipe reads (recipes/tiny_spec_distill.toml). The loader appends EOS to every document.

    python scripts/self_distill_data.py --model assets/tiny-bd --out runs/spec-distill-data \
        [--tasks 6000] [--code 600] [--code-prompt 64] [--code-new 96] [--seed 0] [--threads 1]

Why own continuations: a spec draft is accepted only when it equals the causal stream's greedy token after the
committed prefix, so the draft block's ideal target is the model's own greedy text, not the ground truth (where
the model is wrong or where code has many plausible continuations, the ground truth teaches drafts the verifier
rejects). Generating with mode "spec" is lossless (token for token the AR greedy output, tested in
tests/test_spec.py) and batched, so it is the fast way to get the AR greedy text.

Prompts come from the TRAIN split only: `generate_examples("train", tasks, seed=seed)` continued until EOS (at most
32 tokens), and the first `--code-prompt` tokens of `stdlib_documents("train", ...)` chunks continued for
`--code-new` tokens, stopping at EOS (a code document is kept only if its prompt has that many tokens). Both the
held-out task prompts and held-out stdlib files stay unseen. Deterministic in (--model, --seed, sizes).
train.jsonl holds everything but the last `--valid` task and code documents, which go to valid.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from blockdiff.data.corpus import stdlib_documents
from blockdiff.data.tasks import generate_examples
from blockdiff.load import load_checkpoint


def continue_greedy(loaded, prompts: list[list[int]], max_new: int, batch: int) -> tuple[list[list[int]], dict]:
    """Greedy continuations (EOS trimmed) with mode spec, `batch` prompts per call; also the spec counters."""
    cfg = loaded.decode_config(mode="spec", max_new_tokens=max_new)
    out, n, fw, dr, ac = [], 0, 0, 0, 0
    for i in range(0, len(prompts), batch):
        for g in loaded.generate(prompts[i:i + batch], cfg):
            out.append(g.tokens)
            n, fw, dr, ac = n + g.n_generated, fw + g.forwards, dr + g.drafted, ac + g.accepted
    return out, {"tokens": n, "forwards": fw, "tpf": n / max(fw, 1), "acceptance": ac / max(dr, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/tiny-bd", help="shifted, causal-clean checkpoint to distill from")
    ap.add_argument("--out", required=True, help="output folder (train.jsonl, valid.jsonl, meta.json)")
    ap.add_argument("--tasks", type=int, default=6000, help="train-split task prompts (count)")
    ap.add_argument("--code", type=int, default=600, help="train-split stdlib prompts (count)")
    ap.add_argument("--code-prompt", type=int, default=64, help="tokens of each code prompt")
    ap.add_argument("--code-new", type=int, default=96, help="tokens generated per code prompt (at most)")
    ap.add_argument("--valid", type=int, default=100, help="task and code documents each held back for valid.jsonl")
    ap.add_argument("--batch", type=int, default=64, help="prompts per spec batch")
    ap.add_argument("--seed", type=int, default=0, help="prompt sampling and shuffling seed")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    loaded = load_checkpoint(a.model)
    tok = loaded.tokenizer
    t0 = time.perf_counter()

    examples = generate_examples("train", a.tasks, seed=a.seed)
    task_prompts = [tok.encode(ex.prompt) for ex in examples]
    task_out, task_stats = continue_greedy(loaded, task_prompts, 32, a.batch)
    task_docs = [ex.prompt + tok.decode(c) for ex, c in zip(examples, task_out)]
    print(f"tasks: {len(task_docs)} docs, spec {task_stats}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    code_prompts = []
    if a.code:
        for d in stdlib_documents("train", 20_000_000, seed=a.seed):
            ids = tok.encode(d)
            if len(ids) >= a.code_prompt:
                code_prompts.append(ids[:a.code_prompt])
                if len(code_prompts) == a.code:
                    break
    code_out, code_stats = continue_greedy(loaded, code_prompts, a.code_new, a.batch)
    code_docs = [tok.decode(p + c) for p, c in zip(code_prompts, code_out)]
    print(f"code: {len(code_docs)} docs, spec {code_stats}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    nv = a.valid
    valid = task_docs[len(task_docs) - nv:] + code_docs[len(code_docs) - nv:]
    train = task_docs[:len(task_docs) - nv] + code_docs[:len(code_docs) - nv]
    random.Random(a.seed).shuffle(train)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", train), ("valid", valid)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs if t.strip()))
    meta = {"model": str(Path(a.model).resolve()), "args": vars(a), "train_docs": len(train), "valid_docs": len(valid),
            "task_spec": task_stats, "code_spec": code_stats, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
