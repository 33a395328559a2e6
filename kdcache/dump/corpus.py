"""Loading the corpus: a hub dataset name or local txt/jsonl/json/csv/tsv/parquet files or globs.

The result is a `datasets.Dataset` with the columns kdcache uses renamed to fixed names
(text, text_pair, label) plus `source_index` (row number in the loaded split, after --limit),
so example ids trace back to the user's data even after empty rows are dropped.
"""
from __future__ import annotations

import codecs
import csv
import glob as globlib
from dataclasses import dataclass, field
from pathlib import Path

from ..cache.files import files_sha256
from ..errors import KdcacheError
from . import chat as chat_layouts

BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv",
            ".tsv": "csv", ".parquet": "parquet"}
TEXT, TEXT_PAIR, LABEL, SOURCE_INDEX = "text", "text_pair", "label", "source_index"


@dataclass
class Corpus:
    dataset: object          # datasets.Dataset with TEXT[, TEXT_PAIR][, LABEL], SOURCE_INDEX
    description: dict        # manifest["data"]
    has_pair: bool
    has_label: bool
    # Chat corpora (kdcache.dump.chat): the layout detected, its source columns, the one line saying so,
    # and the (example index, problem) of rows that are no conversation (reported, never silently dropped).
    chat: dict | None = None
    bad_rows: list = field(default_factory=list)


def _local_files(data: str) -> list[Path] | None:
    """Files matched by a local path/glob/directory, or None if `data` does not look local."""
    path = Path(data).expanduser()
    if any(ch in data for ch in "*?["):
        return sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    if data.startswith((".", "/", "~")) or Path(data).suffix.lower() in BUILDERS:
        return []
    return None


# Bytes of each text file checked before loading: enough to catch a binary file, cheap for any corpus.
SNIFF_BYTES = 1 << 20


def _file_problem(path: Path, builder: str, limit: int | None = SNIFF_BYTES) -> str | None:
    """What makes `path` unusable as a `builder` corpus file, in a few words; None if nothing
    is seen in its first `limit` bytes (all of it when limit is None)."""
    size = path.stat().st_size
    if builder == "parquet":
        if size == 0:
            return "is empty (0 bytes)"
        import pyarrow.parquet as pq
        try:
            pq.read_metadata(path)
        except Exception as e:  # noqa: BLE001 - any footer failure means "not Parquet"
            return f"is not a Parquet file ({(str(e).splitlines() or [type(e).__name__])[0]})"
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, blank = 0, True
    with open(path, "rb") as f:
        while block := f.read(min(1 << 20, limit - offset) if limit is not None else 1 << 20):
            nul = block.find(b"\x00")
            try:
                decoder.decode(block[:nul] if nul >= 0 else block, final=False)
            except UnicodeDecodeError as e:
                return f"is not UTF-8 text (byte 0x{block[e.start]:02x} at offset {offset + e.start}: binary data?)"
            if nul >= 0:
                return f"is binary, not UTF-8 text (NUL byte at offset {offset + nul})"
            blank = blank and not block.strip()
            offset += len(block)
            if limit is not None and offset >= limit:
                return None
    if blank:
        return f"is empty ({'0 bytes' if size == 0 else 'whitespace only'}: no non-empty text)"
    return None


def _check_files(files: list[Path], data: str, builder: str, limit: int | None = SNIFF_BYTES) -> None:
    for path in files:
        problem = _file_problem(path, builder, limit)
        if problem:
            raise KdcacheError(f"--data {data}: file {path} {problem}; fix or remove that file, or point --data elsewhere")


def _innermost(error: BaseException) -> BaseException:
    """The root cause of a wrapped error (datasets wraps parse errors in DatasetGenerationError)."""
    seen = set()
    while id(error) not in seen and (error.__cause__ or error.__context__) is not None:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error


def _load_local(files: list[Path], data: str, split: str):
    import datasets

    suffixes = {p.suffix.lower() for p in files}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise KdcacheError(f"--data {data}: unsupported file type(s) {sorted(unknown)}; use .txt/.jsonl/.json/.csv/.tsv/.parquet")
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1 or (".tsv" in suffixes and ".csv" in suffixes):
        raise KdcacheError(f"--data {data} mixes file types {sorted(suffixes)}; point at one kind of file")
    builder = builders.pop()
    _check_files(files, data, builder)
    # TSV: tabs only, no quote handling (csv.QUOTE_NONE); quotes inside texts are data, e.g. in SMS Spam.
    kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if ".tsv" in suffixes else {}
    try:
        return datasets.load_dataset(builder, data_files={split: [str(p.resolve()) for p in files]}, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - a parse failure of the user's file is a user error
        _check_files(files, data, builder, limit=None)  # the whole files this time: name the bad one
        cause = _innermost(e)
        raise KdcacheError(f"cannot read --data {data} as {builder}: {type(cause).__name__}: "
                           f"{(str(cause).splitlines() or [''])[0]}; check that the file is {builder} "
                           "(one example per line for .txt/.jsonl)") from None


def _load_hub(data: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(data, split=split)
    except Exception as e:  # noqa: BLE001
        raise KdcacheError(f"--data {data!r} is not a local file/glob/directory and could not be loaded from the hub "
                           f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); check the name and --split") from None


def _source(data: str, files) -> str:
    if files is None:
        return data
    return str(Path(data).expanduser().resolve()) if not any(ch in data for ch in "*?[") else str(Path(data).expanduser().absolute())


def load_corpus(data: str, *, split: str = "train", text_column: str = "text", text_pair_column: str | None = None,
                label_column: str | None = None, limit: int | None = None, messages_column: str | None = None) -> Corpus:
    files = _local_files(data)
    if files is not None and not files:
        raise KdcacheError(f"--data {data}: no such file, or the glob/directory matches no .txt/.jsonl/.json/.csv/.tsv/.parquet files")
    ds = _load_local(files, data, split) if files is not None else _load_hub(data, split)
    num_loaded = len(ds)
    if messages_column and messages_column not in ds.column_names:
        raise KdcacheError(f"--messages-column {messages_column!r} is not a column of --data {data} (columns: "
                           f"{', '.join(ds.column_names)}); pass --messages-column with one of them")
    # A corpus without the text column but in a chat layout is a chat corpus (see kdcache.dump.chat).
    if messages_column or text_column not in ds.column_names:
        layout = chat_layouts.detect(ds.column_names, messages_column)
        if layout is not None and not text_pair_column and not label_column:
            return _chat_corpus(ds, data, files, split, limit, *layout)
    wanted = [(text_column, TEXT, "--text-column")]
    if text_pair_column:
        wanted.append((text_pair_column, TEXT_PAIR, "--text-pair-column"))
    if label_column:
        wanted.append((label_column, LABEL, "--label-column"))
    for column, _, option in wanted:
        if column not in ds.column_names:
            raise KdcacheError(f"{option} {column!r} is not a column of --data {data} (columns: {', '.join(ds.column_names)}); "
                               f"pass {option} with one of them")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    ds = ds.select_columns([c for c, _, _ in wanted])
    ds = ds.rename_columns({c: new for c, new, _ in wanted if c != new})
    ds = ds.add_column(SOURCE_INDEX, list(range(len(ds))))
    num_source = len(ds)
    # Empty lines (blank lines of a .txt) carry no text: dropping them keeps every row meaningful.
    ds = ds.filter(lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch[TEXT]], batched=True)
    if len(ds) == 0:
        raise KdcacheError(f"--data {data} (split {split!r}, column {text_column!r}) has no non-empty text "
                           f"({num_loaded} rows loaded{f', --limit {limit}' if limit is not None else ''}); point at a corpus with text")
    description = {
        "source": _source(data, files), "split": split, "text_column": text_column, "text_pair_column": text_pair_column,
        "label_column": label_column, "limit": limit, "num_source_examples": num_source,
        "num_nonempty_examples": len(ds),
        # Content, not just the name: an edited file at the same path is a different corpus.
        "content_sha256": files_sha256(files) if files is not None else getattr(ds, "_fingerprint", None),
    }
    return Corpus(dataset=ds, description=description, has_pair=bool(text_pair_column), has_label=bool(label_column))


def _chat_corpus(ds, data: str, files, split: str, limit: int | None, layout: str, columns: list[str]) -> Corpus:
    """The conversations of a chat corpus as CONVERSATION (JSON messages) + SOURCE_INDEX; bad rows listed."""
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    ds = ds.select_columns(columns)
    ds = ds.add_column(SOURCE_INDEX, list(range(len(ds))))
    ds = chat_layouts.normalise_dataset(ds, layout, columns)
    problems = ds[chat_layouts.PROBLEM]
    bad = [(i, p) for i, p in zip(ds[SOURCE_INDEX], problems) if p]
    ds = ds.filter(lambda batch: [not p for p in batch[chat_layouts.PROBLEM]], batched=True)
    ds = ds.select_columns([chat_layouts.CONVERSATION, SOURCE_INDEX])
    num_source = len(problems)
    description = {
        "source": _source(data, files), "split": split, "chat_layout": layout, "chat_columns": columns,
        "limit": limit, "num_source_examples": num_source, "num_nonempty_examples": len(ds),
        "content_sha256": files_sha256(files) if files is not None else getattr(ds, "_fingerprint", None),
    }
    info = {"layout": layout, "columns": columns, "detected": chat_layouts.describe(layout, columns)}
    return Corpus(dataset=ds, description=description, has_pair=False, has_label=False, chat=info, bad_rows=bad)
