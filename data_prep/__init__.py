"""Offline data preparation: train a tokenizer, then pack tokenized text into MDS shards.

`pretrain prep tokenizer` and `pretrain prep shards` (see `data_prep.cli`) are the entry
points. This module holds the two things every step shares: the error type for mistakes the
user can fix (printed as one line, never a traceback) and the atomic file write that lets a
half-finished run never look finished.
"""

from __future__ import annotations

import os
from pathlib import Path


class PrepError(Exception):
    """A problem with the user's inputs or flags; the message is one actionable line."""


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
