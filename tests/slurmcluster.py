"""A real single-node SLURM cluster on loopback for tests: slurmctld, slurmd and munged.

Debian's slurm-wlm 22.05 and munge, run as root with their own munge key and free ports, the
node at 127.0.0.1, so it talks to nothing else and cannot meet a cluster left running by an
earlier session. Logs and controller state live under `root`; munge's files and slurmd's spool
(unix sockets, so short paths) in a folder under /tmp removed at `stop()`. There is no
accounting daemon: `sacct` does not work, read jobs with `job()`/`jobs()` (finished ones stay
visible for MinJobAge=600 s). `scontrol requeue` restarts a job about 17 s later.
"""

from __future__ import annotations

import contextlib
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


def _binary(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")


def slurm_available() -> str | None:
    """None when a cluster can be brought up here, else why not (for pytest.skip)."""
    missing = [name for name in DAEMONS + CLIENTS if _binary(name) is None]
    if missing:
        return f"SLURM/munge binaries missing: {' '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"  # fmt: skip
    if os.geteuid() != 0:
        return "a SLURM test cluster runs its daemons as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no `munge` user (the munge package makes it)"
    return None


def _free_ports() -> tuple[int, int]:
    with socket.socket() as a, socket.socket() as b:  # held together, so the two differ
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        return a.getsockname()[1], b.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({e})"


def parse_record(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o`: `Key=Value Key=Value ...` into a dict."""
    return dict(part.partition("=")[::2] for part in _KEY.split(line.strip()) if part)


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.short: Path | None = None  # munge's files and slurmd's spool, while up

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs (sbatch and the rest find munge through slurm.conf)."""
        return {"SLURM_CONF": str(self.conf)}

    def _base_env(self) -> dict[str, str]:
        # SLURM_* from an enclosing job (tests run inside one) would steer sbatch/srun there.
        return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")} | self.env

    def _write_conf(self, short: Path) -> None:
        ctld_port, d_port = _free_ports()
        r, m = self.root, short / "munge"
        # Several settings to a line here, two spaces apart; one to a line in the file.
        settings = f"""
            ClusterName=test  SlurmctldHost=localhost(127.0.0.1)  SlurmUser=root
            AuthType=auth/munge  AuthInfo=socket={m}/munge.sock,cred_expire=10  CredType=cred/munge
            StateSaveLocation={r}/state  SlurmdSpoolDir={short}/spool
            SlurmctldPidFile={r}/slurmctld.pid  SlurmctldLogFile={r}/slurmctld.log
            SlurmdPidFile={r}/slurmd.pid  SlurmdLogFile={r}/slurmd.log
            SlurmctldPort={ctld_port}  SlurmdPort={d_port}  SlurmdParameters=config_overrides
            ProctrackType=proctrack/linuxproc  TaskPlugin=task/none  MpiDefault=none
            JobAcctGatherType=jobacct_gather/none  AccountingStorageType=accounting_storage/none
            SelectType=select/cons_tres  SelectTypeParameters=CR_Core  SchedulerType=sched/backfill
            ReturnToService=2  SlurmctldTimeout=30  SlurmdTimeout=30  MinJobAge=600  KillWait=30
            NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN
            PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
        """
        self.conf.write_text("\n".join(re.split(r"\s{2,}", settings.strip())) + "\n")

    def _spawn(self, name: str, args: list[str], **kwargs) -> None:
        out = open(self.root / f"{name}.out", "ab")  # noqa: SIM115 - the daemon writes to it
        env = self._base_env() | {"SLURMCLUSTER": str(self.short)}  # marks its processes
        self.procs[name] = subprocess.Popen(
            [_binary(name) or name, *args], env=env, stdout=out, stderr=out,
            stdin=subprocess.DEVNULL, start_new_session=True, **kwargs,
        )  # fmt: skip
        out.close()

    def _logs(self) -> str:
        # With -D/--foreground each daemon's stderr (NAME.out) holds all its log.
        return "".join(f"\n--- {n}.out:\n{_tail(self.root / f'{n}.out')}" for n in DAEMONS)

    def start(self, timeout: float = 30) -> None:
        if self.procs:
            raise RuntimeError("the SLURM cluster is already started")
        self.short = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.short.chmod(0o711)  # munge must get through to its own folder
        munge, user = self.short / "munge", pwd.getpwnam("munge")
        munge.mkdir()
        (self.short / "spool").mkdir()
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
            self._spawn("slurmd", ["-D", "-f", str(self.conf), "-N", "localhost"])
            self._until(self._idle, deadline, "the node did not become idle")
        except BaseException as e:
            logs = self._logs()
            self.stop()
            if not isinstance(e, Exception):
                raise
            raise RuntimeError(f"the SLURM cluster did not come up: {e}{logs}") from None

    def _idle(self) -> bool:
        return self.run("sinfo", "-h", "-o", "%t", check=False, timeout=10).stdout.strip() == "idle"

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
        for name in reversed(DAEMONS):
            if (proc := self.procs.pop(name, None)) is not None and proc.poll() is None:
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
        marks = (f"SLURMCLUSTER={self.short}".encode(), f"SLURM_CONF={self.conf}".encode())
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if marks[0] in env or (marks[1] in env and any(e.startswith(b"SLURM_JOB_ID=") for e in env)):  # fmt: skip
                    os.kill(pid, signal.SIGKILL)

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
