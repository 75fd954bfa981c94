"""A real SLURM cluster of several nodes on this machine, on loopback, for tests.

Debian's slurm-wlm 22.05 and munge, run as root with their own munge key and free ports, so it
talks to nothing else and cannot meet a cluster left running by an earlier session. The
package is built with --enable-multiple-slurmd (`scontrol show config`: MULTIPLE_SLURMD=Yes),
so one machine runs one slurmd per node, each at 127.0.0.1 on a port of its own. Each slurmd
runs in namespaces of its own, which everything it starts (job scripts, srun tasks, ranks)
inherits, as on a machine of its own:
- a hostname (UTS namespace): node1, node2, ... (torch's rendezvous and gloo use it);
- an /etc/hosts naming every node at 127.0.0.1 (bind-mounted in its mount namespace);
- its own tmpfs /dev/shm (streaming's shared memory is per node) and node-local scratch
  (`scratch`, a tmpfs at the same path on every node, as $PRETRAIN_SCRATCH in `env`).
The run directories, the data and the munge socket stay shared, like a shared filesystem.

Logs and controller state live under `root`; munge's files and the slurmd spools (unix
sockets, so short paths) in a folder under /tmp removed at `stop()`. There is no accounting
daemon: `sacct` does not work, read jobs with `job()`/`jobs()` (finished ones stay visible for
MinJobAge=600 s). `scontrol requeue` restarts a job about 12 s later: once its credential
has expired (cred_expire=10), at the next pass of the backfill scheduler, which starts
requeued jobs and runs every second here (every 30 s by default: 12 to 42 s).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
_KEY = re.compile(r" (?=[\w/:]+=)")  # a space before the next `Key=` of `scontrol show -o`
# Runs as `sh -c NODE_SETUP NAME SCRATCH HOSTS SLURMD ARGS...` inside `unshare`.
NODE_SETUP = """
hostname "$0" && mount -t tmpfs tmpfs /dev/shm && mount -t tmpfs tmpfs "$1" &&
mount --bind "$2" /etc/hosts && shift 2 && exec "$@"
"""


def _binary(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")


@functools.cache
def slurm_available() -> str | None:
    """None when a cluster can be brought up here, else why not (for pytest.skip)."""
    missing = [name for name in (*DAEMONS, *CLIENTS, "unshare") if _binary(name) is None]
    if missing:
        return f"SLURM/munge binaries missing: {' '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"  # fmt: skip
    if os.geteuid() != 0:
        return "a SLURM test cluster runs its daemons as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no `munge` user (the munge package makes it)"
    probe = subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"no namespaces for the test nodes: {probe.stderr.decode().strip()}"
    return None


def _free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:  # held together, so they differ
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


def parse_record(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o`: `Key=Value Key=Value ...` into a dict."""
    return dict(part.partition("=")[::2] for part in _KEY.split(line.strip()) if part)


def _environ(pid: int) -> dict[bytes, bytes]:
    with contextlib.suppress(OSError):
        data = Path(f"/proc/{pid}/environ").read_bytes()
        return dict(e.partition(b"=")[::2] for e in data.split(b"\0") if e)
    return {}


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2, memory_mb: int = 4000) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "slurm.conf"
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus, self.memory_mb = cpus, memory_mb
        self.procs: dict[str, subprocess.Popen] = {}
        self.short: Path | None = None  # munge, spools and the scratch mount point, while up

    @property
    def scratch(self) -> Path:
        """Node-local scratch: the same path on every node, a tmpfs of its own on each."""
        assert self.short is not None, "the cluster is not started"
        return self.short / "scratch"

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs (sbatch and the rest find munge through slurm.conf);
        sbatch passes it on to the jobs."""
        env = {"SLURM_CONF": str(self.conf)}
        if self.short is not None:
            env["PRETRAIN_SCRATCH"] = str(self.scratch)
        return env

    def _base_env(self) -> dict[str, str]:
        # SLURM_* from an enclosing job (tests run inside one) would steer sbatch/srun there.
        return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | self.env

    def _write_conf(self, short: Path) -> None:
        ctld_port, *ports = _free_ports(1 + len(self.nodes))
        r, m = self.root, short / "munge"
        # Several settings to a line here, two spaces apart; one to a line in the file.
        # Like many real clusters: tasks are bound to the cores they were given
        # (task/affinity, Cores), memory is allocated with a small default per CPU
        # (CR_Core_Memory, DefMemPerCPU), so a job that asks for too little shows it.
        # A slurmd answers a step kill only once the step is gone (up to KillWait); had it
        # not answered within MessageTimeout, slurmctld would resend the kill 60 s later
        # and hit the step of the same id in the requeued job, which starts here within
        # ~12 s (cred_expire=10; 120 s by default). A requeued job is started by the backfill
        # scheduler (bf_interval; 30 s by default would add 0 to 30 s to every requeue).
        settings = f"""
            ClusterName=test  SlurmctldHost=localhost(127.0.0.1)  SlurmUser=root
            AuthType=auth/munge  AuthInfo=socket={m}/munge.sock,cred_expire=10  CredType=cred/munge
            StateSaveLocation={r}/state  SlurmdSpoolDir={short}/spool-%n
            SlurmctldPidFile={r}/slurmctld.pid  SlurmctldLogFile={r}/slurmctld.log
            SlurmdPidFile={r}/slurmd-%n.pid  SlurmdLogFile={r}/slurmd-%n.log
            SlurmctldPort={ctld_port}  SlurmdParameters=config_overrides
            ProctrackType=proctrack/linuxproc  TaskPlugin=task/affinity  TaskPluginParam=Cores  MpiDefault=none
            JobAcctGatherType=jobacct_gather/none  AccountingStorageType=accounting_storage/none
            SelectType=select/cons_tres  SelectTypeParameters=CR_Core_Memory  DefMemPerCPU=100
            SchedulerType=sched/backfill  SchedulerParameters=bf_interval=1
            ReturnToService=2  SlurmctldTimeout=30  SlurmdTimeout=30  MinJobAge=600
            KillWait=5  MessageTimeout=30
        """
        lines = re.split(r"\s{2,}", settings.strip())
        lines += [
            f"NodeName={name} NodeHostname={name} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN"
            for name, port in zip(self.nodes, ports, strict=True)
        ]
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP"
        )
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, args: list[str], binary: str | None = None, **kwargs) -> None:
        out = open(self.root / f"{name}.out", "ab")  # noqa: SIM115 - the daemon writes to it
        env = self._base_env() | {"SLURMCLUSTER": str(self.short)}  # marks its processes
        self.procs[name] = subprocess.Popen(
            [binary or _binary(name) or name, *args], env=env, stdout=out, stderr=out,
            stdin=subprocess.DEVNULL, start_new_session=True, **kwargs,
        )  # fmt: skip
        out.close()

    def _start_node(self, name: str) -> None:
        """One slurmd in namespaces of its own (see the module docstring)."""
        slurmd = [_binary("slurmd") or "slurmd", "-D", "-f", str(self.conf), "-N", name]
        args = ["--uts", "--mount", "--propagation", "private", "sh", "-c", NODE_SETUP,
                name, str(self.scratch), str(self.short / "hosts"), *slurmd]  # fmt: skip
        self._spawn(f"slurmd-{name}", args, binary=_binary("unshare"))

    def _logs(self) -> str:
        # With -D/--foreground each daemon's stderr (NAME.out) holds all its log.
        names = ("munged", "slurmctld", *(f"slurmd-{n}" for n in self.nodes))
        return "".join(f"\n--- {n}.out:\n{_tail(self.root / f'{n}.out')}" for n in names)

    def start(self, timeout: float = 30) -> None:
        if self.procs:
            raise RuntimeError("the SLURM cluster is already started")
        self.short = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.short.chmod(0o711)  # munge must get through to its own folder
        munge, user = self.short / "munge", pwd.getpwnam("munge")
        munge.mkdir()
        for name in self.nodes:
            (self.short / f"spool-{name}").mkdir()
        self.scratch.mkdir()
        (self.short / "hosts").write_text(f"127.0.0.1 localhost {' '.join(self.nodes)}\n")
        (self.root / "state").mkdir(exist_ok=True)
        (key := munge / "munge.key").write_bytes(os.urandom(1024))
        for path, mode in ((munge, 0o711), (key, 0o400)):  # munged wants its socket reachable
            os.chown(path, user.pw_uid, user.pw_gid)
            path.chmod(mode)
        self._write_conf(self.short)
        deadline = time.time() + timeout
        try:
            args = ["--foreground", "--force", f"--key-file={munge}/munge.key",
                    f"--socket={munge}/munge.sock", f"--pid-file={munge}/munged.pid",
                    f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"]  # fmt: skip
            self._spawn("munged", args, user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            self._until((munge / "munge.sock").exists, deadline, "munged made no socket")
            self._spawn("slurmctld", ["-D", "-c", "-i", "-f", str(self.conf)])
            for name in self.nodes:
                self._start_node(name)
            self._until(self._idle, deadline, "the nodes did not become idle")
        except BaseException as e:
            logs = self._logs()
            self.stop()
            if not isinstance(e, Exception):
                raise
            raise RuntimeError(f"the SLURM cluster did not come up: {e}{logs}") from None

    def _idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False, timeout=10).stdout.split()
        return out == ["idle"] * len(self.nodes)

    def _until(self, ready, deadline: float, what: str) -> None:
        while not ready():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"{what} (exited: {dead})")
            time.sleep(0.1)

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                if ids := self.run("squeue", "-h", "-o", "%A", timeout=10).stdout.split():
                    self.run("scancel", "--full", "--signal=KILL", *ids, check=False)
                    self.run("scancel", *ids, check=False)  # the pending ones
                    deadline = time.time() + 20
                    while self.run("squeue", "-h", timeout=10).stdout and time.time() < deadline:
                        time.sleep(0.2)
        for name in reversed(list(self.procs)):  # the nodes, then slurmctld, then munged
            if (proc := self.procs.pop(name)).poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.short is not None:
            self._kill_leftovers()
            shutil.rmtree(self.short, ignore_errors=True)
            self.short = None

    def _kill_leftovers(self) -> None:
        """slurmstepd and job tasks outlive slurmd: kill what still carries our marks."""
        mark, conf = str(self.short).encode(), str(self.conf).encode()
        for pid in _pids():
            env = _environ(pid)
            if env.get(b"SLURMCLUSTER") == mark or (
                env.get(b"SLURM_CONF") == conf and b"SLURM_JOB_ID" in env
            ):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def tasks(self, job_id: str, node: str | None = None) -> dict[int, dict[str, str]]:
        """The processes of a job's srun tasks (each node's launcher and its ranks, not the
        batch script), on `node` or on all nodes: pid -> environment. Found by the SLURM_*
        variables they inherit."""
        want = {b"SLURM_CONF": str(self.conf).encode(), b"SLURM_JOB_ID": str(job_id).encode()}
        if node is not None:
            want[b"SLURMD_NODENAME"] = node.encode()
        found = {}
        for pid in _pids():
            env = _environ(pid)
            if want.items() <= env.items() and env.get(b"SLURM_STEP_ID", b"batch").isdigit():
                found[pid] = {k.decode(): v.decode(errors="replace") for k, v in env.items()}
        return found

    def array_task_pids(self, job_id: str, task: int) -> list[int]:
        """The processes of one task of a job array (its batch script and what it runs)."""
        want = {
            b"SLURM_CONF": str(self.conf).encode(),
            b"SLURM_ARRAY_JOB_ID": str(job_id).encode(),
            b"SLURM_ARRAY_TASK_ID": str(task).encode(),
        }
        return [pid for pid in _pids() if want.items() <= _environ(pid).items()]

    def run(self, *args: str, check: bool = True, timeout: float = 60):
        """A SLURM client command (sbatch, squeue, scontrol, ...) against this cluster."""
        cmd, env = [_binary(args[0]) or args[0], *args[1:]], self._base_env()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job`: one record, or one per array task in task order (pending
        tasks share one record, e.g. ArrayTaskId=0-1)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        records = [parse_record(line) for line in out.splitlines() if line.strip()]
        return sorted(records, key=lambda r: int(re.match(r"\d*", r.get("ArrayTaskId", "")).group() or 0))  # fmt: skip

    def job(self, job_id: str) -> dict[str, str]:
        records = self.jobs(job_id)
        assert len(records) == 1, f"job {job_id} has {len(records)} records: {records}"
        return records[0]

    def wait(self, job_id: str, states=DONE, timeout: float = 300) -> dict[str, str]:
        """Poll until the job (every task, for an array) is in one of `states`."""
        deadline = time.time() + timeout
        while True:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in states for r in records):
                return records[-1]
            if time.time() > deadline:
                raise AssertionError(
                    f"job {job_id} not in {states} after {timeout}s: {records}\n"
                    f"--- slurmctld.log:\n{_tail(self.root / 'slurmctld.log')}"
                )
            time.sleep(0.25)
