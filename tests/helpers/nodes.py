"""Several "nodes" on this machine, for multi-node tests with real processes.

Each node is a `pretrain launch` agent (and the ranks it starts) in namespaces of its own
(`unshare --mount --uts --pid`):
- its own hostname (node0, node1, ...), resolvable by every node: a private /etc/hosts
  gives node K the loopback address 127.0.0.(10+K), so torchrun's rendezvous tells the
  nodes apart, and the workers' store and gloo connect to the node that hosts them;
- its own /dev/shm (a tmpfs), as streaming's shared memory is per machine;
- its own node-local scratch folder, seen by every node at the same path (as /scratch
  would be on a cluster) but backed by a folder per node, so a test can look inside;
- its own PID namespace, so one SIGKILL of the namespace's init takes the whole node down
  at once (agent, ranks, DataLoader workers), as a machine that loses power would.

The nodes share everything else: the filesystem (the run directory), loopback, the
object store. Starting a node again after a kill is what SLURM does when it restarts a
job step on a node. Needs root (or unprivileged user namespaces): `available()` says.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.runs import REPO

# Mounts of a node, run by the namespace's init shell before it starts the agent.
_SETUP = (
    'hostname "$NODE_NAME"'
    " && mount -t tmpfs -o size=512m tmpfs /dev/shm"
    ' && mount --bind "$NODE_HOSTS" /etc/hosts'
    ' && mount --bind "$NODE_SCRATCH_SRC" "$NODE_SCRATCH"'
    ' && "$@"'  # not exec: the shell stays the init, so killing it ends the whole node
)


def available() -> str | None:
    """None when nodes can be made here, else why not."""
    probe = subprocess.run(
        ["unshare", "--mount-proc", "--uts", "--pid", "--fork", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"unshare --pid --uts --mount needs root here: {probe.stderr.strip()}"
    return None


def address(index: int) -> str:
    return f"127.0.0.{10 + index}"


class Node:
    """One simulated machine; `start` runs `pretrain launch ARGS` on it."""

    def __init__(self, cluster: Cluster, index: int) -> None:
        self.cluster = cluster
        self.index = index
        self.name = f"node{index}"
        self.scratch = cluster.root / self.name / "scratch"  # what the node sees at cluster.scratch
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.log = cluster.root / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, *launch_args: str, env: dict | None = None) -> Node:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        cmd = [
            "unshare", "--mount-proc", "--uts", "--pid", "--fork", "--kill-child",
            "--propagation", "private", "sh", "-c", _SETUP, "sh",
            sys.executable, "-m", "pretrain", "launch", *launch_args,
        ]  # fmt: skip
        node_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONFAULTHANDLER": "1",  # SIGABRT prints every thread's stack (dump_stacks)
            "NODE_NAME": self.name,
            "NODE_HOSTS": str(self.cluster.hosts),
            "NODE_SCRATCH_SRC": str(self.scratch),
            "NODE_SCRATCH": str(self.cluster.scratch),
            "PRETRAIN_SCRATCH": str(self.cluster.scratch),
            **self.cluster.env,
            **(env or {}),
        }
        self.starts += 1
        with open(self.log, "a") as out:
            out.write(f"===== {self.name} start {self.starts}: {' '.join(launch_args)}\n")
            out.flush()
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=node_env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self

    def kill(self) -> None:
        """SIGKILL the namespace's init: the kernel kills every process of the node."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        pids = children.read_text().split() if children.exists() else []
        for pid in pids or [str(self.proc.pid)]:  # unshare --kill-child passes it on
            os.kill(int(pid), signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Cluster:
    """`n` nodes under `root` (hosts file, per-node scratch, agent logs); `env` is given to
    every node (object-store endpoint and credentials, trace folder)."""

    def __init__(self, root: Path, n: int, env: dict | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.hosts = root / "hosts"
        lines = ["127.0.0.1 localhost"] + [f"{address(i)} node{i}" for i in range(n)]
        self.hosts.write_text("\n".join(lines) + "\n")
        # Every node mounts its own scratch at this one path, as /scratch on a cluster: a
        # short path, as a rank's temp folder in it must leave room for a socket's name
        # (108 bytes in all), so an empty folder in the system's temp dir, not under root.
        self.scratch = Path(tempfile.mkdtemp(prefix="scratch-"))
        self.env = dict(env or {})
        self.nodes = [Node(self, i) for i in range(n)]

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def wait(self, timeout: float, nodes: list[Node] | None = None) -> list[int]:
        """Exit codes of `nodes` (default: all), waiting at most `timeout` s in all."""
        deadline = time.time() + timeout
        codes = []
        for node in nodes or self.nodes:
            try:
                codes.append(node.wait(max(deadline - time.time(), 0.1)))
            except subprocess.TimeoutExpired:
                self.dump_stacks()
                self.stop()
                raise AssertionError(
                    f"{node.name} still running after {timeout} s\n{self.logs()}"
                ) from None
        return codes

    def stop(self) -> None:
        """Kill every node still running, and remove the (empty) scratch mount point."""
        for node in self.nodes:
            if node.running():
                node.kill()
        with contextlib.suppress(OSError):
            self.scratch.rmdir()

    def dump_stacks(self) -> None:
        """SIGABRT to every training process still running: with PYTHONFAULTHANDLER, each
        writes its threads' stacks to its rank's log, to see where a job hangs."""
        roots = {str(n.proc.pid) for n in self.nodes if n.running()}
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError):
                parents[stat.parent.name] = stat.read_text().rsplit(")", 1)[1].split()[1]
        for pid in parents:
            chain, p = set(), pid
            while p in parents and p not in chain:
                chain.add(p)
                p = parents[p]
            cmdline = Path(f"/proc/{pid}/cmdline")
            with contextlib.suppress(OSError):
                if chain & roots and b"pretrain\0train" in cmdline.read_bytes():
                    os.kill(int(pid), signal.SIGABRT)
        time.sleep(2)

    def logs(self, tail: int = 60) -> str:
        """The last lines of every node's agent output, for assertion messages."""
        return "\n".join(
            f"--- {n.name}\n" + "\n".join(n.output().splitlines()[-tail:]) for n in self.nodes
        )
