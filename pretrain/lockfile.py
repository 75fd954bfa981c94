"""Exclusive, process-lifetime locks on files (flock): the kernel drops them on any exit,
even kill -9, so a lock never outlives its process. Used for the run directory (one
training process tree per run) and by the launcher."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from pretrain.config import ConfigError


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
