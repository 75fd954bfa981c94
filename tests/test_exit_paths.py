"""How a rank leaves when it cannot train on, each in a process of its own (plain Python, no
ranks): a stop signal after a peer's failure notice ends it at once even while its main
thread is blocked in C++; a stop without a notice is a preemption, which the watchdog ends
when no step follows; a teardown that hangs holding the GIL is ended by the timer that
takes over after training. The same paths with real ranks: test_faults.py, test_launch.py."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from pretrain.train.resilience import FAILED_KEY
from tests.helpers.runs import REPO

# The child's main thread waits on a store key nobody sets: blocked in C++ with the GIL
# released, as a rank is in a collective with a dead peer (Python signal handlers cannot
# run there; it returns after 60 s).
CHILD = """
import datetime, os, sys, time
import torch.distributed as dist
from pretrain.train.resilience import Preemption, Watchdog
mode = sys.argv[1]
p = Preemption(["SIGTERM"], rank=3)
if mode == "vote":
    w = Watchdog(0, sys.argv[2], rank=3, preemption=p, vote_floor_s=1, linger_s=0)
    w.beat(); w.beat()
print("ready", flush=True)
if mode == "teardown":
    import ctypes
    from pretrain.train.resilience import bound_teardown
    bound_teardown(0.5)
    ctypes.PyDLL(None).sleep(60)  # a C call that keeps the GIL: no Python thread runs
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
store.wait(["never"], datetime.timedelta(seconds=60))
"""


def child(mode: str, *args: str, port: int, attempt: int = 0) -> subprocess.Popen:
    """The child in `mode`, a worker of start `attempt` of a job with its store at `port`;
    `ready(child)` waits until it is set up (children start side by side: each spends
    seconds importing torch)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_RESTART_COUNT": str(attempt), "PYTHONUNBUFFERED": "1"}  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def ready(proc: subprocess.Popen) -> subprocess.Popen:
    assert proc.stdout.readline() == "ready\n", proc.communicate()
    return proc


def ended_within(proc: subprocess.Popen, seconds: float) -> tuple[int, str]:
    start = time.monotonic()
    _, err = proc.communicate(timeout=90)
    took = time.monotonic() - start
    assert took < seconds, f"took {took:.0f} s:\n{err}"
    return proc.returncode, err


def test_a_stop_signal_is_no_preemption_after_a_peer_failed_nor_when_no_step_follows(tmp_path):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
    jobs = {
        mode: child(mode, str(tmp_path / mode), port=server.port, attempt=attempt)
        for attempt, mode in enumerate(("notice", "vote"))
    }
    # A failure notice for the first start of the job (attempt 0), as a failing rank or the
    # launcher posts it; the next start ("vote") has none: its SIGTERM is a preemption.
    dist.PrefixStore("attempt_0", server).set(FAILED_KEY, "rank 1 failed: RuntimeError: x")
    for proc in jobs.values():
        ready(proc).send_signal(signal.SIGTERM)

    code, err = ended_within(jobs["notice"], 15)
    assert code == 128 + signal.SIGTERM
    assert err.strip() == (
        "rank 3: SIGTERM after rank 1 failed: RuntimeError: x: the job is stopping, "
        "not a preemption; exiting without a checkpoint"
    )
    # Preempted, but no step (and so no vote) follows: after the bound (1 s here; 3 steps'
    # time, at least 60 s, in training) it leaves with its stacks.
    code, err = ended_within(jobs["vote"], 15)
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM, then no step for" in err and "cannot agree on a preemption" in err, err
    (stacks,) = (tmp_path / "vote").glob("rank3-*.txt")
    wait = next(n for n, line in enumerate(CHILD.splitlines(), 1) if line.startswith("store.w"))
    assert f'File "<string>", line {wait} in <module>' in stacks.read_text()  # main thread


def test_a_teardown_that_hangs_holding_the_gil_is_ended(tmp_path):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
    code, err = ended_within(ready(child("teardown", port=server.port)), 15)
    assert code == 1 and "Timeout (0:00:00.500000)!" in err, err


def test_the_vote_bound_spares_a_first_step_saves_evaluations_and_closing(tmp_path):
    """The bound that ends a preemption no step follows (a peer is gone) judges step time
    only: not before a step's time is known (a first step may compile for minutes), not
    inside a save or an evaluation (which watchdog_s bounds), not once the steps ended."""
    import time
    import types

    from pretrain.train.resilience import Watchdog

    def watched() -> tuple[Watchdog, list[str]]:
        p = types.SimpleNamespace(
            requested=True, requested_at=time.monotonic(), agreed_at=None,
            signal_name="SIGTERM", saved_step=None,
        )  # fmt: skip
        w = Watchdog(0, tmp_path, rank=0, preemption=p, vote_floor_s=0.2, linger_s=0)
        aborts: list[str] = []
        w._abort = lambda why, code: aborts.append(why)
        return w, aborts

    w, aborts = watched()
    time.sleep(0.6)  # no step finished yet
    assert aborts == []
    w.stop()

    w, aborts = watched()
    w.beat()
    w.beat()  # steps of next to no time: the bound is its floor, 0.2 s
    with w.busy():  # a save
        time.sleep(0.6)
    assert aborts == []
    time.sleep(0.6)  # steps again, and none follows: a peer is gone
    assert aborts and "cannot agree on a preemption" in aborts[0]
    w.stop()

    w, aborts = watched()
    w.beat()
    w.beat()
    w.steps_ended()
    time.sleep(0.6)
    assert aborts == []
    w.stop()


@pytest.mark.slow
def test_a_finished_training_ends_at_once_and_leaves_nothing_behind(tiny_overrides, tmp_path):
    """`pretrain train` ends with os._exit once its trainer is closed, skipping the
    interpreter's finalization (about 1 s of CPU per rank). What a normal exit does that
    matters must still happen first: the DataLoader's worker processes end, streaming's
    shared memory is unlinked (atexit handlers), and the last console lines and the log
    reach their files. Run in a /dev/shm of its own, so anything left there is this run's."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"])
    if probe.returncode:
        pytest.skip("needs root for a private /dev/shm (unshare --mount)")
    script = (
        'mount -t tmpfs tmpfs /dev/shm && "$@"; code=$?; echo "left: $(ls -A /dev/shm)"; exit $code'
    )
    train = [sys.executable, "-m", "pretrain", "train", "configs/tiny.yaml", *tiny_overrides,
             "train.max_steps=4", "train.eval_every=4", "checkpoint.every=4", "data.num_workers=1"]  # fmt: skip
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *train],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    # No shared memory segment or semaphore is left; the one lock file stays, as lock files do.
    assert lines[-1] == "left: pretrain-streaming-register.lock", r.stdout
    assert "step      4/4 | val_loss" in lines[-2]  # the last line, flushed before the end
    children = subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True)
    assert children.stdout == b"", "a DataLoader worker outlived its training process"
