"""Counts of the operations whose number must not grow with the cluster, per process.

At 1,000 ranks on a shared filesystem or an object store, what hurts is not one slow
call but a call every rank makes for every rank's files, on every start: hashing every
shard, listing a prefix, fsyncing or stat-ing another rank's checkpoint files. Code that
does such work calls `record(kind, what)`; with `PRETRAIN_IO_TRACE=DIR` set, each
process appends one JSON line per call to `DIR/HOST-PID.jsonl` (with its rank), so a test
can count them per rank and per start, and a user can see where a slow start goes.
Unset (the default), `record` is a dictionary lookup and returns.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from pathlib import Path

ENV = "PRETRAIN_IO_TRACE"

# The kinds recorded, so readers and writers agree on the names.
HASH = "hash"  # a data shard read whole to check its hash
LIST = "list"  # an object-store listing
FSYNC = "fsync"  # a file or folder made durable
STAT = "stat"  # a file's size read to check a checkpoint
UPLOAD = "upload"  # a file sent to the object store
DOWNLOAD = "download"  # a file fetched from the object store


def record(kind: str, what: str = "") -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    line = {
        "kind": kind,
        "what": str(what),
        "rank": int(os.environ.get("RANK", "0")),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "t": time.time(),
    }
    path = Path(folder) / f"{socket.gethostname()}-{os.getpid()}.jsonl"
    with open(path, "a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps(line) + "\n")


def read(folder: str | Path) -> list[dict]:
    """Every record under `folder`, oldest first."""
    records = []
    for path in Path(folder).glob("*.jsonl"):
        for text in path.read_text().splitlines():
            if text.strip():
                records.append(json.loads(text))
    return sorted(records, key=lambda r: r["t"])


def counts(records: list[dict], kind: str) -> Counter:
    """How many records of `kind` each rank made."""
    return Counter(r["rank"] for r in records if r["kind"] == kind)
