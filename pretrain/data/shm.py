"""Shared memory and lock files that mosaicml-streaming leaves behind after a crash.

Streaming registers each dataset's shared memory under a small integer prefix
(`/dev/shm/000003_locals`, `000003_barrier`, ...) and keeps file locks in the temp dir. A
killed run leaves both behind, and its next start then fails with "Reused local
directory". Streaming's own `clean_stale_shared_memory()` unlinks every prefix on the
machine, live ones of other runs included, so we clean only the prefixes registered to
this run's own stream folders. The run lock (`pretrain.rundir.lock_run_dir`) guarantees that no
live process of this run still uses them.

How a rank finds its dataset's prefix is replaced too (`get_shm_prefix`): in streaming every
rank counts the machine's prefixes up to the first free one, and the non-leaders then expect
their local leader to have registered that one. Another run's datasets come and go between
the counts (a job array, several runs per node), so a non-leader counts another number and
fails with "prefix=N was not registered by local leader". Here only the leader counts; the
other ranks look for the prefix registered with their own local folders.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pretrain.data.streaming_compat import PATCHED_VERSION, streaming_module

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
    Inside, StreamingDataset looks its prefix up with our `get_shm_prefix`.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
    lock = None
    if leader and SHM_DIR.is_dir():
        lock = open(SHM_DIR / "pretrain-streaming-register.lock", "a+")  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
    streaming = streaming_module()
    import streaming.base.dataset as dataset_module

    original = dataset_module.get_shm_prefix
    if SHM_DIR.is_dir() and streaming.__version__.startswith(PATCHED_VERSION):
        dataset_module.get_shm_prefix = get_shm_prefix  # what StreamingDataset.__init__ calls
    try:
        if distributed:
            dist.barrier()
        yield
        if distributed:
            dist.barrier()
    finally:
        dataset_module.get_shm_prefix = original
        if lock is not None:
            lock.close()


def get_shm_prefix(
    streams_local: list[str], streams_remote: list[str | None], world, retry: int = 100
):
    """streaming 0.13's `get_shm_prefix` (same arguments, same result, one barrier fewer),
    except that a non-leader finds the prefix its leader registered with `streams_local`
    instead of counting the machine's prefixes again (see the module's docstring)."""
    import torch.distributed as dist
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import (
        _check_and_find_retrying,
        _check_self,
        _get_path,
        _pack_locals,
    )

    _check_self(streams_local)
    if world.is_local_leader:
        prefix = max(
            _check_and_find_retrying(streams_local, streams_remote, name, retry)
            for name in SHM_TO_CLEAN
        )
        data = _pack_locals(streams_local, prefix)
        shm = SharedMemory(_get_path(prefix, LOCALS), True, len(data))
        shm.buf[: len(data)] = data
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the leaders have registered
    if not world.is_local_leader:
        prefix = leader_prefix(streams_local)
        shm = SharedMemory(_get_path(prefix, LOCALS), False)
    return prefix, shm


def leader_prefix(streams_local: list[str]) -> int:
    """The prefix whose `locals` segment registers exactly `streams_local`: the one this
    rank's local leader registered. Several (a crashed run of the same folders that
    `clean_stale` has not met): the newest."""
    from streaming.base.shared.prefix import _unpack_locals

    found = []
    for locals_file in SHM_DIR.glob("*_locals"):
        number = locals_file.name.split("_", 1)[0]
        try:
            their_locals, their_prefix = _unpack_locals(locals_file.read_bytes())
            registered = locals_file.stat().st_mtime_ns
        except (OSError, ValueError, UnicodeDecodeError):  # gone, or still being written
            continue
        if number.isdigit() and int(number) == their_prefix and their_locals == streams_local:
            found.append((registered, their_prefix))
    if not found:
        raise RuntimeError(
            f"no shared memory in {SHM_DIR} registers {streams_local}: the local leader "
            "(LOCAL_RANK 0) did not create this dataset with the same local folders"
        )
    return max(found)[1]
