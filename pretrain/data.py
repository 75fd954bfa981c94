"""Training and validation batches from MDS shards, through mosaicml-streaming.

`pretrain prep shards` writes a dataset root (a local folder or an `s3://` prefix) holding
`meta.json` and one MDS folder per split. Each rank reads its part of every stream with
`StreamingDataset`: weighted mixtures come from the streams' `proportion`/`repeat`;
`shuffle_seed` and `num_canonical_nodes` come from the config (frozen in the run
directory), so the global sample order does not depend on the number of ranks and a run
can resume on a different number of them. `TrainBatches.state_dict()` is the loader's
exact position (epoch and sample within it) and goes into every checkpoint.

Remote shards are downloaded into a per-run cache, with retries and backoff, and checked
against their xxh64 hash on arrival. Everything that can be checked before training is
checked by `pretrain.data_check` first.
"""

from __future__ import annotations

import logging
import os
import re
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain import shm
from pretrain.config import Config
from pretrain.data_check import DataError, StreamSource, check_same_data, stream_sources
from pretrain.streaming_compat import streaming_module


def _dataset(cfg: Config, sources: list[StreamSource], shuffle: bool, batch_size: int):
    streaming = streaming_module()
    streams = [
        streaming.Stream(
            remote=s.remote,
            local=s.local,
            split=s.split,
            proportion=s.proportion,
            repeat=s.repeat,
            download_retry=cfg.data.download_retry + 1,  # streaming counts attempts
            download_timeout=cfg.data.download_timeout,
            validate_hash=s.validate_hash,
            keep_zip=False,
        )
        for s in sources
    ]
    with shm.registering_in_turn():
        return streaming.StreamingDataset(
            streams=streams,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=cfg.run.seed,
            num_canonical_nodes=cfg.data.num_canonical_nodes,
        )


def _loader(dataset, cfg: Config, batch_size: int):
    streaming = streaming_module()
    return streaming.StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        persistent_workers=cfg.data.num_workers > 0,
        collate_fn=collate_tokens,
    )


def collate_tokens(samples: list[dict[str, Any]]) -> torch.Tensor:
    """(B, seq_len + 1) int64 tokens from MDS samples.

    MDS hands out read-only uint16 views of the shard; stacking copies them into one
    writable array, and int64 is what the embedding indexes with.
    """
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


def _sources(cfg: Config, run_dir: Path, split: str, validation: bool) -> list[StreamSource]:
    sources = stream_sources(cfg, run_dir, split, validation)
    check_same_data(run_dir, sources, write=not dist.is_initialized() or dist.get_rank() == 0)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        shm.clean_stale([str(Path(s.local) / s.split) for s in sources])
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # each node's caches and shared memory are prepared by its local leader
    return sources


class _StreamingThreadErrors(logging.Filter):
    """Keeps the exceptions of streaming's download threads, for a one-line report.

    Those threads fail inside a future's done-callback: concurrent.futures logs the
    traceback, and the iterator itself only raises "Background thread failed". This filter
    on the concurrent.futures logger keeps such exceptions (ones raised in streaming's own
    code) instead of printing them; `_next` reports the kept one. Others pass untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not any(
            "/streaming/" in f.filename for f in traceback.extract_tb(exc.__traceback__)
        ):
            return True
        self.last = exc
        return False


_THREAD_ERRORS = _StreamingThreadErrors()


def _watch_streaming_threads() -> None:
    futures_log = logging.getLogger("concurrent.futures")
    if _THREAD_ERRORS not in futures_log.filters:
        futures_log.addFilter(_THREAD_ERRORS)


def _next(iterator: Iterator, sources: list[StreamSource]):
    """next(iterator), with streaming's shard failures turned into one-line DataErrors."""
    try:
        return next(iterator)
    except StopIteration:
        raise
    except Exception as e:
        cause = e
        if "Background thread failed" in str(e):
            # The failing thread sets streaming's flag before its exception is logged.
            deadline = time.monotonic() + 5
            while _THREAD_ERRORS.last is None and time.monotonic() < deadline:
                time.sleep(0.01)
            cause = _THREAD_ERRORS.last or e
        text = " ".join(str(cause).split())
        shard = re.search(r"[\w./-]*shard\.\d+\.mds(?:\.zstd)?", text)
        if shard is None and cause is e:
            raise
        where = f"shard {shard.group(0)}" if shard else "a shard"
        names = ", ".join(s.name for s in sources)
        raise DataError(
            f"{names}: {where} could not be read: {type(cause).__name__}: {text[:300]}"
        ) from cause


class TrainBatches:
    """An endless stream of (micro_batch_size, seq_len + 1) token batches for this rank."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        bs = cfg.train.micro_batch_size
        _watch_streaming_threads()
        self.sources = _sources(cfg, run_dir, cfg.data.train_split, validation=False)
        self.dataset = _dataset(cfg, self.sources, cfg.data.shuffle, bs)
        self.loader = _loader(self.dataset, cfg, bs)
        self._iter: Iterator | None = None

    def next(self) -> torch.Tensor:
        for _ in range(2):  # an epoch that ends right at a checkpoint yields nothing once
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                return _next(self._iter, self.sources)
            except StopIteration:
                self._iter = None
        raise DataError(
            "the training data yields no batch: fewer samples than one micro-batch per rank"
        )

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._iter = None
        self.loader.load_state_dict(state)


class ValBatches:
    """The first `n` validation batches, the same ones at every evaluation."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        bs = cfg.train.micro_batch_size
        _watch_streaming_threads()
        self.sources = _sources(cfg, run_dir, cfg.data.val_split, validation=True)
        self.dataset = _dataset(cfg, self.sources, shuffle=False, batch_size=bs)
        self.loader = _loader(self.dataset, cfg, bs)

    def batches(self, n: int) -> Iterator[torch.Tensor]:
        iterator = iter(self.loader)
        for _ in range(n):
            try:
                yield _next(iterator, self.sources)
            except StopIteration:
                return
