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
- A stop is not a preemption when a peer failed: torchrun's agent answers a worker's failure
  by sending SIGTERM to every other worker, the same signal a scheduler's preemption sends.
  A rank that leaves on an error (and `pretrain launch`'s agent, for a worker that died
  without a word) first writes a failure notice in the workers' store (`announce_failure`).
  A signal thread reads the notice when a signal arrives, even while the main thread is
  blocked in a collective with the dead peer: with a notice (or no store left to ask) the
  rank exits at once, without a vote or a checkpoint, instead of waiting for SIGKILL. A
  signal without one is a preemption; if the ranks then cannot agree on it within a bound
  (a peer vanished without a notice) the watchdog ends the rank the same way.

Tests prove all of this with real processes by injecting faults (`faults.FaultInjection`).
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.errors import HANG_EXIT_CODE, REQUEUE_EXIT_CODE

log = logging.getLogger("pretrain")
LINGER_S = 3.0
# A preemption's vote is agreed within two step boundaries of the signal: past this many
# times the longest interval between two beats (at least VOTE_FLOOR_S), it never will be.
VOTE_STEPS = 3
VOTE_FLOOR_S = 60.0
# Seconds a process may take to end once training is over (`bound_teardown`).
TEARDOWN_S = 60.0
# The key of the failure notice in the workers' store, under the prefix of one start of the
# workers (a restart begins without one).
FAILED_KEY = "pretrain/failed"


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def job_store(
    addr: str | None = None,
    port: int | str | None = None,
    attempt: int | str | None = None,
    timeout_s: float = 5.0,
):
    """A new client of the workers' store (torchrun's MASTER_ADDR:MASTER_PORT, or the one
    given), under the prefix of the workers' start `attempt` (default: this process's), as
    `device.init_distributed` lays it out; None outside torchrun. A client of its own, not
    the process group's: its calls never queue behind a main thread waiting on that one."""
    addr = addr or os.environ.get("MASTER_ADDR")
    port = port or os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    if attempt is None:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    timeout = datetime.timedelta(seconds=timeout_s)
    base = dist.TCPStore(addr, int(port), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"attempt_{attempt}", base)


def announce_failure(why: str, store=None) -> None:
    """Tell the other workers that this start of the job failed (`why`: one line, e.g. "rank
    3 failed: RuntimeError: ..."), so that the stop torchrun sends them next is not taken
    for a preemption. The first notice stands; a store that is gone is no error here."""
    try:
        store = store or job_store()
        if store is not None:
            store.compare_set(FAILED_KEY, "", why[:300])
    except Exception as e:  # leaving anyway: the peers' vote bound still holds
        log.warning("could not post the failure notice (%s)", e)


def failure_notice(store=None) -> str | None:
    """The failure notice of this start of the job, if a worker or agent posted one; a
    store that cannot be reached counts as one (the node that held it is gone). None
    outside torchrun."""
    for attempt in (1, 2):  # at a preemption, every rank asks at once: a timeout may pass
        try:
            store = store or job_store()
            if store is None or not store.check([FAILED_KEY]):
                return None
            return store.get(FAILED_KEY).decode()
        except Exception as e:  # twice: no store, the job is going down
            if attempt == 2:
                return f"the workers' store is unreachable ({type(e).__name__})"
            time.sleep(1.0)


def bound_teardown(limit_s: float = TEARDOWN_S) -> None:
    """Training is over: from here to the process's end (tearing down the process group,
    the interpreter's own shutdown) a C-level timer ends the process after `limit_s`,
    writing every thread's stack to stderr (the rank's log) and exiting with status 1.

    It takes over from the `Watchdog` thread, which could not do this: a teardown that
    hangs in C++ holding the GIL (as `~ProcessGroupGloo` waiting for a worker thread that
    needs it) stops every Python thread, and daemon threads stop anyway once the
    interpreter shuts down. faulthandler's timer needs neither.
    """
    faulthandler.dump_traceback_later(limit_s, exit=True, file=sys.stderr)


class Preemption:
    """The configured signals as a preemption request, unless a peer's failure explains them.

    Python runs a signal handler only when the main thread returns to the interpreter, which
    a rank blocked in a collective with a dead peer never does. So the C-level handler also
    wakes a thread of its own (`signal.set_wakeup_fd`), which records the request at once and
    reads the failure notice (`failure_notice`): with one, the rank exits right there.
    """

    def __init__(self, signals: list[str], rank: int = 0, notice=failure_notice) -> None:
        self.requested_at: float | None = None
        self.signal_name: str | None = None
        self.agreed_at: float | None = None  # when every rank agreed to save for it
        self.saved_step: int | None = None  # its checkpoint, once committed (then: uploads)
        self.rank = rank
        self._notice = notice
        self._previous = {}
        self._numbers = {int(getattr(signal, name)) for name in signals}
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        self._wake, self._woken = socket.socketpair()
        self._wake.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._wake.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="signals", daemon=True).start()

    def _handle(self, signum, frame) -> None:  # only records: the loop acts at a boundary
        self._record(signum)

    def _record(self, signum: int) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name

    def _watch(self) -> None:
        # The thread holds both sockets for the life of the process: the wakeup fd must
        # never name a closed (or reused) file descriptor.
        woken = self._woken
        while True:
            try:
                data = woken.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self._numbers and self.agreed_at is None:
                    self._record(signum)
                    self._stop_if_a_peer_failed(signum)

    def _stop_if_a_peer_failed(self, signum: int) -> None:
        notice = self._notice()
        if notice is None:
            return
        name = signal.Signals(signum).name
        print(
            f"rank {self.rank}: {name} after {notice}: the job is stopping, not a preemption; "
            "exiting without a checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def agreed(self) -> None:
        """Every rank agreed to save for this preemption: later signals change nothing."""
        self.agreed_at = time.monotonic()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._previous = {}


class StepVote:
    """The decisions every rank must take alike at a step boundary, agreed one step late so
    that agreeing never stalls the device: was a preemption signal seen on any rank, is a
    background checkpoint write still running on any rank.

    `cast()` at boundary k starts a MAX all-reduce of this rank's flags (on a GPU,
    `async_op=True` on a side stream, the result copied to pinned host memory as soon as it
    is reduced, so it returns at once; on CPU it simply reduces); `collect()` at boundary
    k+1 returns its result, finished by then, since it ran alongside step k+1. Every rank
    casts and collects at the same boundaries and acts on the same result, so all take the
    same decision at the same step. Reading a flag at every step instead (an all-reduce and
    `.item()`) would make the host wait for the device at every step. In one process the
    flags are their own result.

    The tensor every vote reduces is one buffer the vote owns for its whole life, and a
    GPU vote's work handle is kept until `collect()` has waited on it. A collective's
    worker (gloo's, NCCL's watchdog) drops its own references to a tensor after the host
    saw the result; when that was the last one, to a tensor whose Python object had been
    dropped, the worker must take the GIL to free it, and deadlocks against a main thread
    that holds the GIL while it tears the process group down (seen as a rank hanging
    after its last step). Keep the vote alive until the group is gone (the trainer does).
    """

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.device = device
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = world_size if distributed else 1
        self._pending = None
        self._agreed_running = True  # until a vote says otherwise: a write may be running
        self._running_here = True
        self._votes = torch.zeros(2, dtype=torch.int32, device=device)
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
                self._votes.zero_()  # the last vote's copy to the host is done (collect)
                for i, flag in enumerate(flags):
                    if flag:
                        self._votes[i] = 1  # a fill kernel: no copy from pageable memory
                work = dist.all_reduce(self._votes, op=dist.ReduceOp.MAX, async_op=True)
                work.wait()  # the side stream waits for the collective; the host does not
                self._host.copy_(self._votes, non_blocking=True)
                self._copied.record(self._stream)
            self._pending = work
        else:
            # On CPU (gloo) nothing runs alongside to overlap with, so the vote is a plain
            # blocking all-reduce (an async one would leave a work, and its tensor, to a
            # worker thread until the next boundary).
            self._votes[0], self._votes[1] = flags
            dist.all_reduce(self._votes, op=dist.ReduceOp.MAX)
            self._pending = tuple(self._votes.tolist())

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
            pending.wait()  # done: raises if the collective failed; the handle ends here
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
    """Dumps every thread's stack and ends the process when training stops progressing, or a
    preemption signal is not followed by a step or an agreed vote within a bound (`_watch`).
    After training, `bound_teardown` takes over."""

    def __init__(
        self,
        timeout_s: float,
        stack_dir: Path,
        rank: int,
        preemption: Preemption | None = None,
        grace_s: float = 0.0,
        requeue_exit_code: int = REQUEUE_EXIT_CODE,
        vote_floor_s: float = VOTE_FLOOR_S,
        linger_s: float = LINGER_S,
    ) -> None:
        self.timeout_s = timeout_s
        self.stack_dir = Path(stack_dir)
        self.rank = rank
        self.preemption = preemption
        self.grace_s = grace_s
        self.requeue_exit_code = requeue_exit_code
        self.vote_floor_s = vote_floor_s
        self.linger_s = linger_s
        self._last = time.monotonic()
        self._longest = 0.0  # the longest interval between two beats so far
        self._busy = 0  # inside a save or evaluation: bounded by timeout_s alone
        self._steps_ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        now = time.monotonic()
        self._longest = max(self._longest, now - self._last)
        self._last = now

    def stop(self) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def busy(self):
        """A save or an evaluation: a phase the preemption vote's bound, which is measured
        in step times, must not judge (the loop votes again after it)."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self._last = time.monotonic()  # progress, but not a step's time

    def steps_ended(self) -> None:
        """No vote is coming any more (the run is closing): the vote's bound is off."""
        self._steps_ended = True

    def _watch(self) -> None:
        # A twentieth of the shortest bound it enforces: each fires within 5% of its time.
        bounds = [b for b in (self.timeout_s, self.grace_s, self.vote_floor_s) if b]
        poll = max(0.05, min([1.0, *(b / 20 for b in bounds)]))
        while not self._stop.wait(poll):
            now = time.monotonic()
            p = self.preemption
            if (
                p is not None
                and p.requested
                and self.grace_s
                and now - p.requested_at > self.grace_s
            ):
                if p.saved_step is None:
                    why = "save did not finish; the previous checkpoint stands"
                else:  # committed locally; only the upload to checkpoint.remote was left
                    why = (
                        f"checkpoint of step {p.saved_step} is saved in the run directory, but "
                        "its upload to checkpoint.remote did not finish"
                    )
                self._abort(
                    f"preemption ({p.signal_name}): {why} within "
                    f"fault.preempt_grace_s={self.grace_s:g} s",
                    self.requeue_exit_code,
                )
            # The vote's bound, armed once a step's time is known (a first step may compile
            # for minutes) and outside saves and evaluations, until the steps end.
            if (
                p is not None
                and p.requested
                and p.agreed_at is None
                and self._longest > 0
                and not self._busy
                and not self._steps_ended
            ):
                stalled = now - max(p.requested_at, self._last)
                if stalled > max(self.vote_floor_s, VOTE_STEPS * self._longest):
                    signum = int(signal.Signals[p.signal_name])
                    self._abort(
                        f"{p.signal_name}, then no step for {stalled:.0f} s: the ranks cannot "
                        "agree on a preemption checkpoint (a peer is gone); not a "
                        "preemption, exiting without a checkpoint",
                        128 + signum,
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
        time.sleep(self.linger_s)
        os._exit(code)
