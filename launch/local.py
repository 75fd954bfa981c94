"""`pretrain launch`: torchrun's elastic agent in this process, with these changes.

1. Exit codes that a restart cannot fix (a config or data error, a stopped run, a
   preemption) end the launch at once instead of burning through `--max-restarts`, and
   the launch exits with the workers' code, not torchrun's generic 1, so SLURM scripts
   and schedulers can tell "requeue me" (75) from "fix me" (2, 3).
2. SIGUSR1/SIGUSR2 (SLURM's advance warning) are forwarded to the workers like SIGTERM,
   and the workers get `fault.preempt_grace_s` (+30 s) to checkpoint before SIGKILL.
3. Every rank's stdout/stderr goes to `RUN_DIR/logs/LAUNCH/attemptK.rankR.{out,err}`
   and is echoed to the console with a `[rankR]` prefix.
4. The workers' TORCHELASTIC_RESTART_COUNT is the rendezvous round, the same on every
   node. torchrun counts restarts per agent: after a node is started again (as SLURM
   restarts a step) or joins an elastic job, its count is 0 while the others' is 1 or
   more (and a restart for a joining node counts on no agent), and workers that prefix
   the process group's store with it (ours, and torch's own env:// init) would look for
   each other under different names and hang.
5. Every round publishes the address of the workers' store (`SharedStoreAddress`), so a
   node that joins a running job can start its workers.
6. The workers get PRETRAIN_NNODES_RANGE=MIN:MAX (`--nnodes 3:4`, or N:N), so the data
   order can be fixed at the first start for every node count the job may run on.
7. When a worker fails (killed, or exited non-zero but for a preemption), the agent posts
   the failure notice in the workers' store before torchrun stops the others with SIGTERM,
   so they exit at once instead of taking the stop for a preemption
   (`resilience.Preemption`): a worker killed by -9 or the OOM killer posts nothing itself.
   torchrun sends that SIGTERM from inside the monitor call that first sees the failure, so
   the agent looks at its workers (without reaping them) before each such call.

The agent is torchrun's own `LocalElasticAgent` (c10d rendezvous, restarts, elastic
node ranges, multi-node); only its failure handling, rendezvous and worker environment
are extended. tests/test_nodes.py runs it on four namespaced "nodes" with kill -9.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from launch.spec import LaunchSpec, node_range, prepare, read_spec, record, resolve
from pretrain import files
from pretrain.config.schema import Config
from pretrain.errors import CONFIG_OR_DATA_ERROR, TRAINING_STOPPED, ConfigError
from pretrain.rundir import RunDir

log = logging.getLogger("pretrain.launch")

AGENT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def launch(spec: LaunchSpec, node_rank: int = 0, rdzv_endpoint: str | None = None,
           rdzv_id: str | None = None, rdzv_conf: str | None = None) -> int:  # fmt: skip
    """Run the training `spec` describes on this node; returns the training's exit code.
    `rdzv_conf` is torchrun's --rdzv-conf (e.g. "last_call_timeout=5")."""
    os.chdir(spec.cwd)
    min_nodes, max_nodes = node_range(spec.nnodes)
    cfg, overrides = resolve(spec.config, spec.overrides)
    spec.overrides = overrides
    run = RunDir(cfg.run.dir)
    run_dir = run.path
    if max_nodes > 1 and not rdzv_endpoint:
        raise ConfigError(f"--nnodes {spec.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's)")
    lock = files.hold(run.node_lock(node_rank), "launcher")
    if node_rank == 0 and (pid := files.owner(run.lock)):
        lock.close()
        raise ConfigError(f"{run_dir} is in use by another training process (pid {pid})")
    if node_rank == 0:
        earlier = read_spec(run_dir)
        if earlier and earlier.slurm and spec.slurm is None and spec.job_id:
            spec.slurm = earlier.slurm  # a (requeued) SLURM job: `resume` resubmits it
        prepare(cfg, spec)
    launch_id = _launch_id()
    log_dir = run.launch_logs(launch_id)
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
        *([f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []),
        "--module",
        "pretrain", "train", spec.config, *overrides,
    ]  # fmt: skip
    worker_env = {"PRETRAIN_NNODES_RANGE": f"{min_nodes}:{max_nodes}"}
    try:
        code, why = run_workers(torchrun_args, cfg, run, launch_id, worker_env)
        # The exit code is decided: a SIGTERM now (srun ending the step because another
        # node's launcher exited first) must not turn this 75 or 0 into "killed".
        for name in AGENT_SIGNALS.split(","):
            signal.signal(signal.Signals[name], signal.SIG_IGN)
    finally:
        lock.close()
    record(run_dir, event="exit", node=node_rank, launch=launch_id, exit_code=code, why=why)
    print(f"launch {launch_id}: {why} (exit {code})", file=sys.stderr, flush=True)
    return code


def run_workers(
    torchrun_args: list[str], cfg: Config, run: RunDir, launch_id: str, worker_env: dict[str, str]
) -> tuple[int, str]:
    """torchrun with `torchrun_args` in this process, `worker_env` added to the workers'
    environment, their output in `run`'s logs of `launch_id`; (exit code, reason)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher import api

    config, cmd, cmd_args = torchrun.config_from_args(torchrun.parse_args(torchrun_args))
    worker_env = dict(worker_env)  # the agent adds the round of each rendezvous
    config.logs_specs = _run_logs(run, launch_id, worker_env)
    config.log_line_prefix_template = "[rank${rank}]:"
    config.signals_to_handle = AGENT_SIGNALS
    config.shutdown_timeout = int(cfg.fault.preempt_grace_s) + 30
    requeue = cfg.fault.requeue_exit_code
    final = {CONFIG_OR_DATA_ERROR, TRAINING_STOPPED, requeue}
    torch_agent = api.LocalElasticAgent
    api.LocalElasticAgent = _agent_class(torch_agent, final, worker_env, requeue)
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


def describe_exits(codes: dict[int, int]) -> str:
    """Workers' exit codes in words, e.g. "rank 1 exited 2, rank 3 killed by SIGKILL" (a
    negative code is the signal that killed the worker)."""
    return ", ".join(
        f"rank {rank} {'exited ' + str(c) if c >= 0 else 'killed by ' + signal.Signals(-c).name}"
        for rank, c in sorted(codes.items())
    )


def worker_exit_code(codes: dict[int, int], requeue: int) -> tuple[int, str]:
    """The launch's exit code from the failed workers' codes (negative: killed by signal)."""
    why = describe_exits(codes)
    for meaning, code in (
        ("preempted, checkpointed", requeue),
        ("config or data error", CONFIG_OR_DATA_ERROR),
        ("training stopped", TRAINING_STOPPED),
    ):
        if code in codes.values():
            return code, f"{meaning}: {why}"
    first = min(codes.values(), key=_blame)
    return (first if first > 0 else 128 - first), f"failed: {why}"


def _blame(code: int) -> tuple[int, int]:
    """Orders exit codes by how likely they are the cause, not the consequence, of a failure:
    a worker's own error (1-127), then a death by a signal other than SIGTERM (-9: the OOM
    killer, kill -9), then the stop torchrun sends the survivors (SIGTERM, or a worker that
    exits 128+N on signal N after it)."""
    stopped = code >= 128 or code == -signal.SIGTERM
    return (2 if stopped else 1 if code < 0 else 0), abs(code)


def _agent_class(base, final_codes: set[int], worker_env: dict[str, str], requeue: int):
    class Agent(base):
        """torchrun's agent that does not restart workers after a final exit code, numbers
        each start of the workers by the rendezvous round, and posts a worker's failure
        for the others before they are stopped."""

        def __init__(self, spec, *args, **kwargs) -> None:
            spec.rdzv_handler = SharedStoreAddress(spec.rdzv_handler)
            super().__init__(spec, *args, **kwargs)
            self._posted_attempt: str | None = None

        def _rendezvous(self, worker_group):
            super()._rendezvous(worker_group)
            attempt = rendezvous_round(worker_group.spec.rdzv_handler)
            if attempt is not None:
                worker_env["TORCHELASTIC_RESTART_COUNT"] = str(attempt)

        def _monitor_workers(self, worker_group):
            # torchrun's monitor sends SIGTERM to the other workers in the same call that
            # first sees a failure (and waits up to shutdown_timeout for them to go), so
            # the notice must be in the store before that call: a look first that reaps
            # no worker, leaving torchrun's own bookkeeping as it was.
            self._post(worker_group, exited_workers(worker_group))
            result = super()._monitor_workers(worker_group)
            if not result.is_failed():
                return result
            codes = {rank: f.exitcode for rank, f in result.failures.items()}
            # A worker that failed between the look and torchrun's: late for this node's
            # workers (stopped by now), still in time for the other nodes'.
            self._post(worker_group, codes)
            if any(code in final_codes for code in codes.values()):
                self._remaining_restarts = 0
            return result

        def _post(self, worker_group, codes: dict[int, int]) -> None:
            """Post the failure notice once per start of the workers, if `codes` (global
            rank: exit code) hold a failure; a preempted rank's exit is none."""
            if not codes or set(codes.values()) == {requeue}:
                return
            spec = worker_group.spec
            attempt = worker_env.get(
                "TORCHELASTIC_RESTART_COUNT", str(spec.max_restarts - self._remaining_restarts)
            )
            if self._posted_attempt != attempt:
                self._posted_attempt = attempt
                post_failure(worker_group, attempt, codes)

    return Agent


def exited_workers(worker_group) -> dict[int, int]:
    """Global rank: exit code (negative: the signal) of each of `worker_group`'s workers
    that has ended other than with 0, without reaping any (`waitid` with WNOWAIT), so that
    torchrun's monitor still finds them. Empty where the platform cannot look."""
    if not hasattr(os, "waitid"):
        return {}
    codes = {}
    for worker in worker_group.workers:
        if worker.id is None:
            continue
        try:
            ended = os.waitid(os.P_PID, worker.id, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already: torchrun has seen it
            continue
        if ended is None:
            continue
        code = ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status
        if code != 0:
            codes[worker.global_rank] = code
    return codes


def post_failure(worker_group, attempt: str, codes: dict[int, int]) -> None:
    """Post the failure notice of workers' start `attempt` in their store (a client of its
    own: the store is the rank-0 agent's, maybe on another node)."""
    from pretrain.train.resilience import announce_failure, job_store

    why = f"{describe_exits(codes)} (seen by node {worker_group.group_rank}'s launcher)"
    try:
        store = job_store(worker_group.master_addr, worker_group.master_port, attempt)
    except Exception as e:  # the store's node is gone: the workers find no store either
        log.warning("could not reach the workers' store to post %s (%s)", why, e)
        return
    announce_failure(why, store)


class SharedStoreAddress:
    """torchrun's rendezvous handler, with every node's workers sent to the store of the
    current round's rank-0 agent.

    torchrun's c10d rendezvous has the rank-0 agent publish its store's address in a
    round's keys only when it first becomes rank 0, and every other agent reads it only
    in its own first round. An agent started again after its node was killed (or joining
    an elastic job) waits for the keys of the current round, which nobody writes: it
    times out after 60 s and the job fails. And an agent that kept the address from an
    earlier round would send its workers to a rank 0 that may be gone. So rank 0
    publishes the address in every round, and every other agent reads it.
    """

    def __init__(self, handler) -> None:
        self._handler = handler

    def __getattr__(self, name: str):
        return getattr(self._handler, name)

    def next_rendezvous(self):
        from torch.distributed.elastic.rendezvous.api import RendezvousInfo
        from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo as Address

        info = self._handler.next_rendezvous()
        address = info.bootstrap_store_info
        if address is None:
            return info
        keys = Address.MASTER_ADDR_KEY, Address.MASTER_PORT_KEY
        if info.rank == 0:
            info.store.set(keys[0], address.master_addr)
            info.store.set(keys[1], str(address.master_port))
            return info
        address = Address(info.store.get(keys[0]).decode(), int(info.store.get(keys[1])))
        return RendezvousInfo(info.store, info.rank, info.world_size, address)


def rendezvous_round(handler) -> int | None:
    """The round of the rendezvous that `handler` (c10d) has just completed: one number
    shared by every node of that start of the workers, new for each start. None for a
    handler without rounds."""
    state = getattr(getattr(handler, "_state_holder", None), "state", None)
    number = getattr(state, "round", None)
    return number if isinstance(number, int) else None


def _run_logs(run: RunDir, launch_id: str, worker_env: dict[str, str]):
    from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs, Std

    log_dir = run.launch_logs(launch_id)

    class RunLogs(LogsSpecs):
        """Every rank's output in `log_dir/attemptK.rankR.{out,err}`, also on the console.
        Also where the workers' environment gets `worker_env`: `reify` is torchrun's one
        hook between building each worker's environment and starting the worker."""

        def __init__(self) -> None:
            super().__init__(str(log_dir), redirects=Std.ALL, tee=Std.ALL)

        @property
        def root_log_dir(self) -> str:
            return str(log_dir)

        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            log_dir.mkdir(parents=True, exist_ok=True)
            dest = LogsDest()
            for local_rank, env in envs.items():
                env.update(worker_env)
                attempt, rank = env["TORCHELASTIC_RESTART_COUNT"], env["RANK"]
                out, err, error = (
                    str(run.rank_log(launch_id, attempt, rank, kind))
                    for kind in ("out", "err", "error.json")
                )
                dest.stdouts[local_rank] = dest.tee_stdouts[local_rank] = out
                dest.stderrs[local_rank] = dest.tee_stderrs[local_rank] = err
                dest.error_files[local_rank] = error
                env["TORCHELASTIC_ERROR_FILE"] = error
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
