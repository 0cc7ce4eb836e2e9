"""A real pretrained parent converted on this CPU (issue 22): SmolLM2-135M-Instruct against its block-diffusion
conversion (`recipes/smollm2_wsd.toml`), on held-out checkable chat prompts, in one run.

    python bench/smollm2.py [--parent runs/smollm2-135m] [--converted runs/smollm2-bd/final]
        [--splits final[,dev]] [--modes threshold,S,Q,spec] [--speed-prompts 24] [--batch 16] [--threads 2]

Quality, per split of blockdiff/data/real_prompts.py ("final" is the reported number; "dev" the split looked at while
building; neither is in the conversion corpus): every prompt rendered with the checkpoint's chat template, the parent
decoded greedily (AR, KV cache, one prompt at a time), the converted model in each block mode through the batched
engine (--batch prompts per call; at temperature 0 an output does not depend on the batch); accuracy by the
prompt's own rule (contains / number / yes-no format / the code run against asserts) with a 95% Wilson interval,
per family, agreement with the parent's output, TPF. Also the held-out perplexity of the parent's own answers
(the corpus's valid.jsonl, which the conversion never trained on): exact AR for both and the ELBO bound for the
converted model. The same code path as `blockdiff eval --checked SPLIT --ppl FILE`.

Speed: --speed-prompts prompts of the final split (seeded sample), every decoding at batch 1, the parent's greedy AR
in the same run: tokens/s and its ratio to the parent's, TPF, and the accuracy of those same outputs; also the
converted model's own greedy AR ("own AR"), which spec must reproduce token for token (checked: spec_equals_own_ar).

Writes bench/results/smollm2-<date>.{md,json}; the last stdout line is the JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from pathlib import Path

from machine import describe, write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default="runs/smollm2-135m")
    ap.add_argument("--converted", default="runs/smollm2-bd/final")
    ap.add_argument("--splits", default="final", help="held-out splits for accuracy (comma-separated; dev is the split looked at while building)")
    ap.add_argument("--modes", default="threshold,S,Q,spec", help="block modes of the converted model")
    ap.add_argument("--speed-prompts", type=int, default=24, help="prompts decoded at batch 1 for tokens/s (0 = skip)")
    ap.add_argument("--speed-modes", default=None, help="modes timed at batch 1 (default: --modes)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per engine call in the accuracy pass")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--ppl", default="runs/smollm2-data/valid.jsonl", help="held-out parent answers ('' = skip)")
    ap.add_argument("--ppl-docs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()

    import torch

    from blockdiff.data.real_prompts import checked_prompts
    from blockdiff.eval.command import ppl_requests, read_ppl
    from blockdiff.eval.compare import (
        Decoding, DecodeSettings, agreement, chat_hooks, compare, format_markdown, run_decoding,
    )
    from blockdiff.load import load_checkpoint

    torch.set_num_threads(a.threads)
    models = [("parent", Path(a.parent)), ("converted", Path(a.converted))]
    modes = tuple(m for m in a.modes.split(",") if m)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    ppl = None
    if a.ppl:
        ppl = ppl_requests(read_ppl(a.ppl, a.ppl_docs), load_checkpoint(models[0][1]).tokenizer)
    t_start = time.perf_counter()
    results, md = {}, [f"# SmolLM2-135M-Instruct: parent vs block-diffusion conversion ({dt.date.today()})", ""]
    for i, split in enumerate(s for s in a.splits.split(",") if s):
        ex = checked_prompts(split)
        settings = DecodeSettings(modes=modes, max_new_tokens=a.max_new_tokens, batch_size=a.batch)
        t0 = time.perf_counter()
        c = compare(models, ex, settings, progress=say, chat=True, ppl=ppl if i == 0 else None,
                    prompts_info={"split": f"real-{split}", "n": len(ex), "seed": None})
        results[split] = c.as_json() | {"seconds": round(time.perf_counter() - t0, 1)}
        md += [format_markdown(c, title=f"Accuracy, split {split} (batch {a.batch})"), ""]
    speed = None
    if a.speed_prompts:
        allp = checked_prompts("final")
        ex = [allp[i] for i in sorted(random.Random(0).sample(range(len(allp)), min(a.speed_prompts, len(allp))))]
        smodes = tuple(m for m in (a.speed_modes or a.modes).split(",") if m)
        settings = DecodeSettings(modes=smodes, max_new_tokens=a.max_new_tokens, batch_size=1)
        c = compare(models, ex, settings, progress=say, chat=True,
                    prompts_info={"split": "real-final (speed sample, seed 0)", "n": len(ex), "seed": 0})
        speed = c.as_json()
        # the converted model's own greedy AR (its causal clean stream, one token per forward): what spec reproduces
        conv = load_checkpoint(models[1][1])
        own = run_decoding(conv, ex, Decoding("AR"), settings, **chat_hooks(conv))
        own["agree"] = agreement(own["outputs"], speed["models"][0]["rows"]["AR"]["outputs"])
        speed["models"][1]["rows"] = {"own AR": own, **speed["models"][1]["rows"]}
        if "spec" in speed["models"][1]["rows"]:
            speed["spec_equals_own_ar"] = agreement(speed["models"][1]["rows"]["spec"]["outputs"], own["outputs"])
        base = speed["models"][0]["rows"]["AR"]["tps"]
        md += [f"## Speed at batch 1 ({len(ex)} prompts of the final split; tokens/s ratio to the parent's greedy AR "
               f"in the same run)", "", "| model | decoding | accuracy | agree | TPF | tokens/s | vs parent AR |",
               "|---|---|---|---|---|---|---|"]
        for m in speed["models"]:
            for label, r in m["rows"].items():
                r["speedup"] = round(r["tps"] / base, 3)
                md.append(f"| {m['name']} | {label} | {r['accuracy']:.3f} | {r['agree']:.3f} | {r['tpf']:.2f} | "
                          f"{r['tps']:.1f} | {r['speedup']:.2f}x |")
        if "spec_equals_own_ar" in speed:
            md += ["", f"spec output identical to the converted model's own greedy AR on "
                       f"{speed['spec_equals_own_ar']:.3f} of these prompts (lossless by construction)."]
        md.append("")
    machine = describe()
    md.append(f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads, load "
              f"{machine['load1']}; torch {torch.__version__}, fp32. Wall time {time.perf_counter() - t_start:.0f} s.")
    # the headline: Q-mode retention on the first split, spec's speed
    first = results[next(iter(results))] if results else None
    summary = {"bench": "smollm2", "date": str(dt.date.today()), "machine": machine, "parent": str(a.parent),
               "converted": str(a.converted), "accuracy": results, "speed": speed}
    if first:
        par = first["models"][0]["rows"]["AR"]["accuracy"]
        conv = first["models"][1]["rows"]
        summary["headline"] = {"split": first["prompts"]["split"], "parent_accuracy": par,
                               **{f"{k}_accuracy": r["accuracy"] for k, r in conv.items()},
                               **{f"{k}_retention": round(r["accuracy"] / par, 4) if par else None
                                  for k, r in conv.items()}}
    if speed:
        summary["headline"] = summary.get("headline", {}) | {
            f"{k}_speedup": r["speedup"] for k, r in speed["models"][1]["rows"].items()} | {
            "spec_equals_own_ar": speed.get("spec_equals_own_ar")}
    write_results(a.out, f"smollm2-{dt.date.today()}", "\n".join(md) + "\n", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
