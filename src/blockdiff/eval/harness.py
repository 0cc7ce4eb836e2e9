"""blockdiff as an lm-evaluation-harness model (the `eval` extra: `pip install -e ".[eval]"`).

    python -m blockdiff.eval.harness --model blockdiff --model_args model=assets/tiny-bd,mode=S \
        --tasks blockdiff_tasks_gen blockdiff_tasks_mc

That line is `lm_eval` with the `blockdiff` model registered and blockdiff's offline task folder added to
`--include_path`; every lm_eval flag works as usual. Why not plain `lm_eval --model blockdiff`: lm-eval 0.4.x
resolves `--model` names only from its own built-in table and from classes already imported into the running
process (`register_model`); it reads no entry points, so a package cannot make itself visible to the bare `lm_eval`
command (LLaDA's and dllm's harness models ship the same kind of launcher). In Python, `import
blockdiff.eval.harness` registers the name for `lm_eval.simple_evaluate(model="blockdiff", ...)`.

Model arguments (`--model_args k=v,...`):
  model         HF folder (required): an AR parent or a block-diffusion checkpoint
  mode          block decoding mode for generate_until (default S; any of decode.config.MODES); AR checkpoints
                always decode greedily, and `ar=true` decodes a block-diffusion checkpoint autoregressively
  threshold, edit_threshold, block_size, steps, eos_fill   the decoding setting (defaults: the mode's, the
                checkpoint's B, 32 steps)
  max_gen_toks  default generation budget when a task gives none (tokens, default 256)
  mc_samples    Monte Carlo samples of the ELBO per log-likelihood request (default 32)
  seed          noise seed of the ELBO (default 0): results are deterministic at a fixed seed
  greedy_check  block-diffusion checkpoints: set loglikelihood's is_greedy by decoding the context (one decode per
                request; default false: is_greedy is False, as in LLaDA's harness model)
  batch_size    prompts per engine call and (x mc_samples) rows per ELBO forward (default 16; the launcher passes
                16 when --batch_size is not given, since lm_eval's own default of 1 would override it)
  device, dtype, threads   (the launcher passes --device cpu without a GPU: lm_eval's default is cuda:0)
generate_until honours each request's `until` stop strings (cut before the first), `max_gen_toks` and the
chat template (`--apply_chat_template`: the tokenizer's template, else blockdiff's default); decoding is greedy
(temperature 0; `do_sample` / `temperature` in gen_kwargs are honoured for AR and block decoding alike).
loglikelihood is exact for AR checkpoints and the ELBO for block-diffusion ones (eval/likelihood.py);
loglikelihood_rolling sums disjoint windows of the model's context length. Each request type shows a tqdm bar on
stderr (requests done, rate, time left), as lm-eval's own models do.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.model import LM
from tqdm import tqdm
from lm_eval.api.registry import register_model

from ..decode.engine import find_stop
from ..load import load_checkpoint
from .harness_data import TASKS_DIR
from .likelihood import elbo_loglikelihood, ar_loglikelihood, rolling_windows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bool(name: str, v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"model_args {name}={v!r}: expected true or false")


def _num(name: str, v, kind=int, lo=None, hi=None):
    if v is None or v == "":
        return None
    try:
        x = kind(v)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name}={v!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise ValueError(f"model_args {name}={v!r}: must lie in [{lo}, {'inf' if hi is None else hi}]")
    return x


@register_model("blockdiff")
class BlockdiffLM(LM):
    def __init__(self, model: str | None = None, pretrained: str | None = None, mode: str = "S",
                 threshold=None, edit_threshold=None, block_size=None, steps=32, eos_fill=False, ar=False,
                 max_gen_toks=256, mc_samples=32, seed=0, batch_size=16, device="cpu", dtype="float32", threads=0,
                 greedy_check=False, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"model_args: unknown {', '.join(sorted(unknown))}; allowed: model, mode, threshold, "
                             "edit_threshold, block_size, steps, eos_fill, ar, max_gen_toks, mc_samples, seed, "
                             "greedy_check, batch_size, device, dtype, threads")
        folder = model or pretrained
        if not folder:
            raise ValueError("model_args: model=FOLDER is required (an HF folder: AR parent or block diffusion)")
        if not (Path(folder) / "config.json").is_file():
            raise ValueError(f"model_args model={folder}: not a model folder (no config.json)")
        if str(dtype) not in DTYPES:
            raise ValueError(f"model_args dtype={dtype!r}: allowed {', '.join(DTYPES)}")
        threads = _num("threads", threads, lo=0) or 0
        if threads:
            torch.set_num_threads(threads)
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval passes --device (default "cuda") to every model; without a GPU run on the CPU, as HF models do
            print(f"blockdiff harness: device {device!r} is not available here; using the CPU", file=sys.stderr)
            device = "cpu"
        self.loaded = load_checkpoint(folder, device=device, dtype=DTYPES[str(dtype)])
        self.tok = self.loaded.tokenizer
        self._device = torch.device(device)
        self.ar = _bool("ar", ar) or not self.loaded.is_diffusion
        if str(batch_size).startswith("auto"):
            batch_size = 16
        self.batch_size = _num("batch_size", batch_size, lo=1)
        self.max_gen_toks = _num("max_gen_toks", max_gen_toks, lo=1)
        self.mc_samples = _num("mc_samples", mc_samples, lo=1)
        self.seed = _num("seed", seed)
        self.greedy_check = _bool("greedy_check", greedy_check)
        self.decode_fields = dict(mode=str(mode), threshold=_num("threshold", threshold, float, 0.0, 1.0),
                                  edit_threshold=_num("edit_threshold", edit_threshold, float, 0.0, 1.0),
                                  block_size=_num("block_size", block_size, lo=1), steps=_num("steps", steps, lo=1),
                                  eos_fill=_bool("eos_fill", eos_fill))
        if self.loaded.is_diffusion:  # check the setting now: one clear error before any request runs
            self.loaded.decode_config(**self.decode_fields, max_new_tokens=1)
        self._template = None

    # ---- what lm-eval asks of a model -------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.loaded.path).replace("/", "__")

    def chat_template(self, chat_template=False) -> str | None:
        return self._chat().source if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._chat().render(list(chat_history), add_generation_prompt=add_generation_prompt)

    def _chat(self):
        if self._template is None:
            from ..data.chat_template import ChatTemplate

            self._template = ChatTemplate(self.tok)
        return self._template

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as one text is tokenised (the continuation's first token may merge
        across the boundary), the context empty -> EOS as the only context token."""
        if not context:
            return [self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id], self.tok.encode(continuation)
        whole = self.tok.encode(context + continuation)
        n = len(self.tok.encode(context))
        if n >= len(whole):  # the continuation merged into the context's last token: keep one token of it
            n = len(whole) - 1
        return whole[:n], whole[n:]

    def _scores(self, pairs):
        m = self.loaded.model
        if self.ar and not self.loaded.is_diffusion:
            return ar_loglikelihood(m, pairs, batch_size=self.batch_size)
        if self.ar:  # a block-diffusion checkpoint read autoregressively: its logit i predicts token i + 1 only
            if not self.loaded.info.shift:  # with shifted labels (docs/alignment.md)
                raise ValueError(f"model_args ar=true: {self.loaded.path} has same-position labels; its logits are "
                                 "not next-token predictions, so it has no AR log-likelihood (drop ar=true)")
            return ar_loglikelihood(m, pairs, batch_size=self.batch_size)
        return elbo_loglikelihood(m, pairs, samples=self.mc_samples, seed=self.seed,
                                  batch_size=self.batch_size * self.mc_samples,
                                  block_size=self.decode_fields["block_size"])

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._split(*r.args) for r in requests]
        scores = self._scores_with_progress(pairs, disable_tqdm)
        if self.ar or not self.greedy_check:
            return [(s.logprob, s.is_greedy) for s in scores]
        return [(s.logprob, g) for s, g in zip(scores, self._decodes_to(pairs))]

    def _scores_with_progress(self, pairs, disable_tqdm: bool = False):
        """`_scores` over `pairs` a few forwards at a time, with a progress bar. The requests are ordered longest
        first, as likelihood.py orders them, and cut into whole batches (`batch_size` requests), so every forward
        holds the same rows as one call over all of them would (the scores do not depend on the batch anyway)."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        step = self.batch_size * 4  # four forwards between updates: the bar moves every few seconds on a CPU
        out = [None] * len(pairs)
        with tqdm(total=len(pairs), desc="Running loglikelihood requests", disable=disable_tqdm) as bar:
            for s in range(0, len(order), step):
                idx = order[s:s + step]
                for i, sc in zip(idx, self._scores([pairs[i] for i in idx])):
                    out[i] = sc
                bar.update(len(idx))
        return out

    def _decodes_to(self, pairs) -> list[bool]:
        """greedy_check for block-diffusion checkpoints: does decoding the context with this model's setting (the
        batched engine, temperature 0, a budget of the continuation's length) produce exactly the continuation?
        LLaDA's harness model offers the same check; it costs one decode per request."""
        out = []
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s:s + self.batch_size]
            budget = max(len(c) for _, c in chunk)
            cfg = self.loaded.decode_config(**self.decode_fields, max_new_tokens=budget)
            gens = self.loaded.generate([list(ctx) for ctx, _ in chunk], cfg)
            for (_, cont), g in zip(chunk, gens):
                out.append(list(g.tokens[:len(cont)]) == list(cont))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        max_len = getattr(self.loaded.model.cfg, "max_position_embeddings", None) or 2048
        prefix = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
        out = []
        for r in tqdm(requests, desc="Running loglikelihood_rolling requests", disable=disable_tqdm):
            windows = rolling_windows(self.tok.encode(r.args[0]), prefix, max_len)
            out.append(sum(s.logprob for s in self._scores(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation through the batched engine (AR greedy for AR checkpoints), requests grouped by their
        generation arguments; each output is cut before the first stop string."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[repr(sorted(r.args[1].items(), key=lambda kv: kv[0]))].append(i)
        bar = tqdm(total=len(requests), desc="Running generate_until requests", disable=disable_tqdm)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0) or 0.0) if _bool("do_sample", kw.pop("do_sample", False)) \
                else 0.0
            if self.ar:
                cfg = self.loaded.decode_config(max_new_tokens=budget, temperature=temperature)
            else:
                cfg = self.loaded.decode_config(**self.decode_fields, max_new_tokens=budget, temperature=temperature)
            gen = torch.Generator().manual_seed(self.seed) if temperature > 0 else None
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                prompts = [self.tok.encode(requests[i].args[0]) for i in chunk]
                gens = self.loaded.generate(prompts, cfg, ar=self.ar, generator=gen, stop=tuple(until))
                for i, g in zip(chunk, gens):
                    text = self.tok.decode(g.tokens)
                    cut = find_stop(text, until)
                    out[i] = text if cut is None else text[:cut]
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


def launcher_argv(argv: list[str], cuda: bool) -> list[str]:
    """lm_eval's argv for the launcher: blockdiff's task folder on --include_path, and the flags whose lm_eval
    defaults are wrong here unless given: --device (lm_eval's default cuda:0 on a machine without CUDA would only
    earn a fallback note) and, for `--model blockdiff`, --batch_size (lm_eval's default 1 overrides the model's 16
    and runs the ELBO one request per forward: 19 minutes instead of about 3 on the bundled tasks)."""
    argv = list(argv)

    def given(flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    if not given("--include_path"):
        argv += ["--include_path", str(TASKS_DIR)]
    if not given("--device"):
        argv += ["--device", "cuda" if cuda else "cpu"]
    blockdiff = "--model=blockdiff" in argv or any(a == "--model" and b == "blockdiff" for a, b in zip(argv, argv[1:]))
    if blockdiff and not given("--batch_size"):
        argv += ["--batch_size", "16"]
    return argv


def main(argv: list[str] | None = None) -> None:
    """`lm_eval` with the blockdiff model registered, the offline tasks on --include_path and its defaults set."""
    argv = launcher_argv(sys.argv[1:] if argv is None else argv, torch.cuda.is_available())
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
