"""Training and validation batches from MDS shards, through mosaicml-streaming.

`pretrain prep shards` writes a dataset root (a local folder or an `s3://` prefix) holding
`meta.json` and one MDS folder per split. Each rank reads its part of every stream with
`StreamingDataset`: weighted mixtures come from the streams' `proportion`/`repeat`;
`shuffle_seed` and `num_canonical_nodes` (pretrain.data.order: chosen at the run's first
start and recorded in the run directory) fix the global sample order, so it does not
depend on the number of ranks and a run can resume on a different number of them.
`TrainBatches.state_dict()` is the loader's exact position (epoch and sample within it)
and goes into every checkpoint.

At start-up global rank 0 checks the tokenizer and the data of both splits
(`pretrain.data.check`) and sends its verdict to every rank, in one round (`check_data`);
each node's local leader then prepares the node's own cache folders on node-local scratch. Remote shards are downloaded into that cache, with retries
and backoff, and checked against their xxh64 hash on arrival; one that fails ends the run
with a one-line DataError naming it, never a hang (`_dataset_class`). DataLoader workers ignore
the preemption signals (a signal sent to the whole process group must reach only the
trainer, which saves and exits), and batches go to pinned memory when training on CUDA.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pretrain.checkpoint.ranks import Ranks
from pretrain.config.schema import Config
from pretrain.data import order as data_order
from pretrain.data import shm
from pretrain.data.check import (
    StreamSource,
    check_streams,
    check_tokenizer,
    prepare_cache,
    stream_sources,
)
from pretrain.data.streaming_compat import streaming_module
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import DataError
from pretrain.train import process

if TYPE_CHECKING:  # importing pretrain.parallel costs 0.8 s: the strategies
    from pretrain.parallel.dims import ParallelDims

log = logging.getLogger("pretrain")


def _dataset(
    cfg: Config,
    sources: list[StreamSource],
    shuffle: bool,
    batch_size: int,
    num_canonical_nodes: int,
    replication: int = 1,
):
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
        return _dataset_class()(
            streams=streams,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=cfg.run.seed,
            num_canonical_nodes=num_canonical_nodes,
            # The tp consecutive ranks of a tensor-parallel group read the same samples.
            replication=replication if replication > 1 else None,
        )


@functools.cache
def _dataset_class() -> type:
    """streaming's StreamingDataset, made to raise, never hang, when a shard's download fails.

    A shard that fails its download (its hash, or the store after `data.download_retry`)
    makes the streaming 0.13 thread that downloads it raise; the thread's done-callback sets
    the dataset's failure flag. Three things then go wrong in streaming itself:

    - `__iter__` ends an epoch in `_Iterator.exit()`, which waits until two of its three
      loops (the download thread, the ready thread, the caller's yield loop) have called
      `on_exit()`, and a thread that raises never calls it. The ready thread downloads a
      shard itself when it finds it not yet started, so when it runs ahead of the download
      thread (a loaded machine) both may be downloading when both fail: only the yield loop
      is counted and the rank waits in `exit()` forever, instead of raising the shard's
      DataError, while the other ranks wait for it in a collective. So a thread that raises
      is counted out here too.
    - The yield loop, seeing the flag, ends the epoch quietly, as if it were complete: the
      training loop's next epoch raises, but validation would score fewer batches (or none)
      without a word. So an epoch that ends with the flag set raises here.
    - What it raises, "Background thread failed. Check other traceback.", says nothing of
      the shard, and in a DataLoader worker the thread's traceback is in another process.
      So the failed thread's error goes into the message, which `_next` reports.
    """

    class Dataset(streaming_module().StreamingDataset):
        def __iter__(self) -> Iterator[dict[str, Any]]:
            try:
                yield from super().__iter__()
            except RuntimeError as e:
                if _THREAD_FAILED not in str(e):
                    raise
                raise self._thread_failure() from None
            failed = getattr(self, "_event", None)
            if failed is not None and failed.is_set():
                raise self._thread_failure()

        def _thread_failure(self) -> RuntimeError:
            why = getattr(self, "_failed_thread", None)
            return RuntimeError(f"{_THREAD_FAILED}: {why}" if why else f"{_THREAD_FAILED}.")

        def _prepare_thread(self, it) -> None:
            self._counted_out(super()._prepare_thread, it)

        def _ready_thread(self, it) -> None:
            self._counted_out(super()._ready_thread, it)

        def _counted_out(self, thread: Callable[[Any], None], it: Any) -> None:
            try:
                thread(it)
            except BaseException as e:
                if getattr(self, "_failed_thread", None) is None:  # the first one counts
                    self._failed_thread = f"{type(e).__name__}: {' '.join(str(e).split())}"
                it.on_exit()  # what the thread's loop does when it ends without an error
                raise

    # Named as a module attribute (see __getattr__), so a spawned DataLoader worker unpickles it.
    Dataset.__module__, Dataset.__name__ = __name__, _DATASET_CLASS
    Dataset.__qualname__ = _DATASET_CLASS
    return Dataset


_DATASET_CLASS = "_CountedStreamingDataset"
_THREAD_FAILED = "Background thread failed"  # streaming's words, kept for whoever matches them


def __getattr__(name: str) -> Any:
    if name == _DATASET_CLASS:
        return _dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _loader(dataset, cfg: Config, batch_size: int, pin_memory: bool):
    streaming = streaming_module()
    workers = cfg.data.num_workers
    preemption = tuple(int(getattr(signal, name)) for name in cfg.fault.preempt_signals)
    return streaming.StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        collate_fn=collate_tokens,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(ignore_signals, preemption) if workers else None,
    )


def ignore_signals(signals: tuple[int, ...], worker_id: int = 0) -> None:
    """A DataLoader worker's init: leave the preemption signals to the trainer.

    SLURM and launchers send SIGTERM/SIGUSR1 to the whole process group. A worker that
    dies of it (torch's worker handler re-raises it) makes the trainer's next batch fail
    with "DataLoader worker ... is killed by signal" instead of saving a checkpoint; the
    trainer ends its workers itself when it exits.
    """
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


def collate_tokens(samples: list[dict[str, Any]]) -> torch.Tensor:
    """(B, seq_len + 1) int64 tokens from MDS samples.

    MDS hands out read-only uint16 views of the shard; stacking copies them into one
    writable array, and int64 is what the embedding indexes with.
    """
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


def check_data(
    cfg: Config, run_dir: Path, roles: tuple[str, ...] = ("train", "val")
) -> tuple[Tokenizer, dict[str, tuple[list[StreamSource], int]]]:
    """Start-up, in one round: global rank 0 checks the tokenizer and the streams of every
    split in `roles` ("train", "val") and every rank gets its verdict (the tokenizer's bytes
    with it, so no other rank reads the file); then each node's local leader prepares the
    node's cache folders. Returns the tokenizer and, per role, this rank's streams and
    num_canonical_nodes."""
    splits = {"train": (cfg.data.train_split, False), "val": (cfg.data.val_split, True)}

    def check(progress: Callable[[], None]) -> tuple:
        start = time.perf_counter()
        tokenizer = check_tokenizer(cfg)
        checked = {
            role: check_streams(cfg, run_dir, *splits[role], progress, tokenizer) for role in roles
        }
        canonical, why = data_order.resolve(cfg.data.num_canonical_nodes, run_dir)
        log.info(
            "data (%s): %d stream(s) checked by rank 0 in %.2f s; num_canonical_nodes=%d (%s); "
            "node-local scratch %s",
            ", ".join(splits[role][0] for role in roles),
            sum(len(c) for c in checked.values()),
            time.perf_counter() - start,
            canonical,
            why,
            process.scratch_dir(cfg),
        )
        return tokenizer, checked, canonical

    ranks = Ranks.current()
    patience = cfg.fault.collective_timeout_s
    tokenizer, checked, canonical = ranks.from_rank0(check, patience, "checking the data")
    scratch = process.scratch_dir(cfg)
    sources = {role: stream_sources(c, scratch) for role, c in checked.items()}
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for role in roles:
            for source, stream in zip(sources[role], checked[role], strict=True):
                prepare_cache(source, stream)
        shm.clean_stale([str(Path(s.local) / s.split) for role in roles for s in sources[role]])
    ranks.barrier()  # each node's cache and shared memory are prepared by its local leader
    return tokenizer, {role: (sources[role], canonical) for role in roles}


class _StreamingThreadErrors(logging.Filter):
    """Keeps the tracebacks of streaming's failed download threads off stderr.

    Those threads fail inside a future's done-callback, and concurrent.futures logs the
    traceback; the reader gets the thread's error in one line instead (see
    `_dataset_class`). This filter on the concurrent.futures logger drops such records (ones
    raised in streaming's own code); others pass untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not any(
            "/streaming/" in f.filename for f in traceback.extract_tb(exc.__traceback__)
        )


_THREAD_ERRORS = _StreamingThreadErrors()


def _replication_notice(record: logging.LogRecord) -> bool:
    """streaming warns at every epoch start with `replication` (tensor-parallel groups
    sharing samples) to account for it in `state_dict`: the loader's state_dict does
    (streaming_compat), so the warning is dropped."""
    return "`replication` arg has been set" not in record.getMessage()


def _watch_streaming_threads() -> None:
    futures_log = logging.getLogger("concurrent.futures")
    if _THREAD_ERRORS not in futures_log.filters:
        futures_log.addFilter(_THREAD_ERRORS)
    dataset_log = logging.getLogger("streaming.base.dataset")
    if _replication_notice not in dataset_log.filters:
        dataset_log.addFilter(_replication_notice)


def _next(iterator: Iterator, sources: list[StreamSource], loader):
    """next(iterator), with streaming's shard failures turned into one-line DataErrors.

    A download thread's error arrives as "Background thread failed: ERROR", in this process
    or, from a DataLoader worker, inside torch's report of the worker's traceback. A loader
    that fails is done: its workers are ended first (see `_end_workers`).
    """
    try:
        return next(iterator)
    except StopIteration:
        raise
    except Exception as e:
        _end_workers(loader)
        thread = re.search(rf"{_THREAD_FAILED}: ([^\n]+)", str(e))
        text = thread.group(1) if thread else f"{type(e).__name__}: {' '.join(str(e).split())}"
        shard = re.search(r"[\w./-]*shard\.\d+\.mds(?:\.zstd)?", text)
        if shard is None and thread is None:
            raise
        where = f"shard {shard.group(0)}" if shard else "a shard"
        names = ", ".join(s.name for s in sources)
        raise DataError(f"{names}: {where} could not be read: {text[:300]}") from e


def _end_workers(loader) -> None:
    """Ends the worker processes of a DataLoader whose data failed.

    The failing batch's traceback keeps the loader alive until after the trainer returns,
    into interpreter exit, where multiprocessing waits for every worker to end: the workers
    ignore SIGTERM (`ignore_signals`), so the process would never exit. Torch's own shutdown
    ends idle workers; one still busy (waiting for a shard whose download failed in another
    worker: streaming shares shard states across a node's processes) is killed.
    """
    workers = getattr(loader, "_iterator", None)  # kept by a loader with persistent workers
    if workers is None or not hasattr(workers, "_shutdown_workers"):
        return
    workers._shutdown_workers()
    for worker in getattr(workers, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join()


def _pinned(device: torch.device | str | None) -> bool:
    """Batches for a CUDA device go to page-locked memory, so the trainer's
    `.to(device, non_blocking=True)` copies overlap compute."""
    return device is not None and torch.device(device).type == "cuda"


class TrainBatches:
    """An endless stream of (micro_batch_size, seq_len + 1) token batches for this rank."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        device: torch.device | None = None,
        checked: tuple[list[StreamSource], int] | None = None,
        dims: ParallelDims | None = None,
    ) -> None:
        """`checked`: `check_data`'s "train" verdict; None: a round of its own. `dims`: the
        run's parallel degrees (the ranks of a tensor-parallel group read the same samples);
        None: every rank is a data-parallel rank of its own."""
        bs = cfg.train.micro_batch_size
        _watch_streaming_threads()
        self.sources, canonical = checked or check_data(cfg, run_dir, ("train",))[1]["train"]
        tp = dims.tp if dims is not None else 1
        self.dataset = _dataset(cfg, self.sources, cfg.data.shuffle, bs, canonical, tp)
        self.loader = _loader(self.dataset, cfg, bs, pin_memory=_pinned(device))
        self._iter: Iterator | None = None

    def next(self) -> torch.Tensor:
        for _ in range(2):  # an epoch that ends right at a checkpoint yields nothing once
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                return _next(self._iter, self.sources, self.loader)
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

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        device: torch.device | None = None,
        checked: tuple[list[StreamSource], int] | None = None,
        dims: ParallelDims | None = None,
    ) -> None:
        """`checked`: `check_data`'s "val" verdict; None: a round of its own. `dims`: the
        run's parallel degrees (the ranks of a tensor-parallel group read the same samples);
        None: every rank is a data-parallel rank of its own."""
        bs = cfg.train.micro_batch_size
        _watch_streaming_threads()
        self.sources, canonical = checked or check_data(cfg, run_dir, ("val",))[1]["val"]
        tp = dims.tp if dims is not None else 1
        self.dataset = _dataset(cfg, self.sources, False, bs, canonical, tp)
        self.loader = _loader(self.dataset, cfg, bs, pin_memory=_pinned(device))

    def batches(self, n: int) -> Iterator[torch.Tensor]:
        iterator = iter(self.loader)
        for _ in range(n):
            try:
                yield _next(iterator, self.sources, self.loader)
            except StopIteration:
                return
