"""Build the bundled tiny AR base model from nothing: tokenizer + Llama-style decoder pretrained with the AR
objective on synthetic tasks and Python standard-library source, then measure its held-out task accuracy.

    python scripts/make_base_model.py --out assets/tiny-ar [--steps 1500]

Everything runs through the same code users run (data writer, packing, the one training loop with the `ar`
objective, the KV-cache decoder). The result is committed to the repo so users never need to run this.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from blockdiff.data.bundled import BundledCorpus, write_bundled_corpus
from blockdiff.data.tasks import generate_examples
from blockdiff.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer
from blockdiff.decode.engine import ar_generate
from blockdiff.eval.task_accuracy import evaluate_tasks
from blockdiff.model.config import ModelConfig
from blockdiff.load import load_checkpoint
from blockdiff.model.hf_io import save_pretrained
from blockdiff.model.transformer import Transformer
from blockdiff.train.loop import train
from blockdiff.train.recipe import parse_recipe

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen uses; the bundled model is not chat-tuned, the template is there for SFT later.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/tiny-ar", help="output HF folder (default: assets/tiny-ar)")
    ap.add_argument("--work", default="runs/make-base", help="scratch folder for data, checkpoints, logs")
    ap.add_argument("--steps", type=int, default=1500, help="AR pretraining steps (default: 1500)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows of 256 tokens per step (default: 16)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    ap.add_argument("--train-examples", type=int, default=300_000, help="synthetic task examples (default: 300000)")
    ap.add_argument("--code-chars", type=int, default=3_000_000, help="stdlib source characters (default: 3e6)")
    ap.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (default: 1024)")
    ap.add_argument("--eval-prompts", type=int, default=400, help="held-out task prompts to score (default: 400)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in --work (same arguments)")
    args = ap.parse_args()

    t0 = time.time()
    work = Path(args.work)
    init = work / "init"
    if args.resume and (work / "run" / "checkpoints").is_dir():
        corpus = BundledCorpus(work / "data" / "train.jsonl", work / "data" / "valid.jsonl")
    else:
        if work.exists():
            shutil.rmtree(work)
        corpus = write_bundled_corpus(work / "data", train_examples=args.train_examples,
                                      train_code_chars=args.code_chars, seed=args.seed)
        texts = [json.loads(line)["text"] for line in corpus.train.read_text().splitlines()]
        tok = train_bpe_tokenizer(texts, args.vocab, SPECIALS)
        init.mkdir(parents=True)
        save_tokenizer(tok, init, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
                       model_max_length=2048)
    tk = load_tokenizer(init)
    cfg = ModelConfig(family="llama", vocab_size=tk.vocab_size, hidden_size=args.hidden,
                      intermediate_size=int(args.hidden * 2.6875) // 16 * 16, num_layers=args.layers,
                      num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 128), head_dim=64,
                      rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
                      hf_extra={"bos_token_id": None, "eos_token_id": tk.eos_id, "pad_token_id": tk.pad_id})
    if not (init / "config.json").exists():
        torch.manual_seed(args.seed)
        model = Transformer(cfg)
        model.init_weights(seed=args.seed)
        save_pretrained(model, init, tokenizer=tk)
    print(f"model: {cfg.num_parameters() / 1e6:.2f}M parameters, vocab {cfg.vocab_size}")
    recipe = parse_recipe({
        "model": {"path": str(init)},
        "data": {"train": [str(corpus.train)], "valid": [str(corpus.valid)], "seq_len": 256, "valid_rows": 32},
        "train": {"batch_size": args.batch_size, "seed": args.seed, "warmup_steps": 100,
                  "decay_steps": args.steps // 5, "min_lr_ratio": 0.05, "eval_every": 250, "save_every": 250,
                  "keep_last": 1, "weight_decay": 0.1},
        "objective": {"kind": "ar"},
        "phases": [{"name": "ar-pretrain", "block_size": 1, "lr": args.lr, "steps": args.steps}],
    }, source="make_base_model")
    result = train(recipe, work / "run", resume=args.resume)
    final = load_checkpoint(result.final_dir).model
    examples = generate_examples("heldout", args.eval_prompts, seed=123)
    acc = evaluate_tasks(examples, tk, lambda ids: ar_generate(final, ids, max_new_tokens=24, eos_ids=tk.eos_ids))
    out = Path(args.out)
    report = {
        "parameters": cfg.num_parameters(),
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": 256,
        "train_tokens": args.steps * args.batch_size * 256,
        "val_nll": result.evals[-1]["val_nll"] if result.evals else None,
        "heldout_task_accuracy": acc["accuracy"], "per_task": acc["per_task"], "eval_prompts": acc["n"],
        "samples": acc["samples"][:4], "wall_s": round(time.time() - t0, 1), "torch": torch.__version__,
    }
    save_pretrained(final, out, tokenizer=tk, extra_files={"base_model_report.json": report})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
