"""Surviving what big clusters do to jobs: preemption, hangs and non-finite steps.

- `Preemption` turns the configured signals (SIGTERM, SIGUSR1, SIGUSR2 by default) into a
  request. At every step boundary each rank casts its flag in a `StepVote` (an all-reduce
  that runs while the next step computes) and acts on the previous boundary's result, so a
  signal on any one rank makes every rank save the same checkpoint, one step later, and
  exit with `fault.requeue_exit_code`, which launchers read as "requeue me".
- `Watchdog` is a thread that expects a `beat()` from the training loop. When none comes
  for `fault.watchdog_s` (a rank stuck in a collective or a kernel), or a preemption save
  overruns `fault.preempt_grace_s`, it writes the Python stack of every thread to
  `RUN_DIR/stacks/` and ends the process, so torchrun's restarts (or the scheduler) can
  act. Every rank runs one, so every rank's stack is on disk.
- Elastic restarts need nothing here: a restarted process finds the latest complete
  checkpoint like any other start; `restart_count()` is what gets logged.

Tests prove all of this with real processes by injecting faults (`faults.FaultInjection`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.errors import HANG_EXIT_CODE, REQUEUE_EXIT_CODE

log = logging.getLogger("pretrain")
LINGER_S = 3.0


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Preemption:
    def __init__(self, signals: list[str]) -> None:
        self.requested_at: float | None = None
        self.signal_name: str | None = None
        self._previous = {}
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # only records: the loop acts at a boundary
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StepVote:
    """The decisions every rank must take alike at a step boundary, agreed one step late so
    that agreeing never stalls the device: was a preemption signal seen on any rank, is a
    background checkpoint write still running on any rank.

    `cast()` at boundary k starts a MAX all-reduce of this rank's flags (on a GPU,
    `async_op=True` on a side stream, the result copied to pinned host memory as soon as it
    is reduced, so it returns at once; on CPU it simply reduces); `collect()` at boundary
    k+1 returns its result, finished by then, since it ran alongside step k+1. Every rank casts and collects at the same
    boundaries and acts on the same result, so all take the same decision at the same step.
    Reading a flag at every step instead (an all-reduce and `.item()`) would make the host
    wait for the device at every step. In one process the flags are their own result.
    """

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.device = device
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if distributed else 1
        self._pending = None
        self._agreed_running = True  # until a vote says otherwise: a write may be running
        self._running_here = True
        if device.type == "cuda" and self.world_size > 1:
            self._stream = torch.cuda.Stream(device)
            self._host = torch.empty(2, dtype=torch.int32, pin_memory=True)
            self._copied = torch.cuda.Event()

    def cast(self, preempted: bool) -> None:
        """Start this boundary's vote (every rank, the same boundaries)."""
        flags = (int(preempted), int(self._running_here))
        if self.world_size == 1:
            self._pending = flags
        elif self.device.type == "cuda":
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                votes = torch.zeros(2, dtype=torch.int32, device=self.device)
                for i, flag in enumerate(flags):
                    if flag:
                        votes[i] = 1  # a fill kernel: no copy from pageable host memory
                work = dist.all_reduce(votes, op=dist.ReduceOp.MAX, async_op=True)
                work.wait()  # the side stream waits for the collective; the host does not
                self._host.copy_(votes, non_blocking=True)
                self._copied.record(self._stream)
            self._pending = (votes, work)
        else:
            # On CPU (gloo) nothing runs alongside to overlap with, so the vote is a plain
            # blocking all-reduce. An async gloo work holding a tensor Python has dropped can
            # deadlock the process group's teardown: its worker thread needs the GIL to
            # free the tensor while the main thread, holding the GIL, waits for that worker
            # in ~ProcessGroupGloo (seen as a rank hanging after its last step).
            votes = torch.tensor(flags, dtype=torch.int32)
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
            self._pending = tuple(votes.tolist())

    def collect(self) -> bool:
        """Whether any rank was preempted, as of the last `cast()` (False if none pending);
        the agreed write flag is kept for `any_write_running`."""
        pending, self._pending = self._pending, None
        self._running_here = True  # unknown until this boundary's commit check says
        if pending is None:
            self._agreed_running = True
            return False
        if self.device.type == "cuda" and self.world_size > 1:
            self._copied.synchronize()  # the device is done with the previous step by now
            flags = self._host.tolist()
        else:
            flags = pending  # one process, or CPU: reduced when cast
        self._agreed_running = bool(flags[1])
        return bool(flags[0])

    def any_write_running(self, running_here: bool) -> bool:
        """`Checkpointer.commit_if_written`'s agreement: notes this rank's flag for the next
        vote and answers with the last vote's result, which still holds (a write that had
        finished on every rank then has finished now)."""
        self._running_here = running_here
        return self._agreed_running

    def write_started(self) -> None:
        """A checkpoint write began after this boundary's commit check: the vote must not
        report it finished."""
        self._running_here = True


class Watchdog:
    """Dumps every thread's stack and ends the process when training stops progressing."""

    def __init__(
        self,
        timeout_s: float,
        stack_dir: Path,
        rank: int,
        preemption: Preemption | None = None,
        grace_s: float = 0.0,
        requeue_exit_code: int = REQUEUE_EXIT_CODE,
    ) -> None:
        self.timeout_s = timeout_s
        self.stack_dir = Path(stack_dir)
        self.rank = rank
        self.preemption = preemption
        self.grace_s = grace_s
        self.requeue_exit_code = requeue_exit_code
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = max(0.05, min(1.0, self.timeout_s / 20 if self.timeout_s else 1.0))
        while not self._stop.wait(poll):
            now = time.monotonic()
            p = self.preemption
            if (
                p is not None
                and p.requested
                and self.grace_s
                and now - p.requested_at > self.grace_s
            ):
                self._abort(
                    f"preemption ({p.signal_name}) save did not finish within "
                    f"fault.preempt_grace_s={self.grace_s:g} s; the previous checkpoint stands",
                    self.requeue_exit_code,
                )
            if self.timeout_s and now - self._last > self.timeout_s:
                self._abort(
                    f"no training progress for {now - self._last:.0f} s "
                    f"(fault.watchdog_s={self.timeout_s:g})",
                    HANG_EXIT_CODE,
                )

    def _abort(self, why: str, code: int) -> None:
        self.stack_dir.mkdir(parents=True, exist_ok=True)
        path = self.stack_dir / f"rank{self.rank}-restart{restart_count()}-pid{os.getpid()}.txt"
        with open(path, "w") as f:
            f.write(f"{why}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        print(f"watchdog (rank {self.rank}): {why}; stacks in {path}", file=sys.stderr, flush=True)
        # Ranks stall together (at the same collective), so their watchdogs fire within a
        # moment of each other; linger so this exit does not end the others before they
        # have written their own stacks.
        time.sleep(LINGER_S)
        os._exit(code)
