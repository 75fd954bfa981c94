"""Which files the user meant, and the documents inside them.

A `.txt` file is one document (the whole file, CRLF line ends turned into LF). A `.jsonl` or
`.json` file holds one JSON object per line, and the string under `text_field` is a document.
Empty documents are skipped. Errors name the file (and line) so the user fixes the corpus
instead of reading a traceback. Files are returned sorted by absolute path, so the order of
the patterns on the command line never changes the output.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_prep import PrepError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Expand glob patterns (`**` allowed) into sorted, deduplicated absolute file paths."""
    if not patterns:
        raise PrepError("--inputs needs at least one file or glob pattern")
    found: set[Path] = set()
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        files = [Path(m) for m in matches if os.path.isfile(m)]
        if not files:
            raise PrepError(f"--inputs pattern {pattern!r} matches no files")
        for path in files:
            if path.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
                raise PrepError(
                    f"{path}: unsupported input type {path.suffix or '(none)'!r} "
                    "(expected .txt, .jsonl or .json)"
                )
            found.add(path.resolve())
    return sorted(found)


def check_readable(paths: Sequence[Path]) -> None:
    """Fail before any output is touched if some input cannot be opened."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise PrepError(f"{path}: cannot read ({e.strerror})") from None


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty documents of one input file, in file order."""
    if path.suffix in TEXT_SUFFIXES:
        text = _read_text(path)
        if text:
            yield text
        return
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                text = _parse_jsonl_line(raw, f"{path}:{lineno}", text_field, first=lineno == 1)
                if text:
                    yield text
    except OSError as e:
        raise PrepError(f"{path}: cannot read ({e.strerror})") from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PrepError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PrepError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return text.replace("\r\n", "\n")


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
