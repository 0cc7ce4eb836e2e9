"""Reading user data: every failure names the file and line; plus the stdlib corpus."""

import json

import pytest

from blockdiff.data.corpus import split_lines_into_documents, stdlib_documents
from blockdiff.data.documents import DataError, Document, read_documents


def _jsonl(path, *lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_txt_jsonl_and_directories_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "sub" / "c.txt").write_text("\ufeffbom is dropped")
    _jsonl(tmp_path / "a.jsonl", json.dumps({"text": "one", "id": 1}), "", "  ",
           json.dumps({"text": "two"}))
    (tmp_path / "ignored.md").write_text("not data")
    docs = read_documents([tmp_path])
    assert docs == [
        Document("one", str(tmp_path / "a.jsonl"), 1),
        Document("two", str(tmp_path / "a.jsonl"), 4),
        Document("second file\n", str(tmp_path / "b.txt"), 0),
        Document("bom is dropped", str(tmp_path / "sub" / "c.txt"), 0),
    ]
    # Explicit files keep the given order; a custom field works.
    _jsonl(tmp_path / "q.jsonl", json.dumps({"content": "x"}))
    docs = read_documents([tmp_path / "q.jsonl", str(tmp_path / "b.txt")], text_field="content")
    assert [d.text for d in docs] == ["x", "second file\n"]


def _error(paths, **kw) -> str:
    with pytest.raises(DataError) as info:
        read_documents(paths, **kw)
    return str(info.value)


def test_path_errors(tmp_path):
    msg = _error([tmp_path / "missing.jsonl"])
    assert msg.startswith(f"{tmp_path / 'missing.jsonl'}:") and "no such file" in msg
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b")
    msg = _error([tmp_path / "d"])
    assert msg.startswith(f"{tmp_path / 'd'}:") and ".txt" in msg and ".jsonl" in msg
    msg = _error([tmp_path / "d" / "x.csv"])
    assert "x.csv:" in msg and "'.csv'" in msg and ".txt, .jsonl" in msg
    assert "no data paths" in _error([])


@pytest.mark.parametrize("name,content", [
    ("e.txt", ""), ("w.txt", " \n\t\n"), ("e.jsonl", ""), ("w.jsonl", "\n\n  \n"),
])
def test_empty_files(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    msg = _error([tmp_path / name])
    assert msg.startswith(f"{tmp_path / name}:") and "empty file" in msg


@pytest.mark.parametrize("line,expect", [
    ('{"text": "ok"', "invalid JSON"),
    ("not json", "invalid JSON"),
    ('["text"]', "list, not an object"),
    ('"just a string"', "str, not an object"),
    ('{"body": "x", "meta": 1}', "missing field 'text' (keys present: 'body', 'meta')"),
    ('{"text": 42}', "'text' is a JSON int, expected a string"),
    ('{"text": null}', "'text' is a JSON NoneType, expected a string"),
    ('{"text": "  \\n"}', "'text' is empty"),
])
def test_jsonl_line_errors(tmp_path, line, expect):
    path = _jsonl(tmp_path / "data.jsonl", json.dumps({"text": "fine"}), "", line)
    msg = _error([path])
    assert msg.startswith(f"{path}:3: "), msg
    assert expect in msg


def test_non_utf8_gives_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    msg = _error([path])
    assert msg.startswith(f"{path}:2: ") and "UTF-8" in msg and "byte offset 28" in msg
    txt = tmp_path / "latin.txt"
    txt.write_bytes(b"a\nb\nc\xff")
    msg = _error([txt])
    assert msg.startswith(f"{txt}:3: ") and "byte offset 5" in msg


def test_split_lines_into_documents():
    text = "".join(f"line {i}\n" for i in range(500))
    docs = split_lines_into_documents(text, max_chars=100)
    assert "".join(docs) == text
    assert all(len(d) <= 100 and d.endswith("\n") for d in docs)
    long = "x" * 250 + "\nshort\n"
    assert split_lines_into_documents(long, max_chars=100) == ["x" * 100, "x" * 100, "x" * 50 + "\nshort\n"]


def test_stdlib_documents():
    train = stdlib_documents("train", 50_000, seed=0)
    assert train == stdlib_documents("train", 50_000, seed=0)
    assert train != stdlib_documents("train", 50_000, seed=1)
    assert sum(map(len, train)) == 50_000 and all(0 < len(d) <= 2000 for d in train)
    heldout = stdlib_documents("heldout", 50_000)
    assert not set(train) & set(heldout)
    with pytest.raises(ValueError, match="heldout"):
        stdlib_documents("valid", 10)
