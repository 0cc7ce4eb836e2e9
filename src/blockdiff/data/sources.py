"""Data as users have it: the `[data] train` / `valid` entries resolved to sources, and their rows read lazily.

An entry is
- a file: `.txt` (one document), `.jsonl` / `.json` (one object per line; a `.json` file may instead hold one
  array of objects), `.parquet`, or `.arrow` (Arrow IPC, file or stream format, as `datasets` writes it);
- a folder written by `datasets`' `save_to_disk` (it holds `dataset_dict.json` or `state.json`): that dataset,
  the named split of a DatasetDict (`[data] split` / `valid_split`);
- any other folder: its .txt / .jsonl / .parquet / .arrow files, searched recursively, in sorted order;
- a glob (`corpus/*.parquet`, `shards/**/*.jsonl`): its matches, sorted, each read as above.

A row's `text_field` is a document; or, with `messages_field`, its chat messages rendered by the caller's
template (the checkpoint's own, data/chat_template.py). Rows stream: parquet by record batches of
ROWS_PER_BATCH rows of the one column read, arrow from a memory map, saved datasets through `Dataset.iter`,
jsonl line by line, so no reader holds a corpus in Python objects. pyarrow and `datasets` (the `data` extra)
are imported only when such a source is named. Bad files and fields raise DataError: one line naming the
file (and row or line) and the field, and what is there instead.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .chat_template import validate_messages
from .documents import DataError, Document, jsonl_documents, read_jsonl, read_txt

TEXT_EXTENSIONS = (".txt", ".jsonl", ".json")
TABLE_EXTENSIONS = (".parquet", ".arrow")
# What a plain folder is searched for: .json is left out, a folder's .json files are as often metadata as data.
FOLDER_EXTENSIONS = (".txt", ".jsonl", ".parquet", ".arrow")
DATASET_MARKERS = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes: DatasetDict / Dataset
ROWS_PER_BATCH = 1024  # rows decoded to Python at once from a table or dataset
INSTALL = "pip install 'blockdiff[data]'"


@dataclass(frozen=True)
class Source:
    """One file, or one saved dataset (one split of a saved DatasetDict)."""

    path: Path
    split: str = ""  # the DatasetDict split read; "" for files and single Datasets

    @property
    def kind(self) -> str:
        return "dataset" if self.path.is_dir() else self.path.suffix[1:]

    @property
    def dataset_dir(self) -> Path:
        return self.path / self.split if self.split else self.path

    def __str__(self) -> str:
        return f"{self.path}[{self.split}]" if self.split else str(self.path)

    def at(self, row: int) -> str:
        """Where row `row` (1-based; a line of a jsonl file) is, for an error message."""
        return f"{self}:{row}" if self.kind in ("jsonl", "json") else f"{self}, row {row}"


# ---------------------------------------------------------------- entries -> sources

def _is_dataset(folder: Path) -> bool:
    return any((folder / m).is_file() for m in DATASET_MARKERS)


def _dataset(folder: Path, split: str) -> Source:
    index = folder / "dataset_dict.json"
    if not index.is_file():  # a single Dataset: it is the data, whatever the split key says
        return Source(folder)
    splits = json.loads(index.read_text(encoding="utf-8")).get("splits", [])
    if split not in splits:
        raise DataError(f"{folder}: split {split!r} is not in the dataset (splits: {', '.join(splits) or 'none'}); "
                        "set [data] split (train entries) or valid_split (valid entries)")
    return Source(folder, split)


def _expand(path: Path, split: str) -> list[Source]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if _is_dataset(path):
            return [_dataset(path, split)]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FOLDER_EXTENSIONS)
        if not files:
            raise DataError(f"{path}: directory holds no {' or '.join(FOLDER_EXTENSIONS)} files (searched "
                            "recursively) and is not a dataset saved with save_to_disk")
        return [Source(f) for f in files]
    if path.suffix not in TEXT_EXTENSIONS + TABLE_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"expected one of {', '.join(TEXT_EXTENSIONS + TABLE_EXTENSIONS)} or a folder saved with save_to_disk"
        )
    return [Source(path)]


def resolve(entries: Iterable[str | Path] | str | Path, split: str = "train") -> list[Source]:
    """The sources named by `entries` (files, folders, globs, saved datasets), in order; `split` is the split read
    from a saved DatasetDict."""
    if isinstance(entries, (str, Path)):
        entries = [entries]  # a lone path is an easy mistake; treat it as a list of one
    entries = list(entries)
    if not entries:
        raise DataError(f"no data paths given; expected files, folders or globs of "
                        f"{', '.join(TEXT_EXTENSIONS + TABLE_EXTENSIONS)}, or saved datasets")
    out: list[Source] = []
    for e in entries:
        if isinstance(e, Source):
            out.append(e)
        elif any(c in str(e) for c in "*?["):
            matches = sorted(glob.glob(str(e), recursive=True))
            if not matches:
                raise DataError(f"{e}: the glob matches no file")
            for m in matches:
                out += _expand(Path(m), split)
        else:
            out += _expand(Path(e), split)
    return out


def fingerprint(sources: list[Source]) -> str:
    """sha256 over each source's path, split and file contents: a changed, added or renamed file changes it."""
    h = hashlib.sha256(b"blockdiff-sources-v1")

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    for s in sources:
        put(f"{s.path}\0{s.split}".encode())
        folder = s.dataset_dir
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
        for f in files:
            put(str(f.relative_to(folder) if folder.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- tables (parquet, arrow, saved datasets)

def _require(module: str, src: Source):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{src}: reading a {src.kind} source needs `{module.split('.')[0]}`; {INSTALL}") from None


def _check_column(schema, field: str, want: str, src: Source, key: str) -> None:
    """The column `field` exists and holds `want` ("text": strings; "messages": lists of {role, content})."""
    pa = _require("pyarrow", src)
    if field not in schema.names:
        have = ", ".join(f"{n} ({t})" for n, t in zip(schema.names, schema.types)) or "none"
        raise DataError(f"{src}: no field {field!r} (fields: {have}); set [data] {key}")
    t = schema.field(field).type
    if want == "text":
        ok = pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"
        expect = "strings (the document text)"
    else:
        v = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else None
        ok = v is not None and pa.types.is_struct(v) and {"role", "content"} <= {v.field(i).name
                                                                               for i in range(v.num_fields)}
        expect = "lists of {role, content} messages"
    if not ok:
        raise DataError(f"{src}: field {field!r} holds {t}, expected {expect}; set [data] {key}")


def _columns(src: Source, field: str, want: str, key: str) -> Iterator[list]:
    """The values of column `field`, ROWS_PER_BATCH rows at a time, as Python lists."""
    pa = _require("pyarrow", src)
    if src.kind == "dataset":
        datasets = _require("datasets", src)
        try:
            ds = datasets.load_from_disk(str(src.dataset_dir))
        except (OSError, ValueError, FileNotFoundError) as e:
            raise DataError(f"{src}: not a readable saved dataset ({str(e).splitlines()[0]})") from None
        if not isinstance(ds, datasets.Dataset):  # a DatasetDict saved without its index file
            raise DataError(f"{src}: a DatasetDict; name one split's folder or set [data] split")
        _check_column(ds.data.schema, field, want, src, key)
        for batch in ds.select_columns([field]).with_format("arrow").iter(batch_size=ROWS_PER_BATCH):
            yield batch.column(0).to_pylist()
        return
    try:
        if src.kind == "parquet":
            pq = _require("pyarrow.parquet", src)
            pf = pq.ParquetFile(str(src.path))
            _check_column(pf.schema_arrow, field, want, src, key)
            batches = (b.column(0) for b in pf.iter_batches(batch_size=ROWS_PER_BATCH, columns=[field]))
        else:
            batches = _arrow_columns(pa, src, field, want, key)
        for col in batches:
            for i in range(0, len(col), ROWS_PER_BATCH):
                yield col.slice(i, ROWS_PER_BATCH).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{src}: not a readable {src.kind} file ({str(e).splitlines()[0]})") from None


def _arrow_columns(pa, src: Source, field: str, want: str, key: str):
    """Column `field` of each record batch of an Arrow IPC file (random-access or stream format), memory-mapped."""
    mm = pa.memory_map(str(src.path))
    try:
        reader = pa.ipc.open_file(mm)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:  # `datasets` writes the stream format
        mm.seek(0)
        reader = pa.ipc.open_stream(mm)
        batches = iter(reader)
    _check_column(reader.schema, field, want, src, key)
    k = reader.schema.get_field_index(field)
    for b in batches:
        yield b.column(k)


def _table_values(src: Source, field: str, want: str, key: str) -> Iterator[tuple[int, object]]:
    """(1-based row, value) of the non-empty rows; empty and null ones are skipped with one counted warning
    (corpora such as wikitext hold many), and a source with none left is an error."""
    row, skipped = 0, 0
    for values in _columns(src, field, want, key):
        for v in values:
            row += 1
            if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v):
                skipped += 1
                continue
            yield row, v
    if skipped == row:
        raise DataError(f"{src}: no rows with a non-empty field {field!r} ({row} rows)")
    if skipped:
        print(f"[blockdiff] warning: {src}: skipped {skipped} of {row} rows whose field {field!r} is empty or null",
              file=sys.stderr)


# ---------------------------------------------------------------- rows and documents

def iter_field(sources: Iterable, field: str, want: str = "text", *, split: str = "train",
               key: str = "text_field") -> Iterator[tuple[Source, int, object]]:
    """(source, 1-based row or line, value of `field`) for each row of each source (`source.at(row)` names it for
    an error message). `key` is the recipe key that names the field (said in errors)."""
    for src in resolve(sources, split):
        if src.kind == "txt":
            raise DataError(f"{src}: a .txt file is one plain document and has no field {field!r}; give "
                            f".jsonl, .parquet, .arrow or a saved dataset for [data] {key}")
        if src.kind in ("jsonl", "json"):
            for line, obj in read_jsonl(src.path, (field,), missing_hint=f"; set [data] {key}"):
                yield src, line, obj[field]
        else:
            for row, value in _table_values(src, field, want, key):
                yield src, row, value


def iter_documents(entries: Iterable, text_field: str = "text", *, split: str = "train",
                   messages_field: str = "", render: Callable[[list[dict]], str] | None = None) -> Iterator[Document]:
    """The documents of `entries`, in order, one at a time: each row's `text_field`, or with `messages_field` its
    chat messages rendered to text by `render` (the checkpoint's chat template)."""
    if messages_field:
        if render is None:
            raise ValueError("messages_field needs render (the chat template that turns messages into text)")
        for src, row, value in iter_field(entries, messages_field, "messages", split=split, key="messages_field"):
            msgs = validate_messages(value, src.at(row), need_assistant=False, field=messages_field)
            yield Document(text=render(msgs), source=str(src), line=row)
        return
    for src in resolve(entries, split):
        if src.kind == "txt":
            yield from read_txt(src.path)
        elif src.kind in ("jsonl", "json"):
            yield from jsonl_documents(src.path, text_field)
        else:
            for row, text in _table_values(src, text_field, "text", "text_field"):
                yield Document(text=text, source=str(src), line=row)

