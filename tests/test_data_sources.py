"""Data as users have it (issue 20 part 1): parquet / arrow / json(l) files, globs, folders and datasets saved with
`datasets`, their text or chat `messages` field and a split, read lazily, tokenised once into the memory-mapped
token cache, packed on demand; every bad file or field is one line naming it. Each reader is checked against an
independent read (pyarrow, datasets, transformers' apply_chat_template)."""

from __future__ import annotations

import json
import tracemalloc

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_helpers import assert_usage_error, run_cli
from conftest import tiny_texts, write_jsonl
from test_qwen_tokenizer_e2e import CHATML, qwen_chatml_dir

from blockdiff.data import sources
from blockdiff.data.chat_template import ChatTemplate
from blockdiff.data.documents import DataError, read_documents
from blockdiff.data.packing import BatchStream, PackedRows, TokenizedCorpus, pack, tokenize_documents
from blockdiff.data.sources import iter_documents
from blockdiff.data.token_cache import corpus_tokens
from blockdiff.data.tokenizer import load_tokenizer

TEXTS = [f"doc {i}: " + t for i, t in enumerate(tiny_texts(30, 2_000))] + ["ünïcödé ✓ 日本語"]


def _texts(docs) -> list[str]:
    return [d.text for d in docs]


def _write_arrow(path, table, stream: bool):
    with pa.OSFile(str(path), "wb") as f:
        opener = pa.ipc.new_stream if stream else pa.ipc.new_file
        with opener(f, table.schema) as w:
            w.write_table(table, max_chunksize=7)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return qwen_chatml_dir(tmp_path_factory.mktemp("qwen") / "tok")


# ------------------------------------------------------------------ reading equals an independent read
def test_every_format_reads_the_documents_pyarrow_and_datasets_read(tmp_path):
    table = pa.table({"id": list(range(len(TEXTS))), "body": TEXTS})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=5)
    _write_arrow(tmp_path / "file.arrow", table, stream=False)
    _write_arrow(tmp_path / "stream.arrow", table, stream=True)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    (tmp_path / "array.json").write_text(json.dumps([{"body": t} for t in TEXTS]))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": TEXTS[:20]}),
                          "validation": datasets.Dataset.from_dict({"body": TEXTS[20:]})}).save_to_disk(tmp_path / "dd")
    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(tmp_path / "single")

    expect = pq.read_table(tmp_path / "c.parquet").column("body").to_pylist()
    assert expect == TEXTS
    for name in ("c.parquet", "file.arrow", "stream.arrow", "c.jsonl", "array.json", "single"):
        assert _texts(iter_documents([tmp_path / name], "body")) == expect, name
    dd = datasets.load_from_disk(str(tmp_path / "dd"))
    assert _texts(iter_documents([tmp_path / "dd"], "body")) == dd["train"]["body"]
    assert _texts(iter_documents([tmp_path / "dd"], "body", split="validation")) == dd["validation"]["body"]
    docs = list(iter_documents([tmp_path / "c.parquet"], "body"))
    assert [(d.source, d.line) for d in docs[:2]] == [(str(tmp_path / "c.parquet"), 1), (str(tmp_path / "c.parquet"), 2)]

    # a glob: its matches in sorted order; a folder: its .txt/.jsonl/.parquet/.arrow files, recursively
    (tmp_path / "shards" / "sub").mkdir(parents=True)
    for i, part in enumerate((TEXTS[:10], TEXTS[10:25], TEXTS[25:])):
        pq.write_table(pa.table({"text": part}), tmp_path / "shards" / ("sub" if i == 2 else "") / f"p{i}.parquet")
    assert _texts(iter_documents([str(tmp_path / "shards" / "*.parquet")])) == TEXTS[:25]
    assert _texts(iter_documents([str(tmp_path / "shards" / "**" / "*.parquet")])) == TEXTS
    assert _texts(read_documents([tmp_path / "shards"])) == TEXTS[:25] + TEXTS[25:]


def test_messages_are_rendered_with_the_tokenizers_own_template(tmp_path, qwen_dir):
    """Conversion on a chat corpus: each row's messages become one document, the checkpoint's template rendered
    exactly as transformers' apply_chat_template renders it."""
    import transformers

    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(3)]
    convs.append([{"role": "user", "content": "no system turn"}, {"role": "assistant", "content": "ok"}])
    pq.write_table(pa.table({"msgs": convs}), tmp_path / "chat.parquet")
    datasets.Dataset.from_dict({"msgs": convs}).save_to_disk(tmp_path / "chat_ds")
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"msgs": c}) + "\n" for c in convs))
    tok = load_tokenizer(qwen_dir)
    assert tok.chat_template == CHATML
    hf = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    expect = [hf.apply_chat_template(c, tokenize=False) for c in convs]
    assert expect[-1].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    render = ChatTemplate(tok).render
    for name in ("chat.parquet", "chat_ds", "chat.jsonl"):
        assert _texts(iter_documents([tmp_path / name], messages_field="msgs", render=render)) == expect, name


# ------------------------------------------------------------------ the token cache
def test_token_cache_from_parquet_equals_jsonl_and_is_memory_mapped(tmp_path, tiny_ar_dir):
    tok = load_tokenizer(tiny_ar_dir)
    write_jsonl(tmp_path / "c.jsonl", TEXTS)
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "c.parquet", row_group_size=4)
    cache = tmp_path / "cache"
    a = corpus_tokens([tmp_path / "c.parquet"], tok, cache)
    b = corpus_tokens([tmp_path / "c.jsonl"], tok, cache)
    ref = tokenize_documents(read_documents([tmp_path / "c.jsonl"]), tok)  # the in-memory tokeniser
    for c in (a, b):
        assert not c.from_cache and isinstance(c.tokens, np.memmap)
        assert np.array_equal(c.tokens, ref.tokens) and np.array_equal(c.doc_offsets, ref.doc_offsets)
    assert len(list(cache.glob("tokens-*"))) == 2 and not list(cache.glob(".tokens-*"))  # no temporary left

    again = corpus_tokens([tmp_path / "c.parquet"], tok, cache)
    assert again.from_cache and np.array_equal(again.tokens, a.tokens)
    # the key changes with the file's contents, the field read and the split
    pq.write_table(pa.table({"text": TEXTS[::-1], "other": TEXTS}), tmp_path / "c.parquet")
    assert not corpus_tokens([tmp_path / "c.parquet"], tok, cache).from_cache
    other = corpus_tokens([tmp_path / "c.parquet"], tok, cache, text_field="other")
    assert not other.from_cache and np.array_equal(other.tokens, ref.tokens)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:5]}),
                          "test": datasets.Dataset.from_dict({"text": TEXTS[:5]})}).save_to_disk(tmp_path / "dd")
    assert not corpus_tokens([tmp_path / "dd"], tok, cache).from_cache
    assert not corpus_tokens([tmp_path / "dd"], tok, cache, split="test").from_cache
    assert corpus_tokens([tmp_path / "dd"], tok, cache, split="test").from_cache


def _random_corpus(rng) -> TokenizedCorpus:
    lengths = rng.integers(1, 40, rng.integers(1, 30))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedCorpus(rng.integers(5, 1000, offsets[-1]).astype(np.int32), offsets)


def test_rows_packed_on_demand_equal_pack_and_resume_exactly():
    rng = np.random.default_rng(0)
    for _ in range(100):
        corpus = _random_corpus(rng)
        L, multiple = int(rng.choice([4, 8, 16, 32])), int(rng.choice([0, 4, 8]))
        eager = pack(corpus, L, pad_id=1, eos_pad_multiple=multiple)
        lazy = PackedRows(corpus, L, pad_id=1, eos_pad_multiple=multiple)
        assert len(lazy) == len(eager) and lazy.seq_len == L
        idx = torch.from_numpy(rng.permutation(len(eager)))
        got, want = lazy.rows(idx), eager.rows(idx)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # BatchStream over the lazy rows: the same batches as over the eager ones, and a resume continues exactly
    corpus = _random_corpus(np.random.default_rng(1))
    lazy, eager = PackedRows(corpus, 8, pad_id=1), pack(corpus, 8, pad_id=1)
    s1, s2 = BatchStream(lazy, 3, seed=5), BatchStream(eager, 3, seed=5)
    for _ in range(7):
        assert torch.equal(s1.next_batch()["input_ids"], s2.next_batch()["input_ids"])
    resumed = BatchStream(PackedRows(corpus, 8, pad_id=1), 3, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(s1.state_dict())))
    for _ in range(5):
        a, b = s1.next_batch(), resumed.next_batch()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_holds_one_batch_not_the_corpus(tmp_path, monkeypatch):
    """A parquet file of ~12 MB of text is read with the Python heap and pyarrow's allocations each a small fraction of
    it (about a batch and a row group), and no batch handed to Python holds more than ROWS_PER_BATCH rows."""
    n = 12_000
    texts = [f"document {i} " + "lorem ipsum dolor sit amet " * 36 for i in range(n)]
    size = sum(map(len, texts))
    pq.write_table(pa.table({"text": texts, "id": list(range(n))}), tmp_path / "big.parquet", row_group_size=500)
    del texts
    batches = []
    real = sources._columns

    def spy(*args):
        for values in real(*args):
            batches.append(len(values))
            yield values

    monkeypatch.setattr(sources, "_columns", spy)
    monkeypatch.setattr(sources, "ROWS_PER_BATCH", 256)  # ~0.25 MB of text per batch
    pa.default_memory_pool().release_unused()
    base, arrow_peak, k = pa.total_allocated_bytes(), 0, 0
    tracemalloc.start()
    try:
        for k, doc in enumerate(iter_documents([tmp_path / "big.parquet"]), start=1):
            if k % 250 == 0:
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - base)
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert k == n and doc.text.startswith(f"document {n - 1} ")
    assert max(batches) == 256 and sum(batches) == n
    assert py_peak < size / 10, (py_peak, size)
    assert arrow_peak < size / 4, (arrow_peak, size)


# ------------------------------------------------------------------ one line per bad input
def _one_line_error(fn) -> str:
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_files_and_fields_are_one_line_naming_them(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b"], "n": [1, 2], "msgs": [[{"role": "user", "content": "x"}]] * 2}),
                   tmp_path / "t.parquet")
    p = str(tmp_path / "t.parquet")
    docs = lambda *a, **kw: lambda: list(iter_documents(*a, **kw))  # noqa: E731
    render = lambda m: "x"  # noqa: E731
    cases = [
        (docs([tmp_path / "missing.parquet"]), [str(tmp_path / "missing.parquet"), "no such file"]),
        (docs([str(tmp_path / "nope" / "*.parquet")]), ["*.parquet", "matches no file"]),
        (docs([p], "body"), [p, "no field 'body'", "text (string)", "n (int64)", "text_field"]),
        (docs([p], "n"), [p, "field 'n' holds int64", "strings"]),
        (docs([p], "msgs"), [p, "field 'msgs' holds list<", "strings"]),
        (docs([p], messages_field="text", render=render), [p, "field 'text' holds string", "role, content",
                                                            "messages_field"]),
        (docs([p], messages_field="chat", render=render), [p, "no field 'chat'", "messages_field"]),
    ]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    cases.append((docs([tmp_path / "bad.parquet"]), [str(tmp_path / "bad.parquet"), "not a readable parquet file"]))
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    cases.append((docs([tmp_path / "bad.arrow"]), [str(tmp_path / "bad.arrow"), "not a readable arrow file"]))
    pq.write_table(pa.table({"text": [None, "  ", ""]}), tmp_path / "empty.parquet")
    cases.append((docs([tmp_path / "empty.parquet"]), ["empty.parquet", "no rows with a non-empty field 'text'"]))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(tmp_path / "dd")
    cases.append((docs([tmp_path / "dd"], split="validation"), [str(tmp_path / "dd"), "split 'validation'",
                                                                "splits: train"]))
    cases.append((docs([tmp_path / "dd"], "body"), [f"{tmp_path / 'dd'}[train]", "no field 'body'", "text (string)"]))
    (tmp_path / "chat.jsonl").write_text('{"msgs": [{"role": "user", "content": "q"}]}\n{"msgs": "hello"}\n')
    cases.append((docs([tmp_path / "chat.jsonl"], messages_field="msgs", render=render),
                  [f"{tmp_path / 'chat.jsonl'}:2", "field 'msgs' must be a non-empty list", "got str"]))
    pq.write_table(pa.table({"msgs": [[{"role": "user", "content": "q"}], [{"role": "robot", "content": "x"}]]}),
                   tmp_path / "roles.parquet")
    cases.append((docs([tmp_path / "roles.parquet"], messages_field="msgs", render=render),
                  [f"{tmp_path / 'roles.parquet'}, row 2", "messages[0].role is 'robot'"]))
    (tmp_path / "a.txt").write_text("plain")
    cases.append((docs([tmp_path / "a.txt"], messages_field="msgs", render=render), ["a.txt", "no field 'msgs'"]))
    for fn, needles in cases:
        msg = _one_line_error(fn)
        for n in needles:
            assert n in msg, (n, msg)


def test_without_pyarrow_the_error_says_which_extra(tmp_path, monkeypatch):
    import builtins

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "t.parquet")
    real_import = builtins.__import__

    def no_arrow(name, *args, **kw):
        if name.split(".")[0] in ("pyarrow", "datasets"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_arrow)
    monkeypatch.setattr(sources.importlib, "import_module", lambda name: no_arrow(name))
    msg = _one_line_error(lambda: list(iter_documents([tmp_path / "t.parquet"])))
    assert str(tmp_path / "t.parquet") in msg and "pip install 'blockdiff[data]'" in msg


# ------------------------------------------------------------------ the command line
RECIPE = """\
[model]
path = "{model}"
[data]
train = ["corpus/*.parquet"]
valid = ["valid.parquet"]
{extra}seq_len = 32
valid_rows = 4
cache_dir = "cache"
[train]
batch_size = 2
eval_every = 2
save_every = 2
warmup_steps = 0
threads = 1
device = "cpu"
[[phases]]
block_size = 8
steps = 2
lr = 1e-3
[eval]
tasks = 0
"""


def test_convert_from_a_parquet_glob(tmp_path, tiny_ar_dir):
    """`blockdiff convert` on a recipe whose data is a glob of parquet shards: it trains, caches the tokens once
    (the valid file too), and a bad field is one line and exit 2 before any checkpoint."""
    (tmp_path / "corpus").mkdir()
    texts = tiny_texts(80, 4_000)
    for i in range(3):
        pq.write_table(pa.table({"content": texts[i::3]}), tmp_path / "corpus" / f"shard-{i:02d}.parquet")
    pq.write_table(pa.table({"content": texts[:10]}), tmp_path / "valid.parquet")
    (tmp_path / "r.toml").write_text(RECIPE.format(model=tiny_ar_dir, extra='text_field = "content"\n'))
    code, _, err = run_cli(["convert", "--recipe", tmp_path / "r.toml", "--out", tmp_path / "run", "--no-progress"])
    assert code == 0, err
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert len(list((tmp_path / "cache").glob("tokens-*"))) == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_nll" in r or "val_ppl" in r for r in rows), rows[-1]

    (tmp_path / "bad.toml").write_text(RECIPE.format(model=tiny_ar_dir, extra='text_field = "body"\n'))
    code, _, err = run_cli(["convert", "--recipe", tmp_path / "bad.toml", "--out", tmp_path / "bad", "--no-progress"])
    assert_usage_error(code, err, "convert", str(tmp_path / "corpus" / "shard-00.parquet"), "no field 'body'",
                       "content (string)")
    assert not (tmp_path / "bad" / "checkpoints").exists()
