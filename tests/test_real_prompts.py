"""Checkable chat prompts for a real parent (data/real_prompts.py), the self-distillation corpus script and
`blockdiff eval --checked / --ppl` (issue 22 parts 3-4)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from blockdiff.data.documents import DataError
from blockdiff.data.real_prompts import (
    CAPITALS, CODE_TASKS, FAMILIES, check_answer, checked_prompts, corpus_prompts, read_checked_prompts,
    run_python_check, split_of, write_checked_prompts,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_AR = ROOT / "assets" / "tiny-ar"
TINY_BD = ROOT / "assets" / "tiny-bd"


def test_held_out_splits_are_disjoint_from_the_corpus_and_each_other():
    dev, final = checked_prompts("dev"), checked_prompts("final")
    assert len(dev) >= 100 and len(final) >= 100 and len(dev) + len(final) >= 280
    assert {p.task for p in dev} == {p.task for p in final} == set(FAMILIES)
    assert not {p.prompt for p in dev} & {p.prompt for p in final}
    corpus = set(corpus_prompts(3000, seed=0))
    for p in dev + final:
        assert p.prompt not in corpus
    # no held-out country, element, code task ... is even mentioned by a corpus prompt of its family
    held_countries = [c for c in CAPITALS if split_of("capital:" + c) != "train"]
    assert held_countries and not any(f"capital of {c}?" in q or f"capital city of {c}." in q
                                      for c in held_countries for q in corpus)
    held_code = [n for n, *_ in CODE_TASKS if split_of("code:" + n) != "train"]
    assert held_code and not any(f"`{n}(" in q for n in held_code for q in corpus)


def test_corpus_prompts_are_deterministic_and_varied():
    a, b = corpus_prompts(500, seed=3), corpus_prompts(500, seed=3)
    assert a == b and a != corpus_prompts(500, seed=4)
    assert len(set(a)) >= 0.95 * 500  # a few arithmetic questions repeat (their pairs are drawn at random)


@pytest.mark.parametrize("check,answers,text,ok", [
    ("contains", ("Paris",), "The capital of France is Paris.", True),
    ("contains", ("Paris",), "The capital is Parisville.", False),  # whole words only
    ("contains", ("cold",), "COLD", True),
    ("symbol", ("Au",), "The symbol for gold is Au.", True),
    ("symbol", ("Au",), "the symbol is au", False),  # case-sensitive
    ("symbol", ("O",), "Oxygen", False),
    ("number", ("68",), "23 + 45 = 68.", True),
    ("number", ("68",), "The sum is 68, I think.", True),
    ("number", ("24",), "2 * 12 = 24\n\nThis is how to calculate 2 times 12.", True),  # operands skipped
    ("number", ("29",), "50 - 21 = 11, so the answer is 29.", False),  # the first new number counts
    ("number", ("1000",), "There are 1,000 grams in a kilogram.", True),
    ("number", ("-3",), "1 - 4 = -3", True),
    ("number", ("7",), "seven", False),
    ("yesno", ("yes",), "Yes.", True),
    ("yesno", ("yes",), "Yes, the sun is a star.", False),  # more than 4 words: the format was not followed
    ("yesno", ("no",), "No", True),
    ("yesno", ("no",), "", False),
])
def test_answer_checks(check, answers, text, ok):
    prompt = {"68": "What is 23 plus 45?", "24": "What is 2 times 12?", "29": "What is 50 minus 21?",
              "-3": "What is 1 minus 4?"}.get(answers[0], "")
    assert check_answer(check, answers, text, prompt) is ok


def test_python_check_runs_the_code_in_a_separate_interpreter():
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert check_answer("python", ("add(2, 3) == 5",), good)
    assert not check_answer("python", ("add(2, 3) == 5",), good.replace("a + b", "a - b"))
    assert not check_answer("python", ("add(2, 3) == 5",), "I cannot write code.")  # SyntaxError
    assert check_answer("python", ("square(3) == 9",), "def square(x):\n    return x * x")  # unfenced
    assert not run_python_check("while True:\n    pass", ("True",), timeout=1.0)  # killed at the limit
    # the child cannot touch this process: a failing exit or an exception is just a wrong answer
    assert not run_python_check("import sys\nsys.exit(3)", ("True",))
    with pytest.raises(ValueError, match="unknown check 'nope'"):
        check_answer("nope", ("x",), "x")


def test_checked_prompt_files_round_trip_and_bad_lines_name_file_and_field(tmp_path):
    prompts = checked_prompts("dev")[:5]
    f = tmp_path / "p.jsonl"
    write_checked_prompts(f, prompts)
    assert read_checked_prompts(f) == prompts
    cases = {
        "{not json": "not valid JSON",
        json.dumps({"task": "x", "prompt": "q", "check": "regex", "answers": ["a"]}): "field 'check' is 'regex'",
        json.dumps({"task": "x", "prompt": "", "check": "contains", "answers": ["a"]}): "field 'prompt'",
        json.dumps({"task": "x", "prompt": "q", "check": "contains", "answers": []}): "field 'answers'",
    }
    for line, msg in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(prompts[0].as_json()) + "\n" + line + "\n")
        with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{msg}"):
            read_checked_prompts(bad)


def _blockdiff(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "blockdiff.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_eval_checked_scores_with_the_prompts_rules_and_the_chat_template(tmp_path):
    """`blockdiff eval --checked`: each output is the checkpoint's own greedy answer to the prompt rendered with
    its chat template (checked against an independent AR decode of that rendering), scored by the prompt's rule
    (recomputed here), agreement against the first model, and perplexity equal to HF transformers' on the same
    tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blockdiff.data.chat_template import ChatTemplate, answer_text, encode_prompt, user_turn
    from blockdiff.load import load_checkpoint

    ppl = tmp_path / "ppl.jsonl"
    ppl.write_text("".join(json.dumps({"prompt": f"add {i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(3, 7)))
    out = tmp_path / "ev"
    r = _blockdiff("eval", "--model", f"parent={TINY_AR}", "--model", f"bd={TINY_BD}", "--checked", "dev",
                   "--prompts", "6", "--modes", "Q", "--max-new-tokens", "8", "--no-frontier", "--threads", "1",
                   "--ppl", str(ppl), "--ppl-samples", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((out / "eval.json").read_text())
    assert d["prompts"]["split"] == "real-dev" and d["prompts"]["n"] == 6
    parent, bd = d["models"]
    ar = parent["rows"]["AR"]
    assert ar["agree"] == 1.0 and d["prompts"]["reference"] == "parent AR"
    q = bd["rows"]["Q"]
    assert q["agree"] == sum(a == b for a, b in zip(q["outputs"], ar["outputs"])) / 6
    # the sample the command drew, rebuilt here
    import random
    all_dev = checked_prompts("dev")
    sample = [all_dev[i] for i in sorted(random.Random(123).sample(range(len(all_dev)), 6))]
    loaded = load_checkpoint(TINY_AR)
    tok = loaded.tokenizer
    tmpl = ChatTemplate(tok)
    hf = AutoModelForCausalLM.from_pretrained(TINY_AR, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(TINY_AR)
    for ex, text, ok in zip(sample, ar["outputs"], ar["correct"]):
        ids = hf_tok.apply_chat_template([{"role": "user", "content": ex.prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        assert ids == encode_prompt(user_turn(ex.prompt), tok, tmpl)
        with torch.no_grad():
            g = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            eos_token_id=list(tok.eos_ids), pad_token_id=tok.eos_id)[0, len(ids):].tolist()
        g = g[:next((i for i, t in enumerate(g) if t in tok.eos_ids), len(g))]  # cut before EOS
        assert text == answer_text(tok, g)
        assert ok == check_answer(ex.check, ex.answers, text, ex.prompt)
    # perplexity of the AR parent: HF transformers on the same token pairs
    nll, n = 0.0, 0
    for i in range(3, 7):
        ctx, cont = tok.encode(f"add {i}+{i}="), tok.encode(str(2 * i)) + [tok.eos_id]
        x = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(hf(x).logits[0, len(ctx) - 1:-1], -1)
        nll -= float(lp.gather(-1, torch.tensor(cont)[:, None]).sum())
        n += len(cont)
    assert parent["ppl"]["tokens"] == n and "elbo" not in parent["ppl"]
    assert parent["ppl"]["ar"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert bd["ppl"]["elbo"] > 1.0 and bd["ppl"]["ar"] > 1.0
    assert "| agree |" in (out / "eval.md").read_text()


def test_eval_checked_and_ppl_bad_inputs_get_one_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    for args, msg in [
        (["--checked", "train"], "--checked: expected dev, final or a .jsonl file, got 'train'"),
        (["--checked", str(tmp_path / "none.jsonl")], "does not exist"),
        (["--checked", "dev", "--tasks", "add"], "--tasks: unknown add"),
        (["--checked", "dev", "--ppl", str(bad)], "p.jsonl:1: expected an object with non-empty string fields"),
    ]:
        r = _blockdiff("eval", "--model", str(TINY_AR), *args, "--no-frontier")
        assert r.returncode == 2, (args, r.stderr[-500:])
        assert msg in r.stderr and "Traceback" not in r.stderr


def test_chat_distill_data_writes_the_parents_own_greedy_answers(tmp_path):
    """scripts/chat_distill_data.py (HF transformers' batched, left-padded generate) against blockdiff's own AR
    decoder, one prompt at a time: the documents hold exactly the parent's greedy answers, and answers cut by the
    budget are dropped. The tiny parent answers its synthetic tasks as plain text (--raw); the chat-template
    rendering is transformers' apply_chat_template, checked against blockdiff's in the eval test above."""
    from blockdiff.data.tasks import generate_examples
    from blockdiff.decode.engine import ar_generate
    from blockdiff.load import load_checkpoint

    prompts = [ex.prompt for ex in generate_examples("train", 10, seed=5)]
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "data"
    r = subprocess.run([sys.executable, "scripts/chat_distill_data.py", "--model", str(TINY_AR), "--out", str(out),
                        "--prompts-file", str(pf), "--raw", "--prompts", "10", "--valid", "2", "--max-new", "6",
                        "--batch", "4", "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    docs = [json.loads(x) for f in ("valid.jsonl", "train.jsonl") for x in (out / f).read_text().splitlines()]
    assert meta["valid_docs"] + meta["train_docs"] == len(docs) == 10 - meta["cut"]
    loaded = load_checkpoint(TINY_AR)
    tok = loaded.tokenizer
    answered = {d["prompt"]: d for d in docs}
    for p in prompts:
        g = ar_generate(loaded.model, tok.encode(p), max_new_tokens=6, eos_ids=tok.eos_ids)
        if g.finished:  # ended by EOS (tokens exclude it)
            d = answered[p]
            assert d["answer"] == tok.decode(g.tokens) and d["text"] == p + d["answer"]
        else:
            assert p not in answered
    assert 1 <= len(docs) and meta["cut"] >= 1  # both branches seen (some answers are longer than 6 tokens)
    r = subprocess.run([sys.executable, "scripts/chat_distill_data.py", "--model", str(tmp_path), "--out",
                        str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "not an HF model folder" in r.stderr


def test_smollm2_recipe_is_valid_and_ends_on_the_decoding_block():
    """recipes/smollm2_wsd.toml parses and validates as written (its model and data folders are made by
    `make smollm2-convert`, not needed here); the EOS padding is a multiple of the block it ends with."""
    from blockdiff.train.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "smollm2_wsd.toml")
    assert r.objective.labels == "shift" and r.objective.clean_stream == "causal" and r.diffusion.ar_weight > 0
    assert [p.block_size for p in r.phases] == [4, 16, 32, 16]
    assert r.data.eos_pad_multiple % r.phases[-1].block_size == 0
    assert r.model.path.endswith("runs/smollm2-135m") and r.data.train[0].endswith("runs/smollm2-data/train.jsonl")


def test_real_model_results_table_matches_the_committed_json():
    """docs/real-model.md's parent-vs-converted table is the committed bench/results/smollm2-2026-12-07.json, not
    retyped numbers: accuracy and interval, agreement, TPF, batch-1 tokens/s and ratio, row by row."""
    import re

    d = json.loads((ROOT / "bench" / "results" / "smollm2-2026-12-07.json").read_text())
    acc = {m["name"]: m["rows"] for m in d["accuracy"]["final"]["models"]}
    speed = {m["name"]: m["rows"] for m in d["speed"]["models"]}
    text = (ROOT / "docs" / "real-model.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (parent|converted) \| ([^|]+) \| ([^|]*) \| ([^|]*) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$",
                     line)
        if m:
            rows[(m[1], m[2].strip())] = m
    labels = {"greedy AR": ("parent", "AR", "AR"), "its own greedy AR": ("converted", None, "own AR"),
              "spec (lossless)": ("converted", "spec", "spec"), "threshold 0.95, B 16": ("converted", "threshold", "threshold"),
              "S": ("converted", "S", "S"), "Q": ("converted", "Q", "Q")}
    assert {k[1] for k in rows} == set(labels)
    for (name, label), m in rows.items():
        _, akey, skey = labels[label]
        s = speed[name][skey]
        assert (float(m[6]), float(m[7])) == (round(s["tps"], 1), round(s["tps"] / speed["parent"]["AR"]["tps"], 2))
        if akey is None:
            continue
        a = acc[name][akey]
        lo, hi = a["ci95"]
        assert m[3].strip() == f"{a['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
        assert float(m[5]) == round(a["tpf"], 2)
        if name == "converted":
            assert float(m[4]) == round(a["agree"], 3)
