"""The conversion job (`blockdiff convert`): run a WSD recipe from an AR checkpoint, merge the top-k
checkpoints, and write a report.

The report gives, measured in this run: validation ELBO perplexity at the end of every phase; for the bundled
model, held-out task accuracy (with a 95% interval) of the AR parent (greedy AR decoding with a KV cache) and of
the converted model (LLaDA2.0 threshold, LLaDA2.1 S and Q decoding with an exact block KV cache) on the same
prompts, with tokens per forward (overall and per task) and tokens per second; the wall time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import write_json, write_text
from .data.tasks import generate_examples
from .eval.task_accuracy import evaluate_checkpoint
from .machine import describe
from .train.loop import train
from .train.merge import merge_top_k
from .train.parallel import is_main_process
from .train.recipe import Recipe


@dataclass
class ConvertResult:
    model_dir: Path  # the model to use: merged if top-k merging ran, else final
    report: dict
    report_path: Path


# The report's evaluation may always take this long, whatever the training took: a short run is never cut to a
# prompt or two (the bundled model evaluates its 200 prompts in about a minute).
EVAL_FLOOR_S = 60.0


def evaluate_parent_and_converted(recipe: Recipe, parent: Path, converted: Path, seed: int = 123,
                                  budget_s: float | None = None) -> dict:
    """Parent and converted model on the same held-out prompts, each decoded with its own kind (greedy AR for AR
    checkpoints; threshold, S and Q block decoding for block-diffusion ones: a parent may itself be a converted
    model when a conversion is continued).

    `budget_s` (None = no limit): the evaluation's time. The first prompt is evaluated on both models and timed
    (model loading included); when all the prompts would not fit the budget at that pace, only as many as fit are
    evaluated (at least that first one), and the result says how many were asked for."""
    ev = recipe.eval
    examples = generate_examples("heldout", ev.tasks, seed=seed)
    kw = dict(max_new_tokens=ev.max_new_tokens, steps=ev.steps, threshold=ev.threshold)
    t0 = time.perf_counter()
    limit = None
    if budget_s is not None and len(examples) > 1:
        pilot = evaluate_checkpoint(parent, examples[:1], **kw), evaluate_checkpoint(converted, examples[:1], **kw)
        per_prompt = time.perf_counter() - t0
        fit = int((budget_s - per_prompt) // per_prompt)
        if fit < len(examples):
            limit = {"asked": len(examples), "budget_s": round(budget_s, 1), "first_prompt_s": round(per_prompt, 1)}
            examples = examples[:max(fit, 1)]
    if limit is not None and len(examples) == 1:
        parent_res, conv_res = pilot
    else:
        parent_res = evaluate_checkpoint(parent, examples, **kw)
        conv_res = evaluate_checkpoint(converted, examples, **kw)
    out = {"prompts": len(examples), "seed": seed, "max_new_tokens": ev.max_new_tokens,
           "ar_parent": next(iter(parent_res.values())), "parent_rows": parent_res, "converted_rows": conv_res,
           "converted": conv_res.get("threshold") or next(iter(conv_res.values()))}
    if limit is not None:
        out["time_limited"] = limit
    out["eval_s"] = round(time.perf_counter() - t0, 1)
    return out


def run_conversion(recipe: Recipe, out: str | Path, *, resume: bool = False, progress: bool = True,
                   overwrite: bool = False) -> ConvertResult:
    out = Path(out)
    result = train(recipe, out, resume=resume, progress=progress, overwrite=overwrite)
    if not is_main_process():  # under torchrun rank 0 merges, evaluates and writes the report
        return ConvertResult(result.final_dir, {}, out / "report.json")
    t0 = time.perf_counter()  # after training: the report's wall time is the whole run's training + this evaluation
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
        share = recipe.eval.time_share
        budget = None if share <= 0 else max(share * result.wall_s, EVAL_FLOOR_S)
        report["tasks"] = evaluate_parent_and_converted(recipe, Path(recipe.model.path), model_dir, budget_s=budget)
    report["train_wall_s"] = round(result.wall_s, 1)
    report["wall_s"] = round(result.wall_s + time.perf_counter() - t0, 1)
    report["device"] = "cuda" if torch.cuda.is_available() and recipe.train.device != "cpu" else "cpu"
    report["machine"] = describe()  # CPU, cores, torch threads, 1-minute load: they move the speed numbers
    path = out / "report.json"
    write_json(path, report)
    write_text(out / "report.md", format_report(report))
    return ConvertResult(model_dir, report, path)


def _machine_line(r: dict) -> str:
    m = r.get("machine")
    return f" ({m['cpu']}, {m['cores']} cores, {m['threads']} threads, load {m['load1']})" if m else ""


def _ppl(nll: float) -> float:
    return round(math.exp(min(nll, 50.0)), 4)


def _phase_table(evals: list[dict]) -> list[dict]:
    ends = [e for e in evals if e.get("phase_end")]
    return [{"phase": e["phase"], "block_size": e["block_size"], "step": e["step"], "val_elbo_ppl": _ppl(e["val_nll"])}
            for e in ends]


def format_report(r: dict) -> str:
    lines = ["# blockdiff conversion report", "", f"- parent: `{r['parent']}`", f"- result: `{r['model']}`",
             f"- steps: {r['steps']}, training throughput {r['train_tokens_per_s']} tokens/s (of L per row)",
             f"- wall time: {r['wall_s']} s on {r['device']}{_machine_line(r)}"
             + (f" (training {r['train_wall_s']} s, the report's evaluation {r['tasks']['eval_s']} s)"
                if "eval_s" in r.get("tasks", {}) and "train_wall_s" in r else ""), "", "## Validation ELBO perplexity per WSD phase", "",
             "| phase | block size | step | val ELBO ppl |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['block_size']} | {p['step']} | {p['val_elbo_ppl']} |" for p in r["phases"]]
    if "merge" in r:
        m = r["merge"]
        picks = ", ".join(f"{c['checkpoint']} ({c['val_ppl']})" for c in m["chosen"])
        lines += ["", f"Top-{m['k']} merge at B = {m['block_size']}: {picks}"]
    if "tasks" in r:
        t = r["tasks"]
        tasks = list(t["ar_parent"]["per_task"])
        lines += ["", f"## Held-out synthetic tasks ({t['prompts']} prompts, seed {t.get('seed', 123)}, max "
                      f"{t['max_new_tokens']} new tokens, batch 1)", ""]
        if "time_limited" in t:
            cut = t["time_limited"]
            lines += [f"Only {t['prompts']} of the {cut['asked']} prompts asked for: the first took "
                      f"{cut['first_prompt_s']} s on both models, and the evaluation is held to {cut['budget_s']} s "
                      "(`[eval] time_share` of the training's wall time). The interval is wide accordingly.", ""]
        lines += [
                  "| model | decoding | accuracy | 95% CI | " + " | ".join(tasks) + " | TPF | tokens/s | vs parent |",
                  "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]
        rows = [("AR parent" if k == "AR" else "parent", v) for k, v in t["parent_rows"].items()]
        rows += [("converted", v) for v in t["converted_rows"].values()]
        parent_tps = t["ar_parent"].get("tps")
        for name, res in rows:
            per = " | ".join(f"{res['per_task'].get(k, 0.0):.3f}" for k in tasks)
            lo, hi = res["ci95"]
            vs = f"{res['tps'] / parent_tps:.2f}x" if parent_tps else "-"
            lines.append(f"| {name} | {res['decoding']} | {res['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {per} | "
                         f"{res['tpf']:.2f} | {res['tps']:.1f} | {vs} |")
        lines += ["", "TPF per task (converted): " + "; ".join(
            f"{mode} " + ", ".join(f"{k} {v:.2f}" for k, v in res["tpf_per_task"].items())
            for mode, res in t["converted_rows"].items())]
        lines += ["", "Samples (converted, first row):", ""]
        for s in t["converted"]["samples"][:4]:
            lines.append(f"- `{s['prompt']}` -> `{s['output']}` (expected `{s['answer']}`)")
    return "\n".join(lines) + "\n"


def print_report(r: dict) -> None:
    print(format_report(r))
    print(json.dumps({k: v for k, v in r.items() if k != "tasks"} | (
        {"ar_accuracy": r["tasks"]["ar_parent"]["accuracy"], "converted_accuracy": r["tasks"]["converted"]["accuracy"],
         "converted_modes": {m: {"accuracy": round(v["accuracy"], 4), "ci95": v["ci95"], "tpf": round(v["tpf"], 3)}
                       for m, v in r["tasks"]["converted_rows"].items()}} if "tasks" in r else {})))
