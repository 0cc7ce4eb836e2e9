"""The `blockdiff` command line: a thin layer over the public API (docs/design.md, Code conventions 4).

    blockdiff make-data  write the bundled corpus (synthetic tasks + Python stdlib source) as jsonl, or with
                         --kind chat|pairs the post-training data (SFT conversations, DPO pairs) from the tasks
    blockdiff train      post-train a block-diffusion model: sft (with CAP / T2T options), dpo or rl (EBPO)
    blockdiff convert    AR checkpoint -> block-diffusion checkpoint with a WSD recipe, then a report
    blockdiff merge      average the top-k checkpoints of a run by validation ELBO
    blockdiff generate   decode prompts (one batch) with the engine: threshold, S/Q editing, ...; --stream, --trace
    blockdiff chat       interactive chat with the chat template, decoded by the same engine
    blockdiff serve      OpenAI-compatible HTTP server with continuous batching and the live denoising view
    blockdiff eval       several checkpoints side by side on held-out prompts: accuracy, TPF, the frontier plot
    blockdiff plan       per-device memory of a training run on N devices, from config.json and the recipe
    blockdiff show-trace replay a --trace file step by step (unmasking and edits)
    blockdiff import-gguf import a GGUF checkpoint (llama.cpp) once into an HF folder (docs/real-model.md)

`blockdiff <command> --help` lists a command's flags. Nothing heavy is imported before the arguments parse (torch
loads when a command runs), so help and a mistyped path answer at once.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

from . import __version__

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class _LazyHelp(str):
    """A help text computed only when help is printed, because computing it needs a heavy import."""

    def __new__(cls, make: Callable[[], str]):
        text = super().__new__(cls, "(computed when help is printed)")
        text.make = make
        return text


class _LazySubParsers(argparse._SubParsersAction):
    """Subcommands whose parser is built only when chosen: a verb whose flags need a heavy import at build time (eval's
    module imports torch) is a stub until then, so `blockdiff --help` and the other verbs never pay for it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, Callable] = {}

    def add_lazy(self, name: str, help: str, build: Callable) -> None:
        self.add_parser(name, help=help)
        self.lazy[name] = build

    def __call__(self, parser, namespace, values, option_string=None):
        build = self.lazy.pop(values[0], None)
        if build is not None:  # replace the stub by the real parser
            del self._name_parser_map[values[0]]
            self._choices_actions = [a for a in self._choices_actions if a.dest != values[0]]
            build(self)
        super().__call__(parser, namespace, values, option_string)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it says something: not for required flags, flags without a default,
    switches, or help texts that already state their default."""

    def _get_help_string(self, action):
        text = action.help.make() if isinstance(action.help, _LazyHelp) else action.help or ""
        if (action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text
                or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))):
            return text
        return text + " (default: %(default)s)"


def _flags(message: str, fields) -> str:
    """An error from a config class speaks of its fields (max_new_tokens); on the command line say the flag."""
    for name in sorted(fields, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){name}(?!\w)", "--" + name.replace("_", "-"), message)
    return message


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
    for flag, value in (("--train-examples", args.train_examples), ("--valid-examples", args.valid_examples),
                        ("--code-chars", args.code_chars)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
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


def _existing(path: str, what: str) -> Path:
    """A path a command reads, checked before its heavy imports so that a mistyped path is one line at once (the
    loaders check the contents)."""
    if not Path(path).exists():
        raise FileNotFoundError(errno.ENOENT, f"{what} not found", path)
    return Path(path)


def _run_recipe(args):
    """The recipe of a recipe-running command (convert, train): --recipe with --set and --model applied."""
    _existing(args.recipe, "recipe file")
    if args.model:
        _existing(args.model, "model folder")
    from .train.recipe import load_recipe

    overrides = _parse_set(args.set)
    if args.model:
        overrides["model.path"] = str(Path(args.model).resolve())
    return load_recipe(args.recipe, overrides)


def cmd_convert(args) -> int:
    recipe = _run_recipe(args)
    from .convert import print_report, run_conversion

    res = run_conversion(recipe, args.out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if res.report:  # empty on torchrun ranks other than 0
        print_report(res.report)
        print(f"model: {res.model_dir}\nreport: {res.report_path}")
    return 0


def cmd_train(args) -> int:
    recipe = _run_recipe(args)
    from .train.loop import train
    from .train.recipe import RecipeError

    if recipe.objective.kind != args.kind:
        raise RecipeError(f"{args.recipe}: [objective] kind is {recipe.objective.kind!r} but the command is "
                          f"`blockdiff train {args.kind}`; use a {args.kind} recipe")
    res = train(recipe, args.out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    last = res.evals[-1] if res.evals else None
    summary = {"steps": res.steps, "model": str(res.final_dir), "wall_s": round(res.wall_s, 1)}
    if last:
        summary["val_elbo_nll"] = round(last["val_nll"], 4)
    print(json.dumps(summary))
    return 0


def cmd_merge(args) -> int:
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.block_size is not None and args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    _existing(args.run, "run folder")
    from .train.merge import merge_top_k

    res = merge_top_k(args.run, args.k, args.out, block_size=args.block_size)
    for c, nll in res.chosen:
        print(f"  {c.name}: val NLL {nll:.4f} nats/token")
    if len(res.chosen) < args.k:
        print(f"[blockdiff] --k {args.k}: the run has only {len(res.chosen)} checkpoint(s) with a validation score at "
              f"block size {res.block_size}; averaged those", file=sys.stderr)
    print(f"averaged {len(res.chosen)} checkpoints at block size {res.block_size} -> {res.out}")
    return 0


def _decode_config(args):
    """The decoding flags as a DecodeConfig, checked before anything loads; errors name the flag, not the field.
    --block-size 0 leaves the block size to the checkpoint: the caller resolves it with `.for_model(model)`."""
    import dataclasses

    from .decode.config import MODES, DecodeConfig

    mode = {m.lower(): m for m in MODES}.get(args.mode.lower())  # any case: --mode s is S
    if mode is None:
        raise ValueError(f"--mode {args.mode}: not a decoding mode; choose one of {', '.join(MODES)}")
    if mode == "joint" and (args.threshold is None or args.edit_threshold is None):
        raise ValueError("--mode joint takes your thresholds: give --threshold and --edit-threshold "
                         "(S and Q are the presets)")
    fields = dict(mode=mode, block_size=args.block_size or None, steps=args.steps, threshold=args.threshold,
                  edit_threshold=args.edit_threshold, max_post_steps=args.max_post_steps,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, ignore_eos=args.ignore_eos, repeat_penalty=args.repeat_penalty,
                  eos_fill=args.eos_fill)
    if args.draft_len is not None:
        fields["draft_len"] = args.draft_len
    if getattr(args, "window", 0):
        fields["window"] = args.window
    if args.block_size is not None and args.block_size < 0:
        raise ValueError(f"--block-size must be >= 0 (0 = the model's), got {args.block_size}")
    try:
        return DecodeConfig(**fields)
    except ValueError as e:
        raise ValueError(_flags(str(e), [f.name for f in dataclasses.fields(DecodeConfig)])) from None


def _threads(args) -> int:
    """--threads (0 = the cores the machine's load leaves free, blockdiff/machine.py), applied to torch."""
    from .machine import set_threads

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = auto), got {args.threads}")
    return set_threads(args.threads)


def _read_prompt_file(path_str: str) -> list[str]:
    path = Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path}: not UTF-8 text ({e.reason} at byte {e.start}); give one "
                         "prompt per line") from None
    return [line.rstrip("\n") for line in text.splitlines() if line.strip()]


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
    texts = list(args.prompt or [])
    if args.prompt_file:
        texts += _read_prompt_file(args.prompt_file)
    if not texts:
        raise ValueError("give at least one --prompt (or --prompt-file with one prompt per line)")
    if args.stream and len(texts) > 1:
        raise ValueError(f"--stream prints one prompt as it decodes; got {len(texts)} prompts (drop --stream to "
                         "decode them as one batch)")
    _existing(args.model, "model folder")
    cfg = _decode_config(args)
    import torch

    from .decode.engine import find_stop
    from .load import load_checkpoint

    threads = _threads(args)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    loaded = load_checkpoint(args.model)
    tok = loaded.tokenizer
    prompts = [tok.encode(t) for t in texts]
    for k, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {k + 1} is empty after tokenisation")
    info = loaded.info
    cfg = cfg.for_model(loaded.model)
    try:
        gens, seconds = _generate(args, loaded, prompts, cfg, gen)
    except ValueError as e:  # the engine's checks (context length, prompt tokens) speak of fields: say the flags
        raise ValueError(_flags(str(e), ["max_new_tokens", "block_size"])) from None
    _note_decoding_kind(args, loaded)
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
          f"{n / max(seconds, 1e-9):.1f} tokens/s, {threads} thread(s)]", file=sys.stderr)
    return 0


def _generate(args, loaded, prompts, cfg, gen):
    """Decode for `cmd_generate`: AR (no trace / stream) or block decoding with the trace and stream callbacks.
    Returns (generations, seconds)."""
    tok, info = loaded.tokenizer, loaded.info
    if args.ar or info is None:
        for flag, on in (("--stream", args.stream), ("--trace", args.trace)):
            if on:
                raise ValueError(f"{flag} shows block decoding; this run decodes autoregressively (drop {flag})")
        gens = loaded.generate(prompts, cfg, ar=True, generator=gen)
        return gens, sum(g.seconds for g in gens)
    callbacks = []
    trace = None
    if args.trace:
        from .decode.trace import TraceWriter

        trace = TraceWriter(args.trace, cfg, prompts, mask_id=info.mask_token_id, eos_ids=tok.eos_ids,
                            token_text=lambda t: tok.decode([t]))
        callbacks.append(trace)
    if args.stream:
        callbacks.append(_StreamPrinter(tok, tok.eos_ids, args.stop or ()))

    def on_step(u):
        for f in callbacks:
            f(u)

    try:
        gens = loaded.generate(prompts, cfg, generator=gen, stop=args.stop or (), on_step=on_step if callbacks else None)
    except BaseException:
        if trace is not None:
            trace.close(None)
        raise
    if trace is not None:
        trace.close(gens)
    return gens, max(g.seconds for g in gens)


def _note_decoding_kind(args, loaded) -> None:
    """Say on stderr when the decoding kind is not the checkpoint's own (never silently)."""
    if not loaded.is_diffusion and not args.ar:
        print(f"[blockdiff] {args.model} has no blockdiff diffusion section: decoding it as an AR model",
              file=sys.stderr)
    elif loaded.is_diffusion and args.ar:
        print(f"[blockdiff] --ar: decoding the block-diffusion checkpoint {args.model} one token per forward with "
              "its clean stream; it was trained for block decoding", file=sys.stderr)


def cmd_chat(args) -> int:
    """Interactive chat: each user line is appended to the conversation, the conversation is rendered with the
    tokenizer's chat template (the documented default when it has none, data/chat_template.py) and decoded with the engine;
    the reply is cut at the template's end-of-turn marker. /reset clears the history, /exit (or EOF) quits."""
    _existing(args.model, "model folder")
    cfg = _decode_config(args)
    import torch

    from .data.chat_template import ChatTemplate, answer_text
    from .load import load_checkpoint

    _threads(args)
    gen = torch.Generator().manual_seed(args.seed)
    loaded = load_checkpoint(args.model)
    tok = loaded.tokenizer
    template = ChatTemplate(tok)
    cfg = cfg.for_model(loaded.model)
    _note_decoding_kind(args, loaded)
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
    path = Path(args.trace)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    from .decode.trace import read_trace, render_trace

    for line in render_trace(read_trace(path), args.row):
        print(line)
    return 0


def cmd_import_gguf(args) -> int:
    from .model.gguf_import import import_gguf

    res = import_gguf(args.src, args.out, overwrite=args.overwrite)
    types = ", ".join(f"{n} {k}" for k, n in sorted(res.tensor_types.items()))
    print(f"imported {res.source} ({res.architecture}, {res.num_parameters:,} parameters; tensors: {types}) "
          f"-> {res.out}")
    return 0


def _add_run_args(p, recipe_example: str, out_help: str, model_help: str, set_example: str) -> None:
    """The flags every recipe-running command shares (convert, train)."""
    p.add_argument("--recipe", required=True, help=f"recipe file (TOML), e.g. {recipe_example}")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous run in --out first (refused if it holds files a run does not write)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help=f"override a recipe field (repeatable), e.g. --set {set_example} (value parsed as JSON)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _mode_help() -> str:
    """--mode's help: every mode with its default thresholds, read from MODES (the one place they are declared;
    imported only when help is printed, as it imports torch)."""
    from .decode.config import MODES

    about = {"threshold": "LLaDA2.0", "S": "LLaDA2.1 speed", "Q": "LLaDA2.1 quality", "joint": "LLaDA2.1, your thresholds",
             "dinfer": "dInfer threshold", "factor": "Fast-dLLM factor rule", "credit": "dInfer credit",
             "spec": "lossless self-speculation, the checkpoint's own AR output; threshold cuts its drafts"}

    def defaults(mode: str) -> str:
        _, m2t, t2t = MODES[mode]
        return f"M2T {m2t}" + (f", T2T {t2t}" if t2t is not None else "")

    return "decoding rule, any case (default thresholds): " + "; ".join(
        f"{m} = {about.get(m, m)} ({defaults(m)})" for m in MODES)


def _add_decoding_args(g) -> None:
    g.add_argument("--mode", default="threshold", metavar="MODE", help=_LazyHelp(_mode_help))
    g.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per prompt (tokens)")
    g.add_argument("--block-size", type=int, default=0,
                   help="block size B in tokens; 0 = the model's trained block size (default: 0)")
    g.add_argument("--steps", type=int, default=32, help="denoising steps per block (capped at --max-new-tokens); fallback commits per step: "
                   "floor(B/steps), one more on the first B %% steps steps (the official LLaDA2 schedule)")
    g.add_argument("--threshold", type=float, default=None,
                   help="M2T: unmask slots with confidence above this (0-1; default: the mode's)")
    g.add_argument("--edit-threshold", type=float, default=None,
                   help="T2T: edit a token when the model prefers another with probability above this (0-1; S/Q/joint)")
    g.add_argument("--max-post-steps", type=int, default=16, help="edit-only passes after a block fills (S/Q/joint)")
    g.add_argument("--window", type=int, default=0,
                   help="block modes: feed only this many slots from the decoded frontier per forward (0 = whole "
                        "blocks, the official algorithms; needs a shift + causal checkpoint; docs/decoding.md)")
    g.add_argument("--draft-len", type=int, default=None,
                   help="spec: tokens drafted per forward (0 = plain AR steps; default: DecodeConfig's)")
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
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 = the cores the machine's load leaves free (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockdiff", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_LazySubParsers)
    fmt = _HelpFormatter

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

    gg = sub.add_parser("import-gguf", help="import a GGUF checkpoint into an HF folder", formatter_class=fmt,
                        description="Dequantise a llama / qwen2 / qwen3 GGUF file once into an HF folder (fp32 "
                                    "safetensors, tokenizer.json with the chat template, generation_config.json) that "
                                    "every blockdiff command reads. Needs the gguf extra. See docs/real-model.md.")
    gg.add_argument("src", help="a .gguf file, or a folder holding exactly one")
    gg.add_argument("--out", required=True, help="output HF folder (must not exist)")
    gg.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    gg.set_defaults(func=cmd_import_gguf)

    def add_eval(sub_):
        from .eval.command import add_eval_parser  # imports torch (eval/frontier.py): only for `blockdiff eval`

        add_eval_parser(sub_, fmt)

    sub.add_lazy("eval", "evaluate checkpoints side by side (accuracy, TPF, frontier plot)", add_eval)

    from .serve.command import add_serve_parser

    add_serve_parser(sub, _add_decoding_args, _decode_config, fmt)

    from .train.plan import add_plan_parser

    add_plan_parser(sub, fmt)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input -> one line `blockdiff <cmd>: error: ...` and exit 2; Ctrl-C -> one line (with how
    to continue a training run) and exit 130; a closed pipe (`... | head`) -> stop quietly."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"blockdiff {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`show-trace ... | head`): stop as Unix tools do, and keep Python from complaining
        # about the closed stdout while it shuts down
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:  # RecipeError and DataError are ValueErrors
        return _usage_error(args, e)
    except RuntimeError as e:
        # training's own ends; imported only here (train.loop imports torch) so that parsing and bad input stay fast
        from .train.loop import TrainingDiverged, TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            verb = f"{args.command} {args.kind}" if args.command == "train" else args.command
            extra = "".join(f" --set {x}" for x in args.set or [])
            print(f"blockdiff {args.command}: interrupted: {e}; continue with: blockdiff {verb} --recipe "
                  f"{args.recipe} --out {args.out}{' --model ' + args.model if args.model else ''}{extra} --resume",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
        if isinstance(e, TrainingDiverged):
            return _usage_error(args, e)
        raise


def _usage_error(args, e: Exception) -> int:
    message = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
    print(f"blockdiff {args.command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
