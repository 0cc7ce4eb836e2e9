"""The `blockdiff` command line: a thin layer over the public API (docs/design.md, Code conventions 4).

    blockdiff make-data  write the bundled corpus (synthetic tasks + Python stdlib source) as jsonl, or with
                         --kind chat|pairs the post-training data (SFT conversations, DPO pairs) from the tasks
    blockdiff train      post-train a block-diffusion model: sft (with CAP / T2T options), dpo or rl (EBPO)
    blockdiff convert    AR checkpoint -> block-diffusion checkpoint with a WSD recipe, then a report
    blockdiff merge      average the top-k checkpoints of a run by validation ELBO
    blockdiff generate   decode prompts (one batch) with the engine: threshold, S/Q editing, ...; --stream, --trace
    blockdiff chat       interactive chat with the chat template, decoded by the same engine
    blockdiff show-trace replay a --trace file step by step (unmasking and edits)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: expected section.field=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_make_data(args) -> int:
    if args.kind != "corpus":
        from .data.bundled import write_post_data

        paths = write_post_data(args.out, args.kind, train=args.train_examples, valid=args.valid_examples, seed=args.seed)
        print("wrote " + " and ".join(map(str, paths)))
        return 0
    from .data.bundled import write_bundled_corpus

    c = write_bundled_corpus(args.out, train_examples=args.train_examples, train_code_chars=args.code_chars,
                             valid_examples=args.valid_examples, seed=args.seed)
    print(f"wrote {c.train} and {c.valid}")
    return 0


def _run_recipe(args):
    """The recipe of a recipe-running command (convert, train): --recipe with --set and --model applied."""
    from .train.recipe import load_recipe

    overrides = _parse_set(args.set)
    if args.model:
        overrides["model.path"] = str(Path(args.model).resolve())
    return load_recipe(args.recipe, overrides)


def cmd_convert(args) -> int:
    from .convert import print_report, run_conversion

    recipe = _run_recipe(args)
    res = run_conversion(recipe, args.out, resume=args.resume, progress=not args.no_progress)
    print_report(res.report)
    print(f"model: {res.model_dir}\nreport: {res.report_path}")
    return 0


def cmd_train(args) -> int:
    from .train.loop import train
    from .train.recipe import RecipeError

    recipe = _run_recipe(args)
    if recipe.objective.kind != args.kind:
        raise RecipeError(f"{args.recipe}: [objective] kind is {recipe.objective.kind!r} but the command is "
                          f"`blockdiff train {args.kind}`; use a {args.kind} recipe")
    res = train(recipe, args.out, resume=args.resume, progress=not args.no_progress)
    last = res.evals[-1] if res.evals else None
    summary = {"steps": res.steps, "model": str(res.final_dir), "wall_s": round(res.wall_s, 1)}
    if last:
        summary["val_elbo_nll"] = round(last["val_nll"], 4)
    print(json.dumps(summary))
    return 0


def cmd_merge(args) -> int:
    from .train.merge import merge_top_k

    res = merge_top_k(args.run, args.k, args.out, block_size=args.block_size)
    for c, nll in res.chosen:
        print(f"  {c.name}: val NLL {nll:.4f} nats/token")
    print(f"averaged {len(res.chosen)} checkpoints at block size {res.block_size} -> {res.out}")
    return 0


def _decode_config(args, loaded):
    return loaded.decode_config(mode=args.mode, block_size=args.block_size, steps=args.steps,
                                threshold=args.threshold, edit_threshold=args.edit_threshold,
                                max_post_steps=args.max_post_steps, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                ignore_eos=args.ignore_eos, repeat_penalty=args.repeat_penalty, eos_fill=args.eos_fill)


class _StreamPrinter:
    """Prints row 0's text as its blocks become final (what a server would stream). With stop strings, the last
    len(stop) - 1 characters are held back until the row is done, so a stop string is never half-printed."""

    def __init__(self, tok, eos_ids, stops=()):
        self.tok, self.eos, self.stops, self.shown = tok, set(eos_ids), [s for s in stops if s], ""

    def __call__(self, u) -> None:
        from .decode.engine import find_stop

        if u.row != 0:
            return
        final = u.tokens[:u.n_final]
        for i, t in enumerate(final):
            if t in self.eos:
                final = final[:i]
                break
        text = self.tok.decode(final)
        cut = find_stop(text, self.stops) if self.stops else None
        if cut is not None:
            text = text[:cut]
        elif self.stops and not u.done:
            text = text[:max(len(self.shown), len(text) - max(len(s) for s in self.stops) + 1)]
        if text.startswith(self.shown) and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def cmd_generate(args) -> int:
    import torch

    from .decode.engine import find_stop
    from .load import load_checkpoint

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    loaded = load_checkpoint(args.model)
    tok = loaded.tokenizer
    texts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file {path} does not exist")
        texts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError("give at least one --prompt (or --prompt-file with one prompt per line)")
    prompts = [tok.encode(t) for t in texts]
    for k, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {k + 1} is empty after tokenisation")
    info = loaded.info
    cfg = _decode_config(args, loaded)
    if args.ar or info is None:
        if not args.ar:
            print(f"[blockdiff] {args.model} has no blockdiff diffusion section: decoding it as an AR model", file=sys.stderr)
        gens = loaded.generate(prompts, cfg, ar=True, generator=gen)
        seconds = sum(g.seconds for g in gens)
    else:
        trace = None
        callbacks = []
        if args.trace:
            from .decode.trace import TraceWriter

            trace = TraceWriter(args.trace, cfg, prompts, mask_id=info.mask_token_id, eos_ids=tok.eos_ids,
                                token_text=lambda t: tok.decode([t]))
            callbacks.append(trace)
        if args.stream and len(prompts) == 1:
            callbacks.append(_StreamPrinter(tok, tok.eos_ids, args.stop or ()))

        def on_step(u):
            for f in callbacks:
                f(u)

        try:
            gens = loaded.generate(prompts, cfg, generator=gen, stop=args.stop or (),
                                   on_step=on_step if callbacks else None)
        except BaseException:
            if trace is not None:
                trace.close(None)
            raise
        if trace is not None:
            trace.close(gens)
        seconds = max(g.seconds for g in gens)
    for k, g in enumerate(gens):
        text = tok.decode(g.tokens)
        if args.stop:
            cut = find_stop(text, args.stop)
            text = text if cut is None else text[:cut]
        if args.stream and len(prompts) == 1 and info is not None and not args.ar:
            print()
        else:
            print(text if len(gens) == 1 else f"[{k + 1}] {text}")
    n = sum(g.n_generated for g in gens)
    fwd = sum(g.forwards for g in gens)
    print(f"[{len(gens)} prompt(s), {n} tokens, {fwd} forwards, TPF {n / max(fwd, 1):.2f}, "
          f"{n / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """Interactive chat: each user line is appended to the conversation, the conversation is rendered with the
    tokenizer's chat template (the documented default when it has none, data/chat_template.py) and decoded with the engine;
    the reply is cut at the template's end-of-turn marker. /reset clears the history, /exit (or EOF) quits."""
    import torch

    from .data.chat_template import ChatTemplate, answer_text
    from .load import load_checkpoint

    gen = torch.Generator().manual_seed(args.seed)
    loaded = load_checkpoint(args.model)
    tok = loaded.tokenizer
    template = ChatTemplate(tok)
    cfg = _decode_config(args, loaded)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    src = "the tokenizer's chat template" if tok.chat_template else "the default chat template (tokenizer has none)"
    print(f"[blockdiff chat] {args.model}, {src}; /reset clears the history, /exit quits", file=sys.stderr)
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        ids = tok.encode(template.render(system + history, add_generation_prompt=True))
        g = loaded.generate([ids], cfg, ar=args.ar, generator=gen)[0]
        reply = answer_text(tok, g.tokens)
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
        print(f"[{g.n_generated} tokens, TPF {g.tpf:.2f}, {g.n_generated / max(g.seconds, 1e-9):.1f} tokens/s]",
              file=sys.stderr)
    return 0


def cmd_show_trace(args) -> int:
    from .decode.trace import read_trace, render_trace

    path = Path(args.trace)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    for line in render_trace(read_trace(path), args.row):
        print(line)
    return 0


def _add_run_args(p, recipe_example: str, out_help: str, model_help: str, set_example: str) -> None:
    """The flags every recipe-running command shares (convert, train)."""
    p.add_argument("--recipe", required=True, help=f"recipe file (TOML), e.g. {recipe_example}")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help=f"override a recipe field (repeatable), e.g. --set {set_example} (value parsed as JSON)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_decoding_args(g) -> None:
    from .decode.engine import MODES

    about = {"threshold": "LLaDA2.0", "S": "LLaDA2.1 speed", "Q": "LLaDA2.1 quality", "joint": "LLaDA2.1, your thresholds",
             "dinfer": "dInfer threshold", "factor": "Fast-dLLM factor rule", "credit": "dInfer credit"}

    def defaults(mode: str) -> str:  # the thresholds come from MODES, the one place they are declared
        _, m2t, t2t = MODES[mode]
        return f"M2T {m2t}" + (f", T2T {t2t}" if t2t is not None else "")

    g.add_argument("--mode", default="threshold", choices=list(MODES),
                   help="decoding rule (default thresholds): " + "; ".join(
                       f"{m} = {about.get(m, m)} ({defaults(m)})" for m in MODES))
    g.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per prompt (tokens)")
    g.add_argument("--block-size", type=int, default=0, help="block size B (tokens; 0 = the model's trained block size)")
    g.add_argument("--steps", type=int, default=32, help="denoising steps per block (capped at --max-new-tokens); fallback commits per step: "
                   "floor(B/steps), one more on the first B %% steps steps (the official LLaDA2 schedule)")
    g.add_argument("--threshold", type=float, default=None,
                   help="M2T: unmask slots with confidence above this (0-1; default: the mode's)")
    g.add_argument("--edit-threshold", type=float, default=None,
                   help="T2T: edit a token when the model prefers another with probability above this (0-1; S/Q/joint)")
    g.add_argument("--max-post-steps", type=int, default=16, help="edit-only passes after a block fills (S/Q/joint)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = argmax)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (0-1]")
    g.add_argument("--ignore-eos", action="store_true", help="decode the whole budget even after EOS (benchmarks)")
    g.add_argument("--repeat-penalty", type=float, default=0.0,
                   help="logit penalty for repeating the left neighbour inside a block (0 = off; anti-stutter)")
    g.add_argument("--eos-fill", action="store_true",
                   help="fill the masked slots after a committed EOS with EOS at once (saves forwards; off = official)")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    g.add_argument("--ar", action="store_true", help="decode autoregressively (for AR parents)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockdiff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    d = sub.add_parser("make-data", help="write the bundled corpus as jsonl", formatter_class=fmt,
                       description="Write train.jsonl / valid.jsonl: synthetic tasks with exact answers plus Python "
                                   "standard-library source, generated deterministically on this machine.")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--train-examples", type=int, default=120_000, help="synthetic task documents in train.jsonl (count)")
    d.add_argument("--valid-examples", type=int, default=400, help="held-out task documents in valid.jsonl (count)")
    d.add_argument("--code-chars", type=int, default=1_000_000, help="stdlib source in train.jsonl (characters)")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--kind", choices=("corpus", "chat", "pairs"), default="corpus",
                   help="corpus: train/valid.jsonl; chat: sft_train/valid.jsonl (messages); pairs: pairs_train/valid.jsonl "
                        "(prompt, chosen, rejected); chat and pairs use --train-examples / --valid-examples")
    d.set_defaults(func=cmd_make_data)

    tr = sub.add_parser("train", help="post-train: sft, dpo or rl", formatter_class=fmt,
                        description="Run a post-training recipe (TOML) through the training loop: SFT on chat jsonl "
                                    "(CAP with [cap] lam > 0, the T2T editing stream with [diffusion] t2t_ratio > 0), DPO "
                                    "on the ELBO from preference pairs, or EBPO RL with rollouts of the block decoder. "
                                    "Checkpoints, metrics.jsonl and final/ go to --out.")
    tr.add_argument("kind", choices=("sft", "dpo", "rl"), help="must match the recipe's [objective] kind")
    _add_run_args(tr, "recipes/tiny_sft.toml", "run folder: checkpoints/, final/, metrics.jsonl, loss.png",
                  "starting HF folder (a block-diffusion model); overrides [model] path", "cap.lam=2.0")
    tr.set_defaults(func=cmd_train)

    c = sub.add_parser("convert", help="convert an AR checkpoint with a WSD recipe", formatter_class=fmt,
                       description="Run a recipe (TOML): load the AR checkpoint, add a mask token if needed, train "
                                   "through the recipe's phases (block size, steps or tokens, lr), checkpoint, merge "
                                   "the top-k checkpoints, evaluate and write report.md / report.json in --out.")
    _add_run_args(c, "recipes/tiny_wsd.toml", "run folder: checkpoints/, final/, merged/, metrics.jsonl, loss.png, report",
                  "starting HF folder; overrides [model] path of the recipe", "train.batch_size=4")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("merge", help="average the top-k checkpoints of a run", formatter_class=fmt,
                       description="Average the parameters of the k checkpoints with the lowest validation ELBO "
                                   "(same block size) into a new HF folder.")
    m.add_argument("--run", required=True, help="run folder holding checkpoints/")
    m.add_argument("--k", type=int, default=3, help="number of checkpoints to average")
    m.add_argument("--out", required=True, help="output HF folder")
    m.add_argument("--block-size", type=int, default=None,
                   help="only checkpoints evaluated at this block size (tokens; default: the last checkpoint's)")
    m.set_defaults(func=cmd_merge)

    g = sub.add_parser("generate", help="decode prompts", formatter_class=fmt,
                       description="Decode one or more prompts (one batch). Block-diffusion models use the batched "
                                   "engine with an exact block KV cache and the chosen rule: threshold (LLaDA2.0), "
                                   "S or Q (LLaDA2.1 M2T + T2T editing), dinfer, factor (Fast-dLLM) or credit; AR "
                                   "models (or --ar) decode greedily token by token.")
    g.add_argument("--model", required=True, help="HF folder (converted or AR)")
    g.add_argument("--prompt", action="append", help="prompt text, no template applied (repeatable: one batch)")
    g.add_argument("--prompt-file", default=None, help="text file with one prompt per line (added to --prompt)")
    _add_decoding_args(g)
    g.add_argument("--stop", action="append", help="stop string (repeatable); the output is cut before it")
    g.add_argument("--stream", action="store_true", help="print the text as blocks become final (one prompt)")
    g.add_argument("--trace", default=None, help="write every step's events (position, token, M2T/T2T, confidence) "
                                                 "to this JSONL file")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat with a model", formatter_class=fmt,
                        description="Read user turns from stdin, render the conversation with the tokenizer's chat "
                                    "template (a documented default when it has none) and decode each reply with the "
                                    "engine. /reset clears the history, /exit or end of input quits.")
    ch.add_argument("--model", required=True, help="HF folder (converted or AR)")
    ch.add_argument("--system", default=None, help="system prompt (default: none)")
    _add_decoding_args(ch)
    ch.set_defaults(func=cmd_chat)

    t = sub.add_parser("show-trace", help="replay a --trace file step by step", formatter_class=fmt,
                       description="Print one line per decoding step of a row from a `generate --trace` JSONL file: "
                                   "the current block's text, masked slots as '_', this step's writes in [brackets], "
                                   "T2T edits as [old->new].")
    t.add_argument("trace", help="JSONL file written by generate --trace")
    t.add_argument("--row", type=int, default=0, help="prompt index in the batch")
    t.set_defaults(func=cmd_show_trace)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data.documents import DataError
    from .train.loop import TrainingDiverged
    from .train.recipe import RecipeError

    try:
        return args.func(args)
    except (RecipeError, DataError, TrainingDiverged, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"blockdiff {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
