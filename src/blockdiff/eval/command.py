"""`blockdiff eval`: several checkpoints side by side on the same held-out prompts, and the frontier plot.

    blockdiff eval --run runs/tiny-wsd --out runs/tiny-wsd/eval
    blockdiff eval --model parent=assets/tiny-ar --model converted=assets/tiny-bd --modes threshold,S,Q --out DIR

Each checkpoint is decoded with its own kind (greedy AR for AR checkpoints, the --modes for block-diffusion ones)
through eval/compare.py, the path the conversion report uses. Writes eval.md, eval.json and frontier.png (accuracy
against TPF over a threshold sweep and an (M2T, T2T) sweep for every block-diffusion checkpoint) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .frontier import DEFAULT_PAIRS, DEFAULT_THRESHOLDS


def _floats(flag: str, text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers in [0, 1], got {text!r}") from None


def _pairs(text: str) -> list[tuple[float, float]]:
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        parts = item.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            out.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise ValueError(f"--sweep-pairs: expected M2T:T2T pairs such as 0.7:0.5, got {item!r}") from None
    return out


def _is_model_folder(p: Path) -> bool:
    return (p / "config.json").is_file()


def run_models(run: Path, which: str) -> list[tuple[str, Path]]:
    """The checkpoints of a conversion run folder: its parent (report.json, else a checkpoint's recipe.json),
    merged/ (else final/), and checkpoints/step_N chosen by `which` ("last", "all", "none" or steps "100,400")."""
    if not run.is_dir():
        raise ValueError(f"--run: {run} is not a folder")
    ckpts = sorted(p for p in (run / "checkpoints").glob("step_*") if _is_model_folder(p))
    parent = None
    if (run / "report.json").is_file():
        parent = json.loads((run / "report.json").read_text()).get("parent")
    if parent is None:
        for c in reversed(ckpts):
            if (c / "recipe.json").is_file():
                parent = json.loads((c / "recipe.json").read_text()).get("model", {}).get("path")
                break
    models: list[tuple[str, Path]] = []
    if parent and _is_model_folder(Path(parent)):
        models.append(("parent", Path(parent)))
    for name in ("merged", "final"):
        if _is_model_folder(run / name):
            models.append((name, run / name))
            break
    if which == "all":
        chosen = ckpts
    elif which == "last":
        chosen = ckpts[-1:]
    elif which == "none":
        chosen = []
    else:
        steps = {int(s) for s in _floats("--checkpoints", which)}
        chosen = [c for c in ckpts if int(c.name.split("_")[1]) in steps]
        missing = steps - {int(c.name.split("_")[1]) for c in chosen}
        if missing:
            raise ValueError(f"--checkpoints: {run}/checkpoints has no step {sorted(missing)}; it has "
                             f"{[int(c.name.split('_')[1]) for c in ckpts]}")
    models += [(f"step_{int(c.name.split('_')[1])}", c) for c in chosen]
    if not models:
        raise ValueError(f"--run: {run} holds no model folder (parent, merged/, final/ or checkpoints/step_N)")
    return models


def checked_examples(which: str, families, n: int | None, seed: int) -> tuple[list, str]:
    """The checkable chat prompts of --checked (a split of data/real_prompts.py or a jsonl file), filtered to
    `families`, and a seeded sample of `n` of them (None = all, in their order)."""
    import random

    from ..data.real_prompts import checked_prompts, read_checked_prompts

    if which in ("dev", "final"):
        prompts, split = checked_prompts(which), f"real-{which}"
    elif which.endswith(".jsonl") or Path(which).is_file():
        if not Path(which).is_file():
            raise ValueError(f"--checked: {which} does not exist")
        prompts, split = read_checked_prompts(which), str(which)
    else:
        raise ValueError(f"--checked: expected dev, final or a .jsonl file, got {which!r}")
    prompts = [p for p in prompts if p.task in families] if which in ("dev", "final") else prompts
    if not prompts:
        raise ValueError(f"--checked {which}: no prompts of the tasks {', '.join(families)}")
    if n is not None and n < len(prompts):
        idx = sorted(random.Random(seed).sample(range(len(prompts)), n))
        prompts = [prompts[i] for i in idx]
    return prompts, split


def read_ppl(path: str, n: int) -> list[tuple[str, str]]:
    """(prompt, answer) texts of the first `n` lines of a jsonl file with fields 'prompt' and 'answer'."""
    from ..data.documents import DataError

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--ppl: {p} does not exist")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if len(rows) >= n:
            break
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) and d[k] for k in ("prompt", "answer")):
            raise DataError(f"{p}:{i}: expected an object with non-empty string fields 'prompt' and 'answer'")
        rows.append((d["prompt"], d["answer"]))
    if not rows:
        raise DataError(f"{p}: no lines")
    return rows


def ppl_requests(rows: list[tuple[str, str]], tok) -> list[tuple[list[int], list[int]]]:
    """`read_ppl`'s (prompt, answer) rows as (context, continuation + EOS) token ids: the answer and its end."""
    return [(tok.encode(p), tok.encode(a) + [tok.eos_id]) for p, a in rows]


def parse_models(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name or item, item
        p = Path(path)
        if not _is_model_folder(p):
            raise ValueError(f"--model {item}: {p} is not a model folder (no config.json)")
        out.append((name, p))
    return out


def add_eval_parser(sub, formatter_class=argparse.ArgumentDefaultsHelpFormatter) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="evaluate checkpoints side by side (accuracy, TPF, frontier plot)",
                       formatter_class=formatter_class,
                       description="Decode the same held-out synthetic-task prompts with several checkpoints, each "
                                   "with its own kind (greedy AR for AR checkpoints; the --modes for block-diffusion "
                                   "ones), and print per-task accuracy with 95% intervals, TPF, tokens/s and "
                                   "forwards. With --out: eval.md, eval.json and frontier.png (accuracy against TPF "
                                   "for a threshold sweep and an (M2T, T2T) sweep, S and Q marked, AR models as "
                                   "horizontal lines).")
    e.add_argument("--model", action="append", default=None, metavar="[NAME=]FOLDER",
                   help="a checkpoint folder, optionally named (repeatable; evaluated in this order)")
    e.add_argument("--run", default=None, help="a conversion run folder: adds its parent, merged/ (else final/) and "
                                               "the checkpoints chosen by --checkpoints")
    e.add_argument("--checkpoints", default="last", help="with --run: last, all, none or steps such as 100,400")
    e.add_argument("--modes", default=None,
                   help="block decoding modes for block-diffusion checkpoints (default: threshold,S,Q, plus spec where "
                        "the checkpoint can run it)")
    e.add_argument("--threshold", type=float, default=None, help="M2T threshold of threshold mode (default: the mode's)")
    e.add_argument("--prompts", type=int, default=None,
                   help="held-out prompts (count; cycles through the tasks; 200 if not given); with --checked a "
                        "seeded sample of that many (all if not given)")
    e.add_argument("--checked", default=None, metavar="dev|final|FILE.jsonl",
                   help="instead of the synthetic tasks: checkable chat prompts for a real instruction model (the "
                        "dev or final split of blockdiff/data/real_prompts.py, or a jsonl file of task, prompt, "
                        "check, answers), each rendered with the checkpoint's own chat template")
    e.add_argument("--ppl", default=None, metavar="FILE.jsonl",
                   help="also report each model's held-out perplexity on the 'answer' given 'prompt' of each line "
                        "(e.g. the parent's own answers: valid.jsonl of scripts/chat_distill_data.py)")
    e.add_argument("--ppl-docs", type=int, default=64, help="lines of --ppl used (the first ones)")
    e.add_argument("--ppl-samples", type=int, default=8, help="noisings per line for the ELBO perplexity")
    e.add_argument("--seed", type=int, default=123, help="prompt draw (123 = the conversion report's prompts)")
    e.add_argument("--tasks", default=None, help="comma-separated subset of add,reverse,sort,lookup (default: all)")
    e.add_argument("--max-new-tokens", type=int, default=32, help="generation budget per prompt (tokens)")
    e.add_argument("--steps", type=int, default=32, help="denoising steps per block")
    e.add_argument("--block-size", type=int, default=None, help="B in tokens (default: each checkpoint's own)")
    e.add_argument("--batch-size", type=int, default=1, help="prompts per engine call (tokens/s depend on it; "
                                                             "accuracy and TPF do not)")
    e.add_argument("--out", default=None, help="folder for eval.md, eval.json and frontier.png")
    e.add_argument("--no-frontier", action="store_true", help="skip the threshold / (M2T, T2T) sweeps and the plot")
    e.add_argument("--sweep-thresholds", default=",".join(map(str, DEFAULT_THRESHOLDS)),
                   help="threshold-mode M2T thresholds of the frontier")
    e.add_argument("--sweep-pairs", default=",".join(f"{m}:{t}" for m, t in DEFAULT_PAIRS),
                   help="joint-mode M2T:T2T pairs of the frontier")
    e.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = the cores the machine's load leaves free")
    e.set_defaults(func=cmd_eval)
    return e


def cmd_eval(args) -> int:
    from ..data.real_prompts import FAMILIES
    from ..data.tasks import TASKS, generate_examples
    from ..load import load_checkpoint
    from ..machine import describe, set_threads
    from .compare import DecodeSettings, compare, format_markdown
    from .frontier import plot_frontier, sweep, sweep_decodings

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = auto), got {args.threads}")
    if args.prompts is not None and args.prompts < 1:
        raise ValueError(f"--prompts must be >= 1, got {args.prompts}")
    known = FAMILIES if args.checked else TASKS
    tasks = known if args.tasks is None else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    bad = [t for t in tasks if t not in known]
    if bad or not tasks:
        raise ValueError(f"--tasks: unknown {', '.join(bad) or '(empty)'}; allowed: {', '.join(known)}")
    if args.ppl_docs < 1 or args.ppl_samples < 1:
        raise ValueError("--ppl-docs and --ppl-samples must be >= 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    models = parse_models(args.model or [])
    if args.run:
        models += run_models(Path(args.run), args.checkpoints)
    if not models:
        raise ValueError("give at least one --model FOLDER or a --run folder")
    modes = None if args.modes is None else tuple(m.strip() for m in args.modes.split(",") if m.strip())
    settings = DecodeSettings(modes=modes,
                              max_new_tokens=args.max_new_tokens, steps=args.steps, threshold=args.threshold,
                              block_size=args.block_size, batch_size=args.batch_size)
    decs = sweep_decodings(_floats("--sweep-thresholds", args.sweep_thresholds), _pairs(args.sweep_pairs))
    if args.no_frontier:
        decs = None
    if args.checked:
        examples, split = checked_examples(args.checked, tasks, args.prompts, args.seed)
    else:
        examples, split = generate_examples("heldout", args.prompts or 200, seed=args.seed, tasks=tasks), "heldout"
    ppl_rows = read_ppl(args.ppl, args.ppl_docs) if args.ppl else None
    set_threads(args.threads)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    ppl = ppl_requests(ppl_rows, load_checkpoint(models[0][1]).tokenizer) if ppl_rows else None
    result = compare(models, examples, settings, progress=say, chat=bool(args.checked), ppl=ppl,
                     ppl_samples=args.ppl_samples,
                     prompts_info={"split": split, "n": len(examples), "seed": args.seed, "tasks": list(tasks)}
                     | ({"ppl_file": args.ppl, "ppl_docs": len(ppl_rows)} if ppl_rows else {}))
    if decs:
        for m in result.models:
            if m["kind"] != "AR":
                result.sweeps += sweep(load_checkpoint(m["folder"]), m["name"], examples, settings, decs, say)
    md = format_markdown(result)
    machine = describe()
    md += (f"\nMachine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} torch threads, "
           f"load {machine['load1']}.\n")
    print(md)
    if args.out:
        from ..atomic import write_json, write_text

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = result.as_json() | {"machine": machine}
        if result.sweeps:
            png = plot_frontier(result, out / "frontier.png",
                                title=f"accuracy vs TPF, {len(examples)} held-out prompts (seed {args.seed})")
            data["frontier_png"] = str(png)
            md += f"\n![frontier](frontier.png)\n"
        write_text(out / "eval.md", md)
        write_json(out / "eval.json", data)
        print(f"wrote {out / 'eval.md'}, {out / 'eval.json'}" + (", " + str(out / "frontier.png")
                                                                  if result.sweeps else ""))
    return 0
