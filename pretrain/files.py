"""Durable files: atomic writes, fsync of files and folders, and advisory (flock) locks.

A lock is held on an open file with flock: the kernel drops it when the holder dies, even by
kill -9, so a stale lock never blocks a restart.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any

from pretrain import iotrace
from pretrain.errors import ConfigError


def hold(path: Path, what: str) -> IO:
    """Lock `path` (created if missing) and write our pid into it; the open file is the
    lock: keep it open for as long as it must be held. A held lock is a ConfigError
    naming `what` holds it and its pid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - the caller holds it
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise ConfigError(f"{path.parent} is in use by another {what} (pid {pid})") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def owner(path: Path) -> str | None:
    """The pid holding the lock at `path`, or None when nobody holds it."""
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "unknown"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary name in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    iotrace.record(iotrace.FSYNC, path)
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    iotrace.record(iotrace.FSYNC, path)
