"""Measured effects of post-training on the bundled model: before/after tables, through the code users run.

    python bench/posttrain.py instruct --models before=assets/tiny-bd after=runs/post-sft/final [--threshold 0.95]
    python bench/posttrain.py instruct --models sft=runs/post-sft/final cap=runs/post-cap/final --name cap
    python bench/posttrain.py instruct --models m2t=... t2t=... --mode S --name t2t
    python bench/posttrain.py pref --models before=runs/post-sft/final after=runs/post-dpo/final --pairs runs/post-data/pairs_valid.jsonl
    python bench/posttrain.py reward --models before=runs/post-sft/final after=runs/post-rl/final

instruct: held-out synthetic-task prompts in the instruction format (system "Answer with the result only.", the
task as the user turn, the tokenizer's chat template), decoded by the batched engine `generate` (--mode threshold:
LLaDA2.0 threshold rule; S / Q: LLaDA2.1 joint M2T + T2T editing; B = 32, steps 32, temperature 0, KV cache);
accuracy = exact answer (cut at EOS and the end-of-turn
marker); TPF = generated tokens (to EOS) / forwards.
pref: held-out preference pairs; accuracy = fraction with ELBO(chosen) > ELBO(rejected), ELBO averaged over 4
shared noise draws (fixed seed), full t range; also with the ELBO over the answer up to its first EOS only.
reward: mean exact-answer reward on held-out prompts, greedy (= accuracy) and sampled (G = 4 at temperature 0.8,
what EBPO optimises).
Each model is evaluated on the same prompts in the same run. Prints the table, then one JSON line, and writes
posttrain-NAME-DATE.{md,json} to --out: runs/bench by default (git-ignored: a rerun leaves nothing untracked in the
repository); `--out bench/results` records a result to commit beside the others, `--no-save` writes nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from blockdiff.data.chat_template import ChatTemplate, answer_text, encode_prompt  # noqa: E402
from blockdiff.data.post_data import read_pairs, task_prompt  # noqa: E402
from blockdiff.data.tasks import SYSTEM_PROMPT, generate_examples  # noqa: E402
from blockdiff.eval.compare import Decoding, DecodeSettings, run_decoding  # noqa: E402
from blockdiff.load import load_checkpoint  # noqa: E402
from blockdiff.machine import describe  # noqa: E402
from blockdiff.objectives.preference import DPOConfig, elbo_preference_accuracy  # noqa: E402



def load(folder: str):
    loaded = load_checkpoint(folder)
    if not loaded.is_diffusion:
        raise ValueError(f"{folder} is not a block-diffusion model (no blockdiff section in config.json)")
    return loaded.model, loaded.tokenizer


def instruct(folder: str, n: int, threshold: float, temperature: float = 0.0, samples: int = 1, seed: int = 0,
             mode: str = "threshold", split: str = "heldout", split_seed: int = 123) -> dict:
    """Instruction-format accuracy through the one evaluation path (eval/compare.py run_decoding): prompts rendered
    with the chat template, answers read by answer_text, batches of 50 (at temperature 0 a row equals its lone
    decode), one sampling generator for the whole run."""
    loaded = load_checkpoint(folder)
    if not loaded.is_diffusion:
        raise ValueError(f"{folder} is not a block-diffusion model (no blockdiff section in config.json)")
    tok = loaded.tokenizer
    template = ChatTemplate(tok)
    examples = [ex for ex in generate_examples(split, n, seed=split_seed) for _ in range(samples)]
    settings = DecodeSettings(modes=(mode,), max_new_tokens=32, steps=32, block_size=loaded.info.block_size,
                              batch_size=50, temperature=temperature, seed=seed)
    r = run_decoding(loaded, examples, Decoding(mode, threshold), settings,
                     encode=lambda ex: encode_prompt(task_prompt(ex, SYSTEM_PROMPT).messages, tok, template),
                     output_text=lambda ids: answer_text(tok, ids))
    shown = [f"`{s['prompt']}` -> `{s['output'][:40]!r}` (expected `{s['answer']}`)" for s in r["samples"][:4]]
    return {"accuracy": r["accuracy"], "ci95": r["ci95"], "per_task": r["per_task"], "tpf": r["tpf"], "tps": r["tps"],
            "samples": shown}


def pref(folder: str, pairs: str, n: int) -> dict:
    model, tok = load(folder)
    B = model.cfg.diffusion.block_size
    data = read_pairs([pairs], tok, block_size=B, seq_len=64)
    k = min(n, len(data))
    batches = [{"input_ids": data.input_ids[i:i + 16], "loss_mask": data.loss_mask[i:i + 16],
                "positions": data.positions[i:i + 16]} for i in range(0, k, 16)]
    cfg = DPOConfig(mask_token_id=model.cfg.diffusion.mask_token_id, block_size=B)
    out = elbo_preference_accuracy(model, batches, cfg, samples=4)
    # the same with the ELBO over the answer up to its first EOS (the EOS padding after it left out)
    ans = DPOConfig(mask_token_id=model.cfg.diffusion.mask_token_id, block_size=B, eos_id=tok.eos_id, answer_only=True)
    a = elbo_preference_accuracy(model, batches, ans, samples=4)
    out.update(pref_acc_answer=a["pref_acc"], elbo_margin_answer=a["elbo_margin"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metric", choices=("instruct", "pref", "reward"))
    p.add_argument("--models", nargs="+", required=True, help="name=folder, evaluated in this order")
    p.add_argument("--n", type=int, default=200, help="held-out prompts / pairs")
    p.add_argument("--threshold", type=float, default=None, help="M2T commit threshold (default: the mode's)")
    p.add_argument("--mode", default="threshold", help="decoding mode: threshold (LLaDA2.0), S or Q (LLaDA2.1 M2T+T2T)")
    p.add_argument("--pairs", default="runs/post-data/pairs_valid.jsonl")
    p.add_argument("--name", default=None, help="results file name (default: the metric)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench"),
                   help="folder for posttrain-NAME-DATE.{md,json} (bench/results: a result to commit)")
    p.add_argument("--no-save", action="store_true", help="print only, write no result files")
    p.add_argument("--note", default="", help="a line for the markdown (what the models are)")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="prompts: held-out tasks (default) or the train-split tasks an RL run trained on")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the task draw (default 123 for heldout; for train use the RL recipe's [train] seed)")
    a = p.parse_args()
    torch.set_num_threads(1)
    models = dict(m.split("=", 1) for m in a.models)
    rows = {}
    for name, folder in models.items():
        if a.metric == "instruct":
            rows[name] = instruct(folder, a.n, a.threshold, mode=a.mode)
        elif a.metric == "pref":
            rows[name] = pref(folder, a.pairs, a.n)
        else:
            sp = dict(split=a.split, split_seed=a.split_seed if a.split_seed is not None else
                      (123 if a.split == "heldout" else 0))
            greedy = instruct(folder, a.n, a.threshold, **sp)
            sampled = instruct(folder, a.n if a.split == "train" else a.n // 2, a.threshold, temperature=0.8,
                               samples=4, seed=1, **sp)
            rows[name] = {"greedy_reward": greedy["accuracy"], "sampled_reward": sampled["accuracy"],
                          "per_task_greedy": greedy["per_task"], "tpf": greedy["tpf"]}
    date = dt.date.today().isoformat()
    m = describe()
    machine = f"{m['cpu']}, torch {torch.__version__} fp32, {m['threads']} thread(s), load {m['load1']}"
    lines = [f"# Post-training: {a.name or a.metric} ({date}, {machine})", ""]
    if a.note:
        lines += [a.note, ""]
    argv = sys.argv[1:]
    if "--note" in argv:  # the note is printed above; keep the command line short
        i = argv.index("--note")
        argv = argv[:i] + argv[i + 2:]
    lines += [f"Command: `python bench/posttrain.py {' '.join(argv)}`", ""]
    if a.metric == "instruct":
        tasks = list(next(iter(rows.values()))["per_task"])
        lines += [f"{a.n} held-out prompts, decoding mode {a.mode}, threshold {a.threshold or 'mode default'}, B = 32, "
                  "steps 32, greedy, batched engine (TPF per row).", "",
                  "| model | folder | accuracy | " + " | ".join(tasks) + " | TPF |",
                  "|---|---|---:|" + "---:|" * len(tasks) + "---:|"]
        for name, r in rows.items():
            per = " | ".join(f"{r['per_task'][t]:.3f}" for t in tasks)
            lines.append(f"| {name} | `{models[name]}` | {r['accuracy']:.3f} | {per} | {r['tpf']:.2f} |")
        for name, r in rows.items():
            lines += ["", f"Samples ({name}): " + "; ".join(r["samples"])]
    elif a.metric == "pref":
        lines += [f"Pairs from `{a.pairs}`; ELBO of each answer averaged over 4 shared noise draws; the answer-only "
                  "columns score the answer up to its first EOS (the EOS padding to seq_len left out).", "",
                  "| model | folder | pairs | preference accuracy | mean ELBO margin (nats) | accuracy, answer-only ELBO "
                  "| margin, answer-only (nats) |", "|---|---|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            lines.append(f"| {name} | `{models[name]}` | {r['pairs']} | {r['pref_acc']:.3f} | {r['elbo_margin']:.3f} | "
                         f"{r['pref_acc_answer']:.3f} | {r['elbo_margin_answer']:.3f} |")
    else:
        n_s = a.n if a.split == "train" else a.n // 2
        lines += [f"{a.n} {'held-out' if a.split == 'heldout' else 'train-split (the RL run trained on them)'} prompts "
                  f"greedy; {n_s} prompts x 4 samples at temperature 0.8; threshold "
                  f"{a.threshold or 0.95}, B = 32; reward = exact answer.", "",
                  "| model | folder | mean reward, greedy | mean reward, sampled T=0.8 | TPF |", "|---|---|---:|---:|---:|"]
        for name, r in rows.items():
            lines.append(f"| {name} | `{models[name]}` | {r['greedy_reward']:.3f} | {r['sampled_reward']:.3f} | {r['tpf']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    record = {"bench": "posttrain", "metric": a.metric, "name": a.name or a.metric, "date": date, "machine": machine,
              "threshold": a.threshold, "mode": a.mode, "n": a.n, "models": models, "results": rows}
    if not a.no_save:
        out = Path(a.out) / f"posttrain-{a.name or a.metric}-{date}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(md)
        out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
