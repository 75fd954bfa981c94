"""Tokenize documents and pack them into fixed-length MDS samples the trainer streams.

Layout of the output folder:
    DIR/train/index.json   mosaicml-streaming's index of every shard of the split, in order
    DIR/train/00000/       one part's MDS sub-dataset (shards and its own index.json), ...
    DIR/val/...            the same for val
    DIR/meta.json          written last and atomically; its presence marks a complete dataset

Each document is assigned to train or val by a stable hash of (seed, content), so the split
does not depend on input order, and exact duplicate documents never straddle the split.
The inputs are cut into deterministic parts (data_prep.parts: by --part-size bytes, never by
the number of machines). Within a part and a split, documents are tokenized, followed by EOS,
concatenated in input order and cut into blocks of exactly seq_len + 1 tokens (inputs and
shifted targets); the remainder at the end of each part's split is dropped (less than one
sample per part). A part's shards are its own. So the same inputs and flags give
byte-identical files whether one process writes every part or an array of tasks
(data_prep.array) writes a few each.

Inputs are read twice: a first pass only parses and assigns splits, so a bad JSON line or an
empty val split is reported before the output folder is touched. In the second pass,
tokenization runs on `workers` processes (see `data_prep.workers`) while this process packs
their results in input order, so the number of workers never changes the output. Each shard's
xxh64 is recorded in index.json, so a reader can check every shard it downloads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.inputs import InputFile, check_readable, iter_documents
from data_prep.parts import DEFAULT_PART_SIZE, Part, Source, plan_parts
from data_prep.workers import TokenizerPool, batches, default_workers
from pretrain.data.format import (
    INDEX_NAME,
    META_FORMAT,  # the trainer checks what prep writes
    META_NAME,
    PREP_DIR,
    SPLITS,
)
from pretrain.data.streaming_compat import streaming_module
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import PrepError
from pretrain.files import temp_prefix, write_atomic
from pretrain.progress import Progress

SHARD_HASHES = ["xxh64"]  # fast, and what the trainer validates downloaded shards with


@dataclass
class Settings:
    """The flags that decide the bytes of a dataset (besides the inputs and tokenizer)."""

    seq_len: int
    val_fraction: float = 0.05
    text_field: str = "text"
    compression: str | None = None
    size_limit: int = 64 << 20
    seed: int = 0
    part_size: int = DEFAULT_PART_SIZE

    def check(self) -> None:
        if self.seq_len <= 0:
            raise PrepError(f"--seq-len must be > 0 (got {self.seq_len})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise PrepError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if not 0 < self.size_limit < 2**32:
            raise PrepError(
                f"--shard-size-limit must be between 1 byte and 4GB (got {self.size_limit})"
            )
        if self.part_size <= 0:
            raise PrepError(f"--part-size must be > 0 (got {self.part_size})")


@dataclass
class ShardsResult:
    meta: dict[str, Any]  # what meta.json holds
    text_bytes: dict[str, int]  # UTF-8 bytes of input text per split
    seconds: float  # tokenizing and packing (the second pass), without checks and imports


def assign_split(text: str, seed: int, val_fraction: float) -> str:
    """'val' for about `val_fraction` of documents, decided by sha256 of (seed, text)."""
    digest = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "val" if position < val_fraction else "train"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


class BlockPacker:
    """Concatenates runs of token ids and hands out blocks of exactly `block_len` ids."""

    def __init__(self, block_len: int, dtype: str) -> None:
        self.block_len = block_len
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._dtype = np.dtype(dtype)

    def add(self, ids: Sequence[int]) -> np.ndarray:
        """Append `ids`; return the blocks now complete, shape (n_blocks, block_len)."""
        self._pending.append(np.asarray(ids, dtype=self._dtype))
        self._pending_len += len(ids)
        n_blocks = self._pending_len // self.block_len
        if n_blocks == 0:
            return np.empty((0, self.block_len), dtype=self._dtype)
        stream = np.concatenate(self._pending)
        cut = n_blocks * self.block_len
        self._pending = [stream[cut:]]
        self._pending_len = len(stream) - cut
        return stream[:cut].reshape(n_blocks, self.block_len)

    @property
    def leftover(self) -> int:
        """Ids held back because they do not fill a block (dropped at the end of a split)."""
        return self._pending_len


def write_shards(
    inputs: Sequence[InputFile],
    tokenizer: Tokenizer,
    out: Path,
    settings: Settings,
    overwrite: bool = False,
    workers: int | None = None,
    out_flag: str = "--out",
) -> ShardsResult:
    """Write every part, the merged indexes and DIR/meta.json; `out_flag` names `out` in errors."""
    settings.check()
    workers = check_workers(workers)
    check_readable(inputs)
    parts = plan_parts([(i.name, i.path.stat().st_size) for i in inputs], settings.part_size)
    by_name = {i.name: i for i in inputs}
    sources = {p: Source(by_name[p.name], p.start, p.end) for part in parts for p in part.pieces}
    documents = count_documents(parts, sources, settings)
    if settings.val_fraction > 0 and documents["val"] == 0:
        raise PrepError(
            f"the val split is empty ({documents['train']} documents, --val-fraction "
            f"{settings.val_fraction}); raise --val-fraction or add more documents"
        )
    if documents["train"] == 0:
        raise PrepError("the train split is empty; lower --val-fraction or add more documents")

    _prepare_out_dir(out, overwrite, out_flag)
    try:
        started = time.perf_counter()
        with tokenizer_pool(tokenizer, workers) as pool:
            manifests = write_parts(parts, sources, tokenizer, out, settings, pool, documents)
        seconds = max(time.perf_counter() - started, 1e-9)
        meta = merged_meta(manifests, tokenizer, settings)
        for split, index in merged_indexes(manifests).items():
            write_atomic(out / split / INDEX_NAME, dumps(index))
    except BaseException:
        _empty_dir(out)  # everything in it is ours: it was empty (or emptied) above
        raise
    write_atomic(out / META_NAME, dumps(meta))
    text_bytes = {s: sum(m["text_bytes"][s] for m in manifests) for s in SPLITS}
    return ShardsResult(meta, text_bytes, seconds)


def check_workers(workers: int | None) -> int:
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise PrepError(f"--workers must be >= 1 (got {workers})")
    return workers


def tokenizer_pool(tokenizer: Tokenizer, workers: int) -> TokenizerPool:
    """The worker processes that tokenize for `write_parts` (one pool for any number of calls)."""
    return TokenizerPool(tokenizer.path.resolve(), token_dtype(tokenizer.vocab_size), workers)


def dumps(obj: Any) -> str:
    """The JSON text of an index or meta.json: the same bytes from any writer."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def split_files(split_dir: Path) -> tuple[int, int]:
    """(number of shard files, total bytes) of one written split; (0, 0) if it is absent."""
    if not split_dir.is_dir():
        return 0, 0
    files = [p for p in split_dir.rglob("*") if p.is_file()]
    return sum(p.name.startswith("shard.") for p in files), sum(p.stat().st_size for p in files)


def iter_part_documents(
    parts: Sequence[Part], sources: dict, settings: Settings
) -> Iterator[tuple[int, str, str]]:
    """(part, split, text) of every document of `parts`, in order."""
    for part in parts:
        for piece in part.pieces:
            src = sources[piece]
            for doc in iter_documents(src.item, settings.text_field, src.start, src.end):
                yield part.index, assign_split(doc, settings.seed, settings.val_fraction), doc


def count_documents(parts: Sequence[Part], sources: dict, settings: Settings) -> Counter[str]:
    """The first pass: every document parsed and assigned, nothing written."""
    return Counter(split for _, split, _ in iter_part_documents(parts, sources, settings))


def _mds_writer(split_dir: Path, vocab_size: int, compression: str | None, size_limit: int) -> Any:
    streaming = streaming_module()
    return streaming.MDSWriter(
        out=str(split_dir),
        columns={"tokens": f"ndarray:{token_dtype(vocab_size)}"},
        compression=compression,
        hashes=SHARD_HASHES,
        size_limit=size_limit,
    )


class _PartWriter:
    """One part's packers and MDS writers (made at its first sample), and its counts."""

    def __init__(self, part: Part, out: Path, vocab_size: int, settings: Settings) -> None:
        self.part, self.out, self.vocab_size, self.settings = part, out, vocab_size, settings
        dtype = token_dtype(vocab_size)
        self.packers = {s: BlockPacker(settings.seq_len + 1, dtype) for s in SPLITS}
        self.writers: dict[str, Any] = {}
        self.stats = {s: {"documents": 0, "tokens": 0, "samples": 0} for s in SPLITS}
        self.text_bytes = dict.fromkeys(SPLITS, 0)
        self.started = time.perf_counter()

    def add(self, split: str, ids: np.ndarray) -> None:
        self.stats[split]["tokens"] += len(ids)
        for block in self.packers[split].add(ids):
            if split not in self.writers:
                s = self.settings
                folder = self.out / split / self.part.folder
                self.writers[split] = _mds_writer(folder, self.vocab_size, s.compression, s.size_limit)  # fmt: skip
            self.writers[split].write({"tokens": block})
            self.stats[split]["samples"] += 1

    def finish(self) -> dict[str, Any]:
        """Close the shards (the remainder is dropped); the part's manifest."""
        shards = {}
        for split, writer in self.writers.items():
            _finish(writer)
            index = json.loads((self.out / split / self.part.folder / INDEX_NAME).read_text())
            shards[split] = [_prefixed(shard, self.part.folder) for shard in index["shards"]]
        return {
            "part": self.part.index,
            "bytes": self.part.nbytes,
            "splits": self.stats,
            "text_bytes": self.text_bytes,
            "shards": shards,
            "seconds": round(time.perf_counter() - self.started, 3),
        }


def _finish(writer: Any) -> None:
    """MDSWriter.finish(), without its up-to-1 s nap per writer.

    streaming 0.13 hands each finished shard to a thread pool (a no-op "upload" for a local
    folder), and `finish()` sleeps in whole seconds while that pool's queue is not empty,
    which it usually is just after the last shard: a second per part and split, hours for
    a corpus of thousands of parts. So the last shard is flushed here and the queue
    awaited in milliseconds; then finish() finds nothing queued.
    """
    queue = getattr(getattr(writer, "executor", None), "_work_queue", None)
    if queue is not None and hasattr(writer, "flush_shard") and writer.new_samples:
        writer.flush_shard()
        writer._reset_cache()
    deadline = time.monotonic() + 60
    while queue is not None and queue.qsize() > 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    writer.finish()


def _prefixed(shard: dict[str, Any], folder: str) -> dict[str, Any]:
    """A sub-dataset's index entry as the merged index lists it (basenames under `folder`)."""
    shard = dict(shard)
    for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):  # as streaming's merge_index
        if shard.get(key):
            shard[key] = {**shard[key], "basename": f"{folder}/{shard[key]['basename']}"}
    return shard


def write_parts(
    parts: Sequence[Part],
    sources: dict,
    tokenizer: Tokenizer,
    out: Path,
    settings: Settings,
    pool: TokenizerPool,
    documents: Counter[str],
    on_part: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Tokenize and pack each part into out/SPLIT/PART/; their manifests, in order.
    `on_part(manifest)` runs as each part is complete (an array task publishes it)."""
    docs = iter_part_documents(parts, sources, settings)
    encoded = pool.encode_in_order(batches(docs))
    manifests: list[dict[str, Any]] = []
    pending = list(parts)  # parts not finished yet, in order

    def finish_until(index: float) -> None:
        while pending and pending[0].index < index:
            writer = current.pop(pending[0].index, None) or _PartWriter(pending[0], out, tokenizer.vocab_size, settings)  # fmt: skip
            manifests.append(writer.finish())
            if on_part is not None:
                on_part(manifests[-1])
            pending.pop(0)

    current: dict[int, _PartWriter] = {}
    with closing(encoded), Progress("shards", documents.total(), "doc") as progress:
        for batch, streams in encoded:
            finish_until(batch.part)
            if batch.part not in current:
                current[batch.part] = _PartWriter(pending[0], out, tokenizer.vocab_size, settings)
            writer = current[batch.part]
            for split, size in zip(batch.splits, batch.sizes, strict=True):
                writer.stats[split]["documents"] += 1
                writer.text_bytes[split] += size
            for split, ids in streams.items():  # ids: (tokens,), EOS after each document
                writer.add(split, ids)
            tokens = sum(len(ids) for ids in streams.values())
            progress.update(len(batch.texts), sum(batch.sizes), tokens)
        finish_until(float("inf"))  # only on success: the caller removes a failed output
    return manifests


def merged_indexes(manifests: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each split's index.json over all parts' shards, in part order."""
    ordered = sorted(manifests, key=lambda m: m["part"])
    return {
        split: {"version": 2, "shards": [s for m in ordered for s in m["shards"].get(split, [])]}
        for split in SPLITS
        if any(m["shards"].get(split) for m in ordered)
    }


def merged_meta(
    manifests: Sequence[dict[str, Any]], tokenizer: Tokenizer, settings: Settings
) -> dict[str, Any]:
    """meta.json of the merged dataset; raises PrepError when a split holds no sample."""
    counts = ("documents", "tokens", "samples")
    splits = {s: {k: sum(m["splits"][s][k] for m in manifests) for k in counts} for s in SPLITS}
    _check_samples(splits, settings.seq_len, settings.val_fraction)
    return {
        "format": META_FORMAT,
        "seq_len": settings.seq_len,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size),
        "tokenizer": str(tokenizer.path.resolve()),
        "tokenizer_sha256": tokenizer.sha256,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "seed": settings.seed,
        "val_fraction": settings.val_fraction,
        "packing": "per part: each part's split is packed on its own, its remainder dropped",
        "part_size": settings.part_size,
        "parts": len(manifests),
        "splits": splits,
    }


def _check_samples(splits: dict[str, dict[str, int]], seq_len: int, val_fraction: float) -> None:
    for split in SPLITS:
        if split == "val" and val_fraction == 0:
            continue
        if splits[split]["samples"] == 0:
            fix = "raise --val-fraction or add" if split == "val" else "add more"
            raise PrepError(
                f"the {split} split has {splits[split]['tokens']} tokens, fewer than one sample "
                f"(--seq-len {seq_len} + 1); lower --seq-len or {fix} documents"
            )


def _ours(name: str) -> bool:
    """Whether `write_shards` puts this entry in --out (meta.json goes via a temporary name)."""
    return name in (META_NAME, PREP_DIR, *SPLITS) or name.startswith(temp_prefix(META_NAME))


def _prepare_out_dir(out: Path, overwrite: bool, flag: str) -> None:
    if out.exists() and not out.is_dir():
        raise PrepError(f"{flag} {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PrepError(f"{flag} {out} is not empty; pass --overwrite to replace its contents")
        # --overwrite replaces a dataset, never a folder of other files (a mistyped --out).
        foreign = sorted(c.name for c in out.iterdir() if not _ours(c.name))
        if foreign:
            raise PrepError(
                f"{flag} {out} holds files prep did not write ({', '.join(foreign[:3])}); "
                "--overwrite only replaces a dataset: choose a new or empty folder"
            )
        _empty_dir(out)
    out.mkdir(parents=True, exist_ok=True)


def _empty_dir(path: Path) -> None:
    (path / META_NAME).unlink(missing_ok=True)  # first: a half-emptied dataset is never complete
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
