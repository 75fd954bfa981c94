"""How ranks agree: small collectives for decisions, and waits in the c10d key-value store
for work that takes longer than a collective may wait (`Ranks`: a checkpoint's transfers,
rank 0's start-up checks); and which rank wrote a checkpoint file, read from its name
(`file_owner`). Every wait on another rank outside a collective polls the store here, in
one way (`_poll`), so its load on the store is known: a request every 2 s per rank at most.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from pretrain.errors import ConfigError, DataError, StoreError

T = TypeVar("T")
_ROUNDS = itertools.count()  # `from_rank0`'s keys: every rank makes the same calls in order
_ERRORS = {e.__name__: e for e in (ConfigError, DataError, StoreError)}

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
        """Every rank's `obj`, on rank 0 (None elsewhere).

        An all-gather, not `gather_object`: under NCCL a gather to rank 0 is point-to-point,
        so rank 0 would open a connection to every peer (1,023 at 1,024 ranks) on each
        checkpoint; the all-gather runs on the communicator the job already has. The objects
        are small (a rank's file sizes), so every rank holding all of them costs little."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out if self.rank == 0 else None

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

    def from_rank0(
        self,
        work: Callable[[Callable[[], None]], T],
        patience_s: float,
        what: str,
        error: type[Exception] = DataError,
    ) -> T:
        """`work(progress)` on rank 0 alone; its result, or its error, on every rank.

        For start-up checks of shared files that every rank would otherwise repeat: a first
        check of a large dataset reads all of it (an hour for tens of TB), far longer than
        a collective may wait. So the other ranks wait in the store, giving up only when
        rank 0 has made no progress (a `progress()` call) for `patience_s`
        (fault.collective_timeout_s); one broadcast then brings the verdict. Rank 0's
        ConfigError, DataError or StoreError is raised alike on every rank; any other
        becomes `error` ("rank 0 failed WHAT: ..."). `what`: e.g. "checking the data"."""
        if self.world_size == 1:
            return work(lambda: None)
        key = f"pretrain/rank0/{next(_ROUNDS)}"
        if self.rank != 0:
            beats = lambda: self.store.add(f"{key}/beat", 0)  # noqa: E731
            if not _poll(lambda: self.store.check([f"{key}/done"]), patience_s, beats):
                raise error(
                    f"global rank 0 made no progress {what} for {patience_s:.0f} s "
                    "(fault.collective_timeout_s); see its log"
                )
            outcome = self.broadcast(None)
            if outcome[0] == "error":
                raise _ERRORS.get(outcome[1], error)(outcome[2])
            return outcome[1]
        failure: BaseException | None = None
        try:
            outcome = ("ok", work(_beat(self.store, key)))
        except tuple(_ERRORS.values()) as e:
            failure, outcome = e, ("error", type(e).__name__, str(e))
        except Exception as e:
            failure = e
            text = " ".join(str(e).split())[:300]
            outcome = ("error", "", f"rank 0 failed {what}: {type(e).__name__}: {text}")
        self.store.set(f"{key}/done", "1")
        self.broadcast(outcome)
        if failure is not None:
            raise failure
        return outcome[1]


def _beat(store: Any, key: str) -> Callable[[], None]:
    """Rank 0's progress signal for `from_rank0`: a counter in the store, bumped at most
    once a second."""
    last = [0.0]

    def progress() -> None:
        if time.monotonic() - last[0] >= 1.0:
            last[0] = time.monotonic()
            store.add(f"{key}/beat", 1)

    return progress


def _poll(
    ready: Callable[[], bool], timeout_s: float, progress: Callable[[], Any] | None = None
) -> bool:
    """Poll `ready()` until it is true (True) or `timeout_s` has passed (False); with
    `progress`, the time counts from the last change of its value."""
    deadline, pause, seen = time.monotonic() + timeout_s, 0.02, None
    while not ready():
        if progress is not None and (value := progress()) != seen:
            seen, deadline = value, time.monotonic() + timeout_s
        if time.monotonic() > deadline:
            return False
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 2.0)  # a request or two every 2 s per rank at most
    return True
