"""Tokenization on worker processes, with the results handed back in input order.

Tokenizing is the expensive part of `prep shards`. The main process reads documents, assigns
their splits and groups them into batches; each worker loads the Tokenizer once and turns a
batch into token ids; the main process packs the results in the order the batches were
submitted. Nothing depends on which worker finishes first, so the shards are byte-identical
for any number of workers.

- Workers are spawned, not forked: the main process may hold threads (boto3 transfers, tqdm)
  whose locks a forked child would inherit in a held state.
- At most `2 * workers` batches are in flight, so memory stays bounded for any corpus size
  (`Pool.imap` would read the whole input ahead into its task queue).
- A worker that dies (out of memory, killed) ends the run with an error instead of a hang,
  which is why this uses `concurrent.futures` rather than `multiprocessing.Pool`.
- The caller owns the pool (`TokenizerPool`) and may run it over many parts: starting workers
  costs about a second (spawn, imports, loading the tokenizer), which an array task writing
  one part at a time would otherwise pay per part.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import PrepError

BATCH_DOCS = 256
BATCH_CHARS = 1 << 20  # big documents: a batch stays about 1 MB of text
IN_FLIGHT_PER_WORKER = 2


@dataclass
class Batch:
    """Consecutive documents of one part, each with its split and its size in UTF-8 bytes."""

    part: int
    splits: list[str]
    texts: list[str]
    sizes: list[int]


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def batches(docs: Iterator[tuple[int, str, str]]) -> Iterator[Batch]:
    """Group (part, split, text) into batches of at most BATCH_DOCS docs or ~BATCH_CHARS,
    never two parts in one batch (each part is packed on its own)."""
    batch = Batch(-1, [], [], [])
    chars = 0
    for part, split, text in docs:
        if part != batch.part and batch.texts:
            yield batch
            batch, chars = Batch(part, [], [], []), 0
        batch.part = part
        batch.splits.append(split)
        batch.texts.append(text)
        batch.sizes.append(len(text.encode("utf-8")))
        chars += len(text)
        if chars >= BATCH_CHARS or len(batch.texts) >= BATCH_DOCS:
            yield batch
            batch, chars = Batch(part, [], [], []), 0
    if batch.texts:
        yield batch


class TokenizerPool:
    """Worker processes that each load the tokenizer once, for any number of
    `encode_in_order` runs, one after another."""

    def __init__(self, tokenizer_path: Path, dtype: str, workers: int) -> None:
        self.workers = workers
        # Processes start at the first submit, so a pool that is never used costs nothing.
        self._executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_load_tokenizer,
            initargs=(str(tokenizer_path), dtype),
        )

    def __enter__(self) -> TokenizerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def encode_in_order(
        self, batches: Iterator[Batch]
    ) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
        """(batch, encode(batch)) for every batch, in order, computed on the workers."""
        pending: deque[tuple[Batch, Future[dict[str, np.ndarray]]]] = deque()
        try:
            for batch in batches:
                pending.append((batch, self._executor.submit(encode, batch)))
                if len(pending) >= IN_FLIGHT_PER_WORKER * self.workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        except BrokenProcessPool:
            raise PrepError(
                "a tokenizer worker process died (out of memory or killed); retry with fewer "
                "--workers"
            ) from None
        finally:
            # Stopped early (an error while packing): the batches still queued would only
            # delay the pool's next run, or its shutdown.
            for _, future in pending:
                future.cancel()


_tokenizer: Tokenizer | None = None
_dtype = np.dtype("uint32")


def _load_tokenizer(path: str, dtype: str) -> None:
    global _tokenizer, _dtype
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _tokenizer = Tokenizer(path)
    _dtype = np.dtype(dtype)


def encode(batch: Batch) -> dict[str, np.ndarray]:
    """Per split in the batch: the ids of its documents in order, each followed by EOS."""
    assert _tokenizer is not None, "encode runs in a worker set up by _load_tokenizer"
    eos = [_tokenizer.eos_id]
    encoded = _tokenizer.encode_batch(batch.texts, num_threads=1)  # one core per worker
    streams: dict[str, np.ndarray] = {}
    for split in sorted(set(batch.splits)):
        docs = [ids for s, ids in zip(batch.splits, encoded, strict=True) if s == split]
        count = sum(len(ids) + 1 for ids in docs)
        ids = itertools.chain.from_iterable(part for doc in docs for part in (doc, eos))
        streams[split] = np.fromiter(ids, dtype=_dtype, count=count)
    return streams
