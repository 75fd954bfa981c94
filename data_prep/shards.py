"""Tokenize documents and pack them into fixed-length MDS samples the trainer streams.

Layout of the output folder:
    DIR/train/, DIR/val/   mosaicml-streaming MDS, one column `tokens` (seq_len + 1 ids)
    DIR/meta.json          written last and atomically; its presence marks a complete dataset

Each document is assigned to train or val by a stable hash of (seed, content), so the split
does not depend on input order, and exact duplicate documents never straddle the split.
Within a split, documents are tokenized, followed by EOS, concatenated in input order and cut
into blocks of exactly seq_len + 1 tokens (inputs and shifted targets); the remainder at the
end of a split is dropped. The same inputs and flags give byte-identical shard files.

Inputs are read twice: a first pass only parses and assigns splits, so a bad JSON line or an
empty val split is reported before the output folder is touched. In the second pass,
tokenization runs on `workers` processes (see `data_prep.workers`) while this process packs
their results in input order, so the number of workers never changes the output. Each shard's
xxh64 is recorded in index.json, so a reader can check every shard it downloads.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.inputs import InputFile, check_readable, iter_documents
from data_prep.workers import batches, default_workers, encode_in_order
from pretrain.data.format import (
    META_FORMAT,  # the trainer checks what prep writes
    META_NAME,
    SPLITS,
)
from pretrain.data.streaming_compat import streaming_module
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import PrepError
from pretrain.files import temp_prefix, write_json
from pretrain.progress import Progress

SHARD_HASHES = ["xxh64"]  # fast, and what the trainer validates downloaded shards with


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
    seq_len: int,
    val_fraction: float = 0.05,
    text_field: str = "text",
    compression: str | None = None,
    size_limit: int = 64 << 20,
    overwrite: bool = False,
    seed: int = 0,
    workers: int | None = None,
    out_flag: str = "--out",
) -> ShardsResult:
    """Write DIR/train, DIR/val and DIR/meta.json; `out_flag` names `out` in errors."""
    if seq_len <= 0:
        raise PrepError(f"--seq-len must be > 0 (got {seq_len})")
    if not 0.0 <= val_fraction < 1.0:
        raise PrepError(f"--val-fraction must be in [0, 1) (got {val_fraction})")
    if not 0 < size_limit < 2**32:
        raise PrepError(f"--shard-size-limit must be between 1 byte and 4GB (got {size_limit})")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise PrepError(f"--workers must be >= 1 (got {workers})")
    check_readable(inputs)
    documents = _count_documents(inputs, text_field, seed, val_fraction)
    if val_fraction > 0 and documents["val"] == 0:
        raise PrepError(
            f"the val split is empty ({documents['train']} documents, --val-fraction "
            f"{val_fraction}); raise --val-fraction or add more documents"
        )
    if documents["train"] == 0:
        raise PrepError("the train split is empty; lower --val-fraction or add more documents")

    _prepare_out_dir(out, overwrite, out_flag)
    try:
        docs = _iter_assigned(inputs, text_field, seed, val_fraction)
        writers = {
            split: _mds_writer(out / split, tokenizer.vocab_size, compression, size_limit)
            for split in SPLITS
            if documents[split] > 0
        }
        started = time.perf_counter()
        splits, text_bytes = _tokenize_and_write(
            docs, documents.total(), tokenizer, writers, seq_len, workers
        )
        seconds = max(time.perf_counter() - started, 1e-9)
        _check_samples(splits, seq_len, val_fraction)
    except BaseException:
        _empty_dir(out)  # everything in it is ours: it was empty (or emptied) above
        raise

    meta: dict[str, Any] = {
        "format": META_FORMAT,
        "seq_len": seq_len,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size),
        "tokenizer": str(tokenizer.path.resolve()),
        "tokenizer_sha256": tokenizer.sha256,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "seed": seed,
        "val_fraction": val_fraction,
        "splits": splits,
    }
    write_json(out / META_NAME, meta, indent=2)
    return ShardsResult(meta, text_bytes, seconds)


def split_files(split_dir: Path) -> tuple[int, int]:
    """(number of shard files, total bytes) of one written split; (0, 0) if it is absent."""
    if not split_dir.is_dir():
        return 0, 0
    shards = [p for p in split_dir.iterdir() if p.name.startswith("shard.")]
    total = sum(p.stat().st_size for p in split_dir.iterdir() if p.is_file())
    return len(shards), total


def _iter_assigned(
    inputs: Sequence[InputFile], text_field: str, seed: int, val_fraction: float
) -> Iterator[tuple[str, str]]:
    for path in inputs:
        for doc in iter_documents(path, text_field):
            yield assign_split(doc, seed, val_fraction), doc


def _count_documents(
    inputs: Sequence[InputFile], text_field: str, seed: int, val_fraction: float
) -> Counter[str]:
    return Counter(split for split, _ in _iter_assigned(inputs, text_field, seed, val_fraction))


def _mds_writer(split_dir: Path, vocab_size: int, compression: str | None, size_limit: int) -> Any:
    streaming = streaming_module()
    return streaming.MDSWriter(
        out=str(split_dir),
        columns={"tokens": f"ndarray:{token_dtype(vocab_size)}"},
        compression=compression,
        hashes=SHARD_HASHES,
        size_limit=size_limit,
    )


def _tokenize_and_write(
    docs: Iterator[tuple[str, str]],
    total_docs: int,
    tokenizer: Tokenizer,
    writers: dict[str, Any],
    seq_len: int,
    workers: int,
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Tokenize `docs` (split, text), append EOS, pack per split; counts and text bytes."""
    dtype = token_dtype(tokenizer.vocab_size)
    stats = {split: {"documents": 0, "tokens": 0, "samples": 0} for split in SPLITS}
    text_bytes = dict.fromkeys(SPLITS, 0)
    packers = {split: BlockPacker(seq_len + 1, dtype) for split in SPLITS}
    encoded = encode_in_order(batches(docs), tokenizer.path.resolve(), dtype, workers)
    with closing(encoded), Progress("shards", total_docs, "doc") as progress:
        for batch, streams in encoded:
            for split, size in zip(batch.splits, batch.sizes, strict=True):
                stats[split]["documents"] += 1
                text_bytes[split] += size
            for split, ids in streams.items():  # ids: (tokens,), EOS after each document
                stats[split]["tokens"] += len(ids)
                for block in packers[split].add(ids):
                    writers[split].write({"tokens": block})
                    stats[split]["samples"] += 1
            tokens = sum(len(ids) for ids in streams.values())
            progress.update(len(batch.texts), sum(batch.sizes), tokens)
    for writer in writers.values():  # only on success: the caller removes a failed output
        writer.finish()
    return stats, text_bytes


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
    return name in (META_NAME, *SPLITS) or name.startswith(temp_prefix(META_NAME))


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
