"""Deterministic parts of a corpus: the unit that one array task of `prep shards --tasks N`
tokenizes, packs and writes as an MDS sub-dataset of its own.

The inputs, in their sorted order, are laid end to end as one stream of bytes and cut every
`--part-size` bytes. A JSONL line, a parquet row group or a whole .txt file belongs to the part
in which it begins, so one huge file is spread over many parts (and many tasks) instead of
becoming one straggler. Parts depend only on the inputs' names and sizes and on the part
size, never on the number of tasks. Each part is packed on its own (the less-than-one-sample
remainder of each split is dropped at its end) and its shards are its own, so the merged
dataset is the same bytes whether one machine writes it or any number of tasks: N tasks only
decide who writes which parts (contiguous runs of parts, as equal in count as they can be).

Planning reads nothing but a listing. A task reads only its parts, one part at a time: a
remote JSONL part is a ranged GET of its bytes (plus the end of its last line), a remote
parquet part ranged GETs of the footer and of its row groups, written at their offsets into a
sparse local file (the other row groups are holes), not the whole file; only a remote .txt
file (one document) is downloaded whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data_prep.inputs import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    InputFile,
    chunk_offset,
    row_group_offset,
)
from pretrain import iotrace, objstore
from pretrain.errors import PrepError

DEFAULT_PART_SIZE = 512 << 20
_LINE_END_CHUNK = 1 << 20  # read past a remote part's end this much at a time, to a newline
_RANGE_CHUNK = 64 << 20
_FOOTER_GUESS = 64 << 10  # one GET holds the footer of most parquet files
IO_THREADS = 8


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one input (`size`: the whole file's): what a part reads of it."""

    name: str
    size: int
    start: int
    end: int


@dataclass(frozen=True)
class Part:
    index: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.end - p.start for p in self.pieces)

    @property
    def folder(self) -> str:
        """Its sub-dataset's folder inside each split: train/00012/, val/00012/."""
        return f"{self.index:05d}"


def splittable(name: str) -> bool:
    return name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)


def plan_parts(files: Sequence[tuple[str, int]], part_size: int) -> list[Part]:
    """The parts of `files` ((name, size) in input order), numbered from 0, none empty."""
    if part_size <= 0:
        raise PrepError(f"--part-size must be > 0 (got {part_size})")
    cut: dict[int, list[Piece]] = {}
    offset = 0
    for name, size in files:
        if not splittable(name) or size == 0:  # a .txt file is one document: never cut
            cut.setdefault(offset // part_size, []).append(Piece(name, size, 0, size))
        pos = 0
        while splittable(name) and pos < size:
            k = (offset + pos) // part_size
            end = min(size, (k + 1) * part_size - offset)
            cut.setdefault(k, []).append(Piece(name, size, pos, end))
            pos = end
        offset += size
    return [Part(i, tuple(cut[k])) for i, k in enumerate(sorted(cut))]


def task_parts(parts: Sequence[Part], tasks: int, index: int) -> list[Part]:
    """The contiguous run of parts that task `index` of `tasks` writes."""
    n = len(parts)
    return list(parts[index * n // tasks : (index + 1) * n // tasks])


def check_tasks(parts: Sequence[Part], tasks: int, part_size: int) -> None:
    if tasks < 1:
        raise PrepError(f"--tasks must be >= 1 (got {tasks})")
    if tasks > len(parts):
        total = sum(p.nbytes for p in parts)
        raise PrepError(
            f"--tasks {tasks} is more than the {len(parts)} part(s) the inputs make "
            f"({total:,} bytes, --part-size {part_size:,}); lower --tasks or --part-size"
        )


@dataclass(frozen=True)
class Source:
    """Where a task reads a piece: a local file and the byte range of it to read."""

    item: InputFile
    start: int
    end: int | None


def fetch_pieces(parts: Sequence[Part], folder: Path) -> dict[Piece, Source]:
    """A local Source for every piece of `parts`: local inputs as they are; remote .txt files
    downloaded whole (once each); remote JSONL and parquet pieces by ranged GETs."""
    sources: dict[Piece, Source] = {}
    whole: dict[str, Path] = {}
    ranged: list[tuple[Piece, Path]] = []
    for part in parts:
        for i, piece in enumerate(part.pieces):
            if not objstore.is_remote(piece.name):
                sources[piece] = Source(InputFile.local(piece.name), piece.start, piece.end)
            elif piece.name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
                ranged.append((piece, folder / f"{part.folder}-{i}{Path(piece.name).suffix}"))
            else:
                whole.setdefault(piece.name, folder / f"{len(whole):06d}{Path(piece.name).suffix}")
    if whole or ranged:
        from data_prep.remote import download

        folder.mkdir(parents=True, exist_ok=True)
        download(list(whole.items()))
        with ThreadPoolExecutor(IO_THREADS) as pool:
            fetched = dict(zip(ranged, pool.map(lambda j: _fetch(*j), ranged), strict=True))
        for (piece, path), offset in fetched.items():
            item = InputFile(piece.name, path, offset)
            sources[piece] = Source(item, piece.start - offset, piece.end - offset)
    for part in parts:
        for piece in part.pieces:
            if piece.name in whole:
                sources[piece] = Source(
                    InputFile(piece.name, whole[piece.name]), piece.start, piece.end
                )
    return sources


def _fetch(piece: Piece, path: Path) -> int:
    if piece.name.endswith(PARQUET_SUFFIXES):
        return _fetch_row_groups(piece, path)
    return _fetch_range(piece, path)


def _get(url: str, start: int, end: int) -> bytes:
    """One ranged GET, counted by iotrace (DOWNLOAD, naming the range)."""
    data = objstore.read_range(url, start, end)
    iotrace.record(iotrace.DOWNLOAD, f"{url} [{start}, {start + len(data)})")
    return data


def _fetch_row_groups(piece: Piece, path: Path) -> int:
    """A sparse copy of a remote parquet file holding what a piece reads: the footer, and
    the row groups that begin in [piece.start, piece.end), each at its own offset (reading
    the copy picks those row groups by the same offsets). Returns 0 (the copy's offset)."""
    import pyarrow.parquet as pq

    tail = _get(piece.name, max(piece.size - _FOOTER_GUESS, 0), piece.size)
    footer = int.from_bytes(tail[-8:-4], "little") + 8  # metadata length, then b"PAR1"
    if footer > len(tail):
        tail = _get(piece.name, piece.size - footer, piece.size)
    with open(path, "wb") as f:
        f.truncate(piece.size)
        f.write(b"PAR1")  # the magic every parquet file begins with
        f.seek(piece.size - len(tail))
        f.write(tail)
    meta = pq.ParquetFile(path).metadata
    with open(path, "r+b") as f:
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            start = row_group_offset(group)
            if piece.start <= start < piece.end:
                columns = [group.column(c) for c in range(group.num_columns)]
                end = max(chunk_offset(c) + c.total_compressed_size for c in columns)
                f.seek(start)
                f.write(_get(piece.name, start, end))
    return 0


def _fetch_range(piece: Piece, path: Path) -> int:
    """Write the bytes a JSONL piece needs to `path`: from one byte before its start (to see
    whether a line begins there) through the end of the last line that begins in it. Returns
    the offset in the file of the copy's first byte."""
    first = max(piece.start - 1, 0)
    with open(path, "wb") as f:
        pos, last = first, b""
        while pos < piece.end:
            data = _get(piece.name, pos, min(piece.end, pos + _RANGE_CHUNK))
            f.write(data)
            pos, last = pos + len(data), data[-1:] or last
        while last != b"\n" and pos < piece.size:  # the last line runs on past the end
            data = _get(piece.name, pos, min(piece.size, pos + _LINE_END_CHUNK))
            newline = data.find(b"\n")
            data = data if newline < 0 else data[: newline + 1]
            f.write(data)
            pos, last = pos + len(data), data[-1:]
    return first
