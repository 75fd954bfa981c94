"""Shared memory and lock files that mosaicml-streaming leaves behind after a crash.

Streaming registers each dataset's shared memory under a small integer prefix
(`/dev/shm/000003_locals`, `000003_barrier`, ...) and keeps file locks in the temp dir. A
killed run leaves both behind, and its next start then fails with "Reused local
directory". Streaming's own `clean_stale_shared_memory()` unlinks every prefix on the
machine, live ones of other runs included, so we clean only the prefixes registered to
this run's own stream folders. The run lock (`pretrain.rundir.lock_run_dir`) guarantees that no
live process of this run still uses them.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pretrain.data.streaming_compat import streaming_module

log = logging.getLogger("pretrain")
SHM_DIR = Path("/dev/shm")


def registered_locals(locals_file: Path) -> list[str]:
    """The local folders a `NNNNNN_locals` segment registers (streaming's packed format)."""
    data = locals_file.read_bytes()
    size = int(np.frombuffer(data[:4], np.int32)[0])
    return data[4:size].decode("utf-8", errors="replace").split("\0")[:-1]


def clean_stale(stream_dirs: list[str]) -> int:
    """Unlink the segments of prefixes registered to any of `stream_dirs`; how many prefixes."""
    streaming_module()  # the torchvision-safe import, before any streaming submodule
    from streaming.base.constant import SHM_TO_CLEAN

    ours = {os.path.abspath(d) for d in stream_dirs}
    cleaned = 0
    for locals_file in sorted(SHM_DIR.glob("*_locals")) if SHM_DIR.is_dir() else []:
        prefix = locals_file.name.split("_", 1)[0]
        try:
            if not ours & set(registered_locals(locals_file)):
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for name in SHM_TO_CLEAN:
            (SHM_DIR / f"{prefix}_{name}").unlink(missing_ok=True)
        cleaned += 1
    if cleaned:
        log.info("removed shared memory left by %d earlier dataset(s) of this run", cleaned)
    return cleaned


@contextmanager
def registering_in_turn() -> Iterator[None]:
    """Around the creation of a StreamingDataset: runs on one node take turns.

    Streaming picks the first prefix no segment in /dev/shm uses, then (after a barrier)
    creates it: two runs starting on one node at the same moment (a job array, several
    single-GPU runs on one machine) can pick the same prefix, and one fails with
    FileExistsError. The local leader holds an exclusive lock on a file in /dev/shm (which
    is per node, like the segments) from before its ranks look until after they created;
    the barrier makes every rank of the run look only once its leader holds the lock.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    lock = None
    if leader and SHM_DIR.is_dir():
        lock = open(SHM_DIR / "pretrain-streaming-register.lock", "a+")  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        if distributed:
            dist.barrier()
        yield
        if distributed:
            dist.barrier()
    finally:
        if lock is not None:
            lock.close()
