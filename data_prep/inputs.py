"""Which files the user meant, and the documents inside them.

A `.txt` file is one document (the whole file, CRLF line ends turned into LF). A `.jsonl` or
`.json` file holds one JSON object per line, and the string under `text_field` is a document.
A `.parquet` file holds one document per row in the string column `text_field`, read a row
batch at a time so a file larger than memory is fine. Empty (and null) documents are skipped.
Errors name the file (and line) so the user fixes the corpus instead of reading a traceback.

Patterns are local globs or `s3://bucket/prefix/*.jsonl` (see `data_prep.remote`). Files are
returned sorted by their name, so the order of the patterns on the command line never changes
the output, and a folder uploaded as is to a prefix gives the same order as the folder.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import PrepError
from pretrain.objstore import is_remote

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class InputFile:
    """One input: `name` is what the user knows (absolute path or s3:// URL), `path` is read.

    `offset` is where byte 0 of `path` lies in `name` (a fetched byte range of a remote file),
    so errors name the byte in the user's file.
    """

    name: str
    path: Path
    offset: int = 0

    @classmethod
    def local(cls, path: str | Path) -> InputFile:
        return cls(str(path), Path(path))


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Expand glob patterns (`**` allowed) into sorted, deduplicated absolute paths or URLs."""
    from data_prep.remote import expand_remote  # boto3 only when some input is remote

    if not patterns:
        raise PrepError("--inputs needs at least one file or glob pattern")
    found: set[str] = set()
    for pattern in patterns:
        if is_remote(pattern):
            names = expand_remote(pattern)
        else:
            matches = glob.glob(os.path.expanduser(pattern), recursive=True)
            names = [str(Path(m).resolve()) for m in matches if os.path.isfile(m)]
        if not names:
            raise PrepError(f"--inputs pattern {pattern!r} matches no files")
        for name in names:
            suffix = os.path.splitext(name)[1]
            if suffix not in SUFFIXES:
                raise PrepError(
                    f"{name}: unsupported input type {suffix or '(none)'!r} "
                    "(expected .txt, .jsonl, .json or .parquet)"
                )
        found.update(names)
    return sorted(found, key=lambda name: name.split("/"))  # folder by folder, like Path


def fetch_inputs(names: Sequence[str], folder: Path) -> list[InputFile]:
    """Local names as they are; every s3:// URL downloaded into `folder` (same order)."""
    inputs = []
    for i, name in enumerate(names):
        if is_remote(name):
            inputs.append(InputFile(name, folder / f"{i:06d}{Path(name).suffix}"))
        else:
            inputs.append(InputFile.local(name))
    jobs = [(item.name, item.path) for item in inputs if is_remote(item.name)]
    if jobs:
        from data_prep.remote import download  # boto3 only when some input is remote

        folder.mkdir(parents=True, exist_ok=True)
        download(jobs)
    return inputs


def check_readable(inputs: Sequence[InputFile]) -> None:
    """Fail before any output is touched if some input cannot be opened."""
    for item in inputs:
        try:
            with open(item.path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise PrepError(f"{item.name}: cannot read ({e.strerror})") from None


def iter_documents(
    item: InputFile, text_field: str = "text", start: int = 0, end: int | None = None
) -> Iterator[str]:
    """Yield the non-empty documents of one input file, in file order.

    With a byte range [start, end) of `item.path`: the JSONL lines and parquet row groups
    that begin in it (see data_prep.parts); a .txt file is one document, never cut.
    """
    suffix = item.path.suffix
    if suffix in TEXT_SUFFIXES:
        text = _read_text(item) if start == 0 else ""
        if text:
            yield text
    elif suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(item, text_field, start, end)
    else:
        yield from _iter_jsonl(item, text_field, start, end)


def _read_text(item: InputFile) -> str:
    try:
        data = item.path.read_bytes()
    except OSError as e:
        raise PrepError(f"{item.name}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrepError(f"{item.name}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return text.replace("\r\n", "\n")


def _iter_jsonl(item: InputFile, text_field: str, start: int, end: int | None) -> Iterator[str]:
    """The lines that begin in [start, end); named by line number when read from the file's
    first byte, by byte offset otherwise (counting lines before `start` would read them)."""
    try:
        with open(item.path, "rb") as f:
            pos = start
            if start > 0:  # the line that begins at start, or the first one after it
                f.seek(start - 1)
                pos += len(f.readline()) - 1
            lineno = 1 if start + item.offset == 0 else None
            while end is None or pos < end:
                raw = f.readline()
                if not raw:
                    break
                at = item.offset + pos
                where = f"{item.name}:{lineno}" if lineno else f"{item.name} (line at byte {at})"
                text = _parse_jsonl_line(raw, where, text_field, first=lineno == 1)
                if text:
                    yield text
                pos += len(raw)
                lineno = lineno + 1 if lineno else None
    except OSError as e:
        raise PrepError(f"{item.name}: cannot read ({e.strerror})") from None


def _parse_jsonl_line(raw: bytes, where: str, text_field: str, first: bool) -> str | None:
    """The document on one JSONL line; None for a blank line."""
    try:
        line = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise PrepError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PrepError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise PrepError(f"{where}: no field {text_field!r} (choose another with --text-field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise PrepError(
            f"{where}: field {text_field!r} holds {type(text).__name__}, expected a string"
        )
    return text


def _iter_parquet(item: InputFile, text_field: str, start: int, end: int | None) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(item.path)
    except (pa.ArrowException, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepError(f"{item.name}: not a readable parquet file ({reason})") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise PrepError(
            f"{item.name}: no column {text_field!r} (choose another with --text-field; "
            f"columns: {', '.join(schema.names[:8])})"
        )
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise PrepError(f"{item.name}: column {text_field!r} holds {column_type}, expected strings")
    groups = [
        i
        for i in range(parquet.metadata.num_row_groups)
        if start <= row_group_offset(parquet.metadata.row_group(i)) < (end or float("inf"))
    ]
    if not groups:
        return
    try:
        batches = parquet.iter_batches(PARQUET_BATCH_ROWS, groups, columns=[text_field])
        for batch in batches:
            for text in batch.column(0).to_pylist():
                if text:  # None (null) and "" are both empty documents
                    yield text
    except (pa.ArrowException, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepError(f"{item.name}: cannot read ({reason})") from None


def row_group_offset(group) -> int:
    """The byte where a parquet row group begins: its first column chunk's first page."""
    return chunk_offset(group.column(0))


def chunk_offset(column) -> int:
    """The byte where a parquet column chunk begins (its dictionary page, if any)."""
    if column.has_dictionary_page and column.dictionary_page_offset:
        return min(column.dictionary_page_offset, column.data_page_offset)
    return column.data_page_offset
