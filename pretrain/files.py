"""Durable files: atomic writes, fsync of files and folders, and advisory (flock) locks.

A lock is held on an open file with flock: the kernel drops it when the holder dies, even by
kill -9, so a stale lock never blocks a restart. Some shared filesystems have no flock at all
(Lustre mounted `noflock`: ENOSYS; NFS without a lock daemon: ENOLCK): there a lock is a
warning, once per process, and the work goes on unguarded, since refusing would stop every
launcher and every run on that filesystem.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

from pretrain import iotrace
from pretrain.errors import ConfigError

log = logging.getLogger("pretrain")
# What a filesystem without flock answers: ENOSYS (Lustre `noflock`), ENOLCK (NFS without
# lockd), EOPNOTSUPP (some FUSE filesystems).
NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)
_warned_no_flock = False


def _try_lock(f: IO, path: Path, what: str) -> bool | None:
    """flock `f` (exclusive, non-blocking): True if we hold it, False if someone else does,
    None (and a warning, once per process) when the filesystem has no flock."""
    global _warned_no_flock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
        if not _warned_no_flock:
            _warned_no_flock = True
            log.warning(
                "%s: the filesystem does not support locks (%s); going on without them, so "
                "nothing stops a second %s from using %s at the same time",
                path, errno.errorcode.get(e.errno, e.errno), what, path.parent,
            )  # fmt: skip
        return None
    return True


def hold(path: Path, what: str) -> IO:
    """Lock `path` (created if missing) and write our pid into it; the open file is the
    lock: keep it open for as long as it must be held. A held lock is a ConfigError
    naming `what` holds it and its pid. Without flock on the filesystem: a warning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - the caller holds it
    if _try_lock(f, path, what) is False:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"{path.parent} is in use by another {what} (pid {pid})")
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def owner(path: Path, what: str = "process") -> str | None:
    """The pid holding the lock at `path`, or None when nobody holds it (or when the
    filesystem has no locks to tell: see `hold`)."""
    if not path.exists():
        return None
    with open(path, "a+") as f:
        locked = _try_lock(f, path, what)
        if locked is False:
            f.seek(0)
            return f.read().strip() or "unknown"
        if locked:
            fcntl.flock(f, fcntl.LOCK_UN)
        return None


@contextmanager
def atomic_open(path: Path, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into: it replaces `path` when the block
    ends, so a reader (or a restart after a crash) finds the old content or the new, never
    a part. On an error the old file stays and the temporary one is removed.

    The temporary name is in the same folder (a rename does not cross filesystems) and
    carries host and pid: on a shared filesystem two writers never share one. `durable`:
    fsync before the rename, so the new content is on disk when it has the name; False
    for a cache that is cheap to rebuild. The folder entry itself is not fsynced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{temp_prefix(path.name)}{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
                iotrace.record(iotrace.FSYNC, path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_prefix(name: str) -> str:
    """How the temporary files of `atomic_open(FOLDER/name)` are named: this, then host-pid."""
    return f".{name}.tmp-"


def write_atomic(path: Path, data: bytes | str, durable: bool = True) -> None:
    """Replace `path` with `data` (str: UTF-8) atomically; see `atomic_open`."""
    with atomic_open(path, durable) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json(path: Path, obj: Any, indent: int | None = 1, durable: bool = True) -> None:
    """Replace `path` with `obj` as JSON text (ending in a newline) atomically."""
    write_atomic(path, json.dumps(obj, indent=indent) + "\n", durable)


def write_durable(path: Path, data: bytes | str) -> None:
    """Write and fsync `path` in place, without a temporary name: for a file in a folder
    that is renamed into place only after it is written (a checkpoint's manifest), where
    the folder's rename is the atomic step."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    iotrace.record(iotrace.FSYNC, path)


def sync_files(folder: Path, names: list[str], missing_ok: bool = False) -> dict[str, int]:
    """fsync each named file under `folder`; name -> size (read from the open file)."""
    sizes = {}
    for name in names:
        try:
            fd = os.open(folder / name, os.O_RDONLY)
        except FileNotFoundError:
            if missing_ok:
                continue
            raise
        try:
            os.fsync(fd)
            sizes[name] = os.fstat(fd).st_size
        finally:
            os.close(fd)
        iotrace.record(iotrace.FSYNC, folder / name)
        iotrace.record(iotrace.STAT, folder / name)
    return sizes


def sync_folders(folder: Path, names) -> None:
    """fsync `folder` and the subfolders holding `names` (their entries must be durable
    before the folder is renamed into place)."""
    for sub in sorted({str(Path(n).parent) for n in names} - {"."}):
        fsync_path(folder / sub)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    iotrace.record(iotrace.FSYNC, path)
