"""`pretrain launch`: torchrun's elastic agent in this process, with three changes.

1. Exit codes that a restart cannot fix (a config or data error, a stopped run, a
   preemption) end the launch at once instead of burning through `--max-restarts`, and
   the launch exits with the workers' code, not torchrun's generic 1, so SLURM scripts
   and schedulers can tell "requeue me" (75) from "fix me" (2, 3).
2. SIGUSR1/SIGUSR2 (SLURM's advance warning) are forwarded to the workers like SIGTERM,
   and the workers get `fault.preempt_grace_s` (+30 s) to checkpoint before SIGKILL.
3. Every rank's stdout/stderr goes to `RUN_DIR/logs/LAUNCH/attemptK.rankR.{out,err}`
   and is echoed to the console with a `[rankR]` prefix.

The agent is torchrun's own `LocalElasticAgent` (rendezvous, restarts, multi-node);
only its failure handling is extended.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from launch.spec import LaunchSpec, prepare, read_spec, record, resolve
from pretrain import lockfile
from pretrain.config import Config, ConfigError

log = logging.getLogger("pretrain.launch")

CONFIG_OR_DATA_ERROR = 2  # pretrain's exit codes (see pretrain/__main__.py)
TRAINING_STOPPED = 3
AGENT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def launch(spec: LaunchSpec, node_rank: int = 0, rdzv_endpoint: str | None = None,
           rdzv_id: str | None = None) -> int:  # fmt: skip
    """Run the training `spec` describes on this node; returns the training's exit code."""
    os.chdir(spec.cwd)
    cfg, overrides = resolve(spec.config, spec.overrides)
    spec.overrides = overrides
    run_dir = Path(cfg.run.dir)
    if spec.nnodes > 1 and not rdzv_endpoint:
        raise ConfigError(f"--nnodes {spec.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's)")
    lock = lockfile.hold(run_dir / f".launch-node{node_rank}.lock", "launcher")
    if node_rank == 0 and (pid := lockfile.owner(run_dir / ".lock")):
        lock.close()
        raise ConfigError(f"{run_dir} is in use by another training process (pid {pid})")
    if node_rank == 0:
        earlier = read_spec(run_dir)
        if earlier and earlier.slurm and spec.slurm is None and spec.job_id:
            spec.slurm = earlier.slurm  # a (requeued) SLURM job: `resume` resubmits it
        prepare(cfg, spec)
    launch_id = _launch_id()
    log_dir = run_dir / "logs" / launch_id
    record(run_dir, event="launch", node=node_rank, launch=launch_id, pid=os.getpid(),
           nproc_per_node=spec.nproc_per_node, nnodes=spec.nnodes, job_id=spec.job_id)  # fmt: skip
    print(f"launch {launch_id}: {spec.nnodes} node(s) x {spec.nproc_per_node} rank(s), "
          f"run directory {run_dir}, logs in {log_dir}", flush=True)  # fmt: skip
    torchrun_args = [
        f"--nnodes={spec.nnodes}",
        f"--nproc-per-node={spec.nproc_per_node}",
        f"--max-restarts={spec.max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint or 'localhost:0'}",
        f"--rdzv-id={rdzv_id or _default_rdzv_id(run_dir)}",
        "--module",
        "pretrain", "train", spec.config, *overrides,
    ]  # fmt: skip
    try:
        code, why = run_workers(torchrun_args, cfg, log_dir)
    finally:
        lock.close()
    record(run_dir, event="exit", node=node_rank, launch=launch_id, exit_code=code, why=why)
    print(f"launch {launch_id}: {why} (exit {code})", file=sys.stderr, flush=True)
    return code


def run_workers(torchrun_args: list[str], cfg: Config, log_dir: Path) -> tuple[int, str]:
    """torchrun with `torchrun_args` in this process; (exit code, reason)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher import api

    config, cmd, cmd_args = torchrun.config_from_args(torchrun.parse_args(torchrun_args))
    config.logs_specs = _run_logs(log_dir)
    config.log_line_prefix_template = "[rank${rank}]:"
    config.signals_to_handle = AGENT_SIGNALS
    config.shutdown_timeout = int(cfg.fault.preempt_grace_s) + 30
    requeue = cfg.fault.requeue_exit_code
    final = {CONFIG_OR_DATA_ERROR, TRAINING_STOPPED, requeue}
    torch_agent = api.LocalElasticAgent
    api.LocalElasticAgent = _agent_class(torch_agent, final)
    try:
        api.elastic_launch(config, cmd)(*cmd_args)
        return 0, "training finished"
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        return worker_exit_code(codes, requeue)
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        if name in cfg.fault.preempt_signals:
            return requeue, f"{name}: workers told to checkpoint; exit {requeue} to be requeued"
        return 128 + int(e.sigval), f"stopped by {name}"
    finally:
        api.LocalElasticAgent = torch_agent


def worker_exit_code(codes: dict[int, int], requeue: int) -> tuple[int, str]:
    """The launch's exit code from the failed workers' codes (negative: killed by signal)."""
    why = ", ".join(
        f"rank {rank} {'exited ' + str(c) if c >= 0 else 'killed by ' + signal.Signals(-c).name}"
        for rank, c in sorted(codes.items())
    )
    for meaning, code in (
        ("preempted, checkpointed", requeue),
        ("config or data error", CONFIG_OR_DATA_ERROR),
        ("training stopped", TRAINING_STOPPED),
    ):
        if code in codes.values():
            return code, f"{meaning}: {why}"
    first = min(codes.values(), key=lambda c: (c <= 0, c))  # a real exit code before a signal
    return (first if first > 0 else 128 - first), f"failed: {why}"


def _agent_class(base, final_codes: set[int]):
    class Agent(base):
        """torchrun's agent that does not restart workers after a final exit code."""

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if result.is_failed() and any(
                f.exitcode in final_codes for f in result.failures.values()
            ):
                self._remaining_restarts = 0
            return result

    return Agent


def _run_logs(log_dir: Path):
    from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs, Std

    class RunLogs(LogsSpecs):
        """Every rank's output in `log_dir/attemptK.rankR.{out,err}`, also on the console."""

        def __init__(self) -> None:
            super().__init__(str(log_dir), redirects=Std.ALL, tee=Std.ALL)

        @property
        def root_log_dir(self) -> str:
            return str(log_dir)

        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            log_dir.mkdir(parents=True, exist_ok=True)
            dest = LogsDest()
            for local_rank, env in envs.items():
                base = log_dir / f"attempt{env['TORCHELASTIC_RESTART_COUNT']}.rank{env['RANK']}"
                dest.stdouts[local_rank] = dest.tee_stdouts[local_rank] = f"{base}.out"
                dest.stderrs[local_rank] = dest.tee_stderrs[local_rank] = f"{base}.err"
                dest.error_files[local_rank] = f"{base}.error.json"
                env["TORCHELASTIC_ERROR_FILE"] = f"{base}.error.json"
            return dest

    return RunLogs()


def _launch_id() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return time.strftime("%Y%m%d-%H%M%S")


def _default_rdzv_id(run_dir: Path) -> str:
    """The same on every node of a run (so agents find each other) and per run."""
    salt = os.environ.get("SLURM_JOB_ID", "")
    return "pretrain-" + hashlib.sha1(f"{run_dir}:{salt}".encode()).hexdigest()[:12]
