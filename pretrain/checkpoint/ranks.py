"""Which rank does what in a checkpoint: small collectives and store waits (`Ranks`), and
which rank wrote a file, read from its name (`file_owner`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

# Files only rank r writes: DCP's `__{r}_{n}.distcp`, DeepSpeed's `zero_pp_rank_{r}_...pt`
# (ZeRO optimizer state; with stage 3 model state too), our `rng_rank{r}.pt`. Everything
# else is rank 0's (DCP `.metadata`, DeepSpeed `mp_rank_00_model_states.pt` and recovery
# scripts, train_state.json, config.yaml, zero.json).
RANK_FILE = re.compile(
    r"(?:^|/)(?:__(\d+)_\d+\.distcp|rng_rank(\d+)\.pt|(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_\w+\.pt)$"
)


def file_owner(name: str) -> int:
    """The rank that writes checkpoint file `name` (relative to the checkpoint folder)."""
    match = RANK_FILE.search(name)
    return 0 if match is None else int(next(g for g in match.groups() if g is not None))


class Ranks:
    """How the ranks of a checkpoint agree: small collectives for decisions (which files,
    which checkpoint), and the c10d key-value store for waiting on each other's transfers,
    which may take far longer than a collective may wait. In one process (no process
    group) the collectives return at once and an in-memory store stands in."""

    def __init__(self, rank: int = 0, world_size: int = 1, store: Any = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.store = store if store is not None else dist.HashStore()

    @classmethod
    def current(cls) -> Ranks:
        """The default process group's ranks, or one process when there is none."""
        if dist.is_available() and dist.is_initialized():
            from torch.distributed.distributed_c10d import _get_default_store

            return cls(dist.get_rank(), dist.get_world_size(), _get_default_store())
        return cls()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # Waiting outside collectives: keys in the store, polled until a deadline.
    def report(self, key: str, error: str | None = None) -> None:
        """This rank's part of `key` has ended, with `error` (one line) when it failed."""
        if error is not None:
            self.store.set(f"{key}/error", f"rank {self.rank}: {error}")
        self.store.add(f"{key}/done", 1)

    def wait_reports(self, key: str, timeout_s: float) -> str | None:
        """Wait until every rank reported `key`; the error one reported, or None."""
        done = _poll(lambda: self.store.add(f"{key}/done", 0) >= self.world_size, timeout_s)
        if not done:
            n = self.store.add(f"{key}/done", 0)
            return f"{self.world_size - n} of {self.world_size} ranks did not finish within {timeout_s:.0f} s"
        if self.store.check([f"{key}/error"]):
            return self.store.get(f"{key}/error").decode()
        return None

    def announce(self, key: str, value: str) -> None:
        self.store.set(f"{key}/end", value)

    def wait_announced(self, key: str, timeout_s: float) -> str | None:
        """What was announced for `key`, or None when nothing was within `timeout_s`."""
        if not _poll(lambda: self.store.check([f"{key}/end"]), timeout_s):
            return None
        return self.store.get(f"{key}/end").decode()


def _poll(ready: Callable[[], bool], timeout_s: float) -> bool:
    deadline, pause = time.monotonic() + timeout_s, 0.02
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 1.0)  # a few store requests a second per rank at most
    return True
