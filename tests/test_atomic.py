"""Atomic writes: the content lands, no temporary is left, a failed write leaves the previous file intact, and
files get the mode plain `open` would give (not mkstemp's 0600)."""

import json
import os

import pytest

from blockdiff.atomic import (PendingFile, folder_for_replace, open_for_replace, replace_folder, write_bytes,
                              write_json, write_text)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_content_and_leaves_no_temporary(tmp_path):
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    write_text(tmp_path / "t.txt", "héllo")
    write_json(tmp_path / "j.json", {"a": [1, 2]})
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "j.json").read_text() == json.dumps({"a": [1, 2]}, indent=2) + "\n"
    write_text(tmp_path / "t.txt", "replaced")
    assert (tmp_path / "t.txt").read_text() == "replaced"
    assert _names(tmp_path) == ["b.bin", "j.json", "t.txt"]


def test_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "f.txt", "x")
        with folder_for_replace(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_exception_during_write_keeps_previous_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with open_for_replace(path) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old" and _names(tmp_path) == ["f.txt"]
    with pytest.raises(TypeError):
        write_json(tmp_path / "new.json", {"x": object()})  # not JSON-able: nothing is created
    assert _names(tmp_path) == ["f.txt"]


def test_pending_file_commit_and_discard(tmp_path):
    p = PendingFile(tmp_path / "trace.jsonl")
    p.file.write("line\n")
    assert not (tmp_path / "trace.jsonl").exists()  # invisible until committed
    p.commit()
    assert (tmp_path / "trace.jsonl").read_text() == "line\n"
    q = PendingFile(tmp_path / "trace.jsonl")
    q.file.write("other\n")
    q.discard()
    assert (tmp_path / "trace.jsonl").read_text() == "line\n" and _names(tmp_path) == ["trace.jsonl"]


def test_folder_replace_keeps_old_until_new_is_in_place(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    with folder_for_replace(folder) as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(OSError, match="disk full"):
        with folder_for_replace(folder) as tmp:
            (tmp / "w").write_text("partial")
            raise OSError("disk full")
    assert (folder / "w").read_text() == "v1" and _names(tmp_path) == ["ckpt"]

    # The final rename fails: the old folder comes back instead of staying parked under a hidden name.
    staged = tmp_path / "staged.tmp"
    staged.mkdir()
    (staged / "w").write_text("v2")
    real = os.replace

    def replace(src, dst):
        if str(src) == str(staged):
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        replace_folder(staged, folder)
    monkeypatch.undo()
    assert (folder / "w").read_text() == "v1" and _names(tmp_path) == ["ckpt", "staged.tmp"]
    replace_folder(staged, folder)
    assert (folder / "w").read_text() == "v2" and _names(tmp_path) == ["ckpt"]
