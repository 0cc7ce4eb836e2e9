"""The conversion job (`blockdiff convert`): run a WSD recipe from an AR checkpoint, merge the top-k
checkpoints, and write a report.

The report gives, measured in this run: validation ELBO perplexity at the end of every phase; for the bundled
model, held-out task accuracy of the AR parent (greedy AR decoding with a KV cache) and of the converted model
(LLaDA2.0 threshold decoding with an exact block KV cache) on the same prompts, with tokens per forward and
tokens per second; the wall time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.tasks import generate_examples
from .data.tokenizer import load_tokenizer
from .decode.engine import BlockDecodeConfig, ar_generate, block_generate
from .eval.task_accuracy import evaluate_tasks
from .model.hf_io import load_pretrained, write_json_atomic
from .train.loop import train
from .train.merge import merge_top_k
from .train.recipe import Recipe


@dataclass
class ConvertResult:
    model_dir: Path  # the model to use: merged if top-k merging ran, else final
    report: dict
    report_path: Path


def evaluate_parent_and_converted(recipe: Recipe, parent: Path, converted: Path, seed: int = 123) -> dict:
    ev = recipe.eval
    examples = generate_examples("heldout", ev.tasks, seed=seed)

    def run(folder: Path) -> tuple[dict, str]:
        """Decode with the model's own kind: greedy AR for AR checkpoints, threshold block decoding for
        block-diffusion ones (a parent may itself be a converted model when a conversion is continued)."""
        tok = load_tokenizer(folder)
        model = load_pretrained(folder).eval()
        info = model.cfg.diffusion
        if info is None:
            res = evaluate_tasks(examples, tok, lambda ids: ar_generate(model, ids, max_new_tokens=ev.max_new_tokens,
                                                                        eos_ids=tok.eos_ids))
            return res, "greedy AR, KV cache"
        dcfg = BlockDecodeConfig(block_size=info.block_size, steps=ev.steps, threshold=ev.threshold,
                                 max_new_tokens=ev.max_new_tokens)
        res = evaluate_tasks(examples, tok, lambda ids: block_generate(model, ids, dcfg, mask_id=info.mask_token_id,
                                                                       eos_ids=tok.eos_ids))
        return res, f"threshold {ev.threshold}, B={info.block_size}, steps={ev.steps}, block KV cache"

    parent_res, parent_dec = run(parent)
    conv_res, conv_dec = run(converted)
    return {"prompts": len(examples), "max_new_tokens": ev.max_new_tokens,
            "decoding": {"ar_parent": parent_dec, "converted": conv_dec},
            "ar_parent": parent_res, "converted": conv_res}


def run_conversion(recipe: Recipe, out: str | Path, *, resume: bool = False, progress: bool = True) -> ConvertResult:
    t0 = time.perf_counter()
    out = Path(out)
    result = train(recipe, out, resume=resume, progress=progress)
    model_dir = result.final_dir
    merged = None
    if recipe.merge.top_k > 0 and result.evals:
        merged = merge_top_k(out, recipe.merge.top_k, out / "merged")
        model_dir = merged.out
    report: dict = {
        "recipe": recipe.source,
        "parent": recipe.model.path,
        "model": str(model_dir),
        "steps": result.steps,
        "train_tokens_per_s": round(result.tokens_per_s, 1),
        "phases": _phase_table(result.evals),
    }
    if merged is not None:
        report["merge"] = {"k": recipe.merge.top_k, "block_size": merged.block_size,
                           "chosen": [{"checkpoint": c.name, "val_ppl": _ppl(v)} for c, v in merged.chosen]}
    if recipe.eval.tasks > 0:
        report["tasks"] = evaluate_parent_and_converted(recipe, Path(recipe.model.path), model_dir)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["device"] = "cuda" if torch.cuda.is_available() and recipe.train.device != "cpu" else "cpu"
    path = out / "report.json"
    write_json_atomic(path, report)
    (out / "report.md").write_text(format_report(report))
    return ConvertResult(model_dir, report, path)


def _ppl(nll: float) -> float:
    return round(math.exp(min(nll, 50.0)), 4)


def _phase_table(evals: list[dict]) -> list[dict]:
    ends = [e for e in evals if e.get("phase_end")]
    return [{"phase": e["phase"], "block_size": e["block_size"], "step": e["step"], "val_elbo_ppl": _ppl(e["val_nll"])}
            for e in ends]


def format_report(r: dict) -> str:
    lines = ["# blockdiff conversion report", "", f"- parent: `{r['parent']}`", f"- result: `{r['model']}`",
             f"- steps: {r['steps']}, training throughput {r['train_tokens_per_s']} tokens/s (of L per row)",
             f"- wall time: {r['wall_s']} s on {r['device']}", "", "## Validation ELBO perplexity per WSD phase", "",
             "| phase | block size | step | val ELBO ppl |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['block_size']} | {p['step']} | {p['val_elbo_ppl']} |" for p in r["phases"]]
    if "merge" in r:
        m = r["merge"]
        picks = ", ".join(f"{c['checkpoint']} ({c['val_ppl']})" for c in m["chosen"])
        lines += ["", f"Top-{m['k']} merge at B = {m['block_size']}: {picks}"]
    if "tasks" in r:
        t = r["tasks"]
        lines += ["", f"## Held-out synthetic tasks ({t['prompts']} prompts, max {t['max_new_tokens']} new tokens, batch 1)", "",
                  "| model | decoding | accuracy | " + " | ".join(t["ar_parent"]["per_task"]) + " | TPF | tokens/s |",
                  "|---|---|---|" + "---|" * len(t["ar_parent"]["per_task"]) + "---|---|"]
        parent_name = "AR parent" if t["decoding"]["ar_parent"].startswith("greedy AR") else "parent"
        for name, key in ((parent_name, "ar_parent"), ("converted", "converted")):
            res, dec = t[key], t["decoding"][key]
            per = " | ".join(f"{v:.3f}" for v in res["per_task"].values())
            lines.append(f"| {name} | {dec} | {res['accuracy']:.3f} | {per} | {res['tpf']:.2f} | {res['tps']:.1f} |")
        lines += ["", "Samples (converted):", ""]
        for s in t["converted"]["samples"][:4]:
            lines.append(f"- `{s['prompt']}` -> `{s['output']}` (expected `{s['answer']}`)")
    return "\n".join(lines) + "\n"


def print_report(r: dict) -> None:
    print(format_report(r))
    print(json.dumps({k: v for k, v in r.items() if k != "tasks"} | (
        {"ar_accuracy": r["tasks"]["ar_parent"]["accuracy"], "converted_accuracy": r["tasks"]["converted"]["accuracy"],
         "converted_tpf": r["tasks"]["converted"]["tpf"]} if "tasks" in r else {})))
