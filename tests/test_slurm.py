"""`pretrain submit` and `pretrain sweep --slurm` on a real SLURM cluster of two nodes on this
machine (tests/helpers/slurmcluster.py: Debian's slurmctld, one slurmd per node and munged, all on
127.0.0.1; each node with a hostname, /dev/shm and scratch of its own; cores bound per task
and memory allocated, as on many clusters).

A 2-rank job trains. A 2-node job gets each node's cores and memory (its ranks are not
left on one core), checkpoints on USR1, requeues itself and resumes; then one node's
launcher and rank are killed -9, srun ends the job at once, it is requeued and finishes
with the losses of an uninterrupted run. A job that keeps failing without a new checkpoint
stops being requeued. A sweep runs as a job array; bad submissions are refused before
anything is submitted."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from pretrain.train.metrics import read_metrics
from tests.helpers.runs import (
    REF,
    REPO,
    STRATEGIES,
    losses_by_step,
    run_cli,
    with_overrides,
)
from tests.helpers.slurmcluster import SlurmCluster, slurm_available

needs_slurm = pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available()))
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10"]
# The sample order of the 2-node run: that of its 2-rank reference on one node (the
# session's `reference("ddp")`, which chose 1 canonical node for its one node), not the 2
# the data loader would choose for two nodes.
CANONICAL_NODES = "data.num_canonical_nodes=1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=2)
    c.start()
    yield c
    c.stop()


def submit(cluster, *args: str, env: dict | None = None) -> str:
    r = run_cli("submit", "configs/tiny.yaml", *args, env={**cluster.env, **(env or {})})
    assert r.returncode == 0, r.stdout + r.stderr
    return re.search(r"submitted job (\d+)", r.stdout).group(1)


def job_log(run: Path, job: str) -> str:
    path = run / "logs" / f"slurm-{job}.out"
    return path.read_text() if path.exists() else "(no job output)"


def wait_until(predicate, what, timeout: float = 300) -> None:
    """Poll `predicate`; on timeout fail with `what()` (the job's log)."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, what()
        time.sleep(0.1)


def events(run: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run) if r.get("event") == name]


def stepped_since_start(run: Path, starts: int) -> bool:
    """Whether the `starts`-th start of the training has logged a step."""
    metrics = read_metrics(run)
    begun = [i for i, r in enumerate(metrics) if r.get("event") == "start"]
    return len(begun) >= starts and any("loss" in r for r in metrics[begun[starts - 1] :])


def ranks_of(cluster, job: str) -> dict[str, tuple[int, dict]]:
    """node -> (pid, environment) of the job's training rank on that node."""
    found = {}
    for pid, env in cluster.tasks(job).items():
        with contextlib.suppress(OSError):
            if "RANK" in env and b"pretrain\0train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found[env["SLURMD_NODENAME"]] = (pid, env)
    return found


def launchers(cluster, job: str, restart: int) -> list[int]:
    """The job's srun tasks (each node's launcher) of its `restart`-th run."""
    tasks = cluster.tasks(job).items()
    return [pid for pid, env in tasks if env.get("SLURM_RESTART_COUNT", "0") == str(restart)]


def test_the_script_gives_each_node_task_its_cores_and_memory(tmp_path, capsys):
    """No cluster needed: the rendered script (`--dry-run`, nothing written)."""
    from pretrain.__main__ import main

    def script(*args: str) -> tuple[str, str]:
        argv = ["submit", str(REPO / "configs/tiny.yaml"), f"run.dir={tmp_path / 'run'}",
                "--nodes=4", "--gpus-per-node=8", *args, "--dry-run"]  # fmt: skip
        assert main(argv) == 0
        text = capsys.readouterr().out
        header = "\n".join(line for line in text.splitlines() if line.startswith("#SBATCH"))
        return header, text

    header, text = script()  # nothing asked for: the whole node
    assert "#SBATCH --exclusive" in header and "#SBATCH --mem=0" in header, header
    srun = '\nsrun --ntasks-per-node=1 --cpus-per-task="$CPUS" --kill-on-bad-exit=1 \\\n'
    assert srun in text, text
    assert "export OMP_NUM_THREADS=$((CPUS / 8 > 0 ? CPUS / 8 : 1))" in text
    header, _ = script("--cpus-per-task=96", "--mem=900G")
    assert "#SBATCH --cpus-per-task=96" in header and "#SBATCH --mem=900G" in header
    assert "--exclusive" not in header and "--mem=0" not in header, header
    header, _ = script("--cpus-per-task=96", "--sbatch-arg=--mem-per-cpu=8G")
    assert "#SBATCH --mem-per-cpu=8G" in header and "--mem=0" not in header, header
    assert not (tmp_path / "run").exists()


@pytest.mark.torchrun
@pytest.mark.slurm
@needs_slurm
def test_a_two_rank_job_trains_and_finishes(cluster, tiny_overrides, tmp_path, reference):
    run = tmp_path / "run"
    overrides = with_overrides(tiny_overrides, *STRATEGIES["ddp"], *REF)
    job = submit(cluster, *overrides, *CPU_JOB, "--nproc-per-node=2")
    record = cluster.wait(job, timeout=300)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", job_log(run, job)
    assert losses_by_step(run) == losses_by_step(reference("ddp", tiny_overrides))
    assert {p.name for p in run.glob("logs/slurm-*-0/attempt0.rank*.err")} == {
        "attempt0.rank0.err", "attempt0.rank1.err"
    }  # fmt: skip
    status = run_cli("status", str(run), env=cluster.env).stdout
    assert "state       finished" in status and f"slurm job   {job}" in status, status


@pytest.mark.torchrun
@pytest.mark.slurm
@needs_slurm
def test_a_two_node_job_resumes_exactly_after_usr1_and_after_losing_a_node(
    cluster, tiny_overrides, tmp_path, reference
):
    """`pretrain submit --nodes 2` (one rank per node): USR1 -> checkpoint -> requeue ->
    resume; then node2's launcher and rank die (kill -9) -> srun ends the step -> requeue
    -> resume from the last checkpoint; the losses are those of an uninterrupted run (the
    session's 2-rank ddp reference, in the same sample order)."""
    run = tmp_path / "run"
    overrides = with_overrides(tiny_overrides, *STRATEGIES["ddp"], *REF, CANONICAL_NODES)
    job = submit(cluster, *overrides, "--nodes=2", "--nproc-per-node=1", "--time=10",
                 env={"PRETRAIN_FAULTS": "steptime@0.5"})  # fmt: skip
    log = lambda: job_log(run, job)  # noqa: E731
    wait_until(lambda: stepped_since_start(run, 1) and len(ranks_of(cluster, job)) == 2, log)

    # Each node's task has all the node's cores (not SLURM's one per task) and memory, and
    # its rank is told how many threads it may use.
    record = cluster.job(job)
    assert record["NumCPUs"] == "4" and "mem=8000M" in record["TRES"], record
    for node, (pid, env) in ranks_of(cluster, job).items():
        assert os.sched_getaffinity(pid) == {0, 1}, f"{node}'s rank is bound to fewer cores"
        assert env["OMP_NUM_THREADS"] == "2", node
    hosts = {h["host"] for h in map(json.loads, (run / "launches.jsonl").open())
             if h["event"] == "launch"}  # fmt: skip
    assert hosts == {"node1", "node2"}

    signalled = time.time()
    cluster.run("scancel", "--signal=USR1", job)
    wait_until(lambda: stepped_since_start(run, 2), log)
    usr1_to_step = time.time() - signalled
    preempted = events(run, "preempted")
    assert len(preempted) == 1 and "preempted: requeueing job" in log(), log()

    # A checkpoint after the resumed one, then node2 dies: its launcher and its rank.
    def newer() -> list[int]:
        return [c["step"] for c in events(run, "checkpoint") if c["step"] > preempted[0]["step"]]

    wait_until(newer, log)
    victims = cluster.tasks(job, "node2")
    killed = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: "failed: requeueing job" in log(), log, timeout=120)
    kill_to_requeue = time.time() - killed
    last_checkpoint = max(newer())
    wait_until(lambda: stepped_since_start(run, 3), log)
    kill_to_step = time.time() - killed

    record = cluster.wait(job, timeout=300)
    text = log()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "2", text
    assert "training exited 75" in text and "training exited 137" in text, text
    resumed = events(run, "resume")
    assert [r["step"] for r in resumed] == [preempted[0]["step"], last_checkpoint]
    assert resumed[0]["steps_lost"] == 0
    exits = {}  # launch -> host -> exit code
    for h in map(json.loads, (run / "launches.jsonl").open()):
        if h["event"] in ("launch", "exit"):
            exits.setdefault(h["launch"], {}).update({h["host"]: h.get("exit_code")})
    preempt, fail, finish = exits.values()
    assert preempt == {"node1": 75, "node2": 75}  # both checkpointed and asked to be requeued
    assert fail["node2"] is None  # killed: no exit of its own
    assert finish == {"node1": 0, "node2": 0}

    ref = reference("ddp", tiny_overrides)
    assert json.loads((ref / "data_order.json").read_text())["num_canonical_nodes"] == 1
    assert losses_by_step(run) == losses_by_step(ref)
    print(f"USR1 to the first step of the requeued 2-node job: {usr1_to_step:.1f} s; "
          f"kill -9 of a node to requeue: {kill_to_requeue:.1f} s, "
          f"to the first step again: {kill_to_step:.1f} s")  # fmt: skip


@pytest.mark.slurm
@needs_slurm
def test_a_job_that_keeps_failing_without_a_new_checkpoint_is_not_requeued_forever(
    cluster, tiny_overrides, tmp_path
):
    """Its launcher dies at every start, before any checkpoint: requeued once
    (--max-requeues 1), then left failed."""
    run = tmp_path / "run"
    job = submit(cluster, *tiny_overrides, "--nodes=1", "--cpus-per-task=1", "--time=10",
                 "--max-requeues=1")  # fmt: skip
    log = lambda: job_log(run, job)  # noqa: E731
    for restart in (0, 1):
        wait_until(lambda: launchers(cluster, job, restart), log, timeout=120)  # noqa: B023
        for pid in launchers(cluster, job, restart):
            os.kill(pid, signal.SIGKILL)
    record = cluster.wait(job, timeout=120)
    text = log()
    assert record["JobState"] == "FAILED" and record["Restarts"] == "1", text
    assert text.count("failed: requeueing job") == 1, text
    assert "failed, not requeued: 2 times from the same checkpoint" in text, text


@pytest.mark.slurm
@needs_slurm
def test_a_sweep_runs_as_a_job_array(cluster, tiny_overrides, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = with_overrides(tiny_overrides, "train.max_steps=6", "train.eval_every=3")
    r = run_cli("sweep", "configs/tiny.yaml", *overrides, "--grid", "optim.lr=1e-3,3e-3",
                "--slurm", "--nodes=1", "--cpus-per-task=2", "--time=10",
                "--out", str(sweep), env=cluster.env)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    job = re.search(r"submitted job array (\d+)", r.stdout).group(1)
    records = [cluster.wait(f"{job}_{i}", timeout=300) for i in (0, 1)]
    logs = "\n".join(p.read_text() for p in sweep.glob("logs/slurm-*.out"))
    assert [rec["JobState"] for rec in records] == ["COMPLETED"] * 2, logs

    table = run_cli("sweep-status", str(sweep), env=cluster.env)
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()[1:]]
    assert [(row[0], row[1], row[2], row[3]) for row in rows] == [
        ("00_lr-1e-3", "1e-3", "finished", "6/6"),
        ("01_lr-3e-3", "3e-3", "finished", "6/6"),
    ], table.stdout
    assert rows[0][5] != rows[1][5]  # the two learning rates give different val losses
    for row in rows:
        config = (sweep / row[0] / "config.yaml").read_text()
        assert f"lr: {float(row[1])}" in config


@pytest.mark.slurm
@needs_slurm
def test_bad_submissions_are_refused_before_anything_is_submitted(
    cluster, tmp_path, capsys, monkeypatch
):
    from pretrain.__main__ import main

    for key, value in cluster.env.items():
        monkeypatch.setenv(key, value)
    before = cluster.run("squeue", "-h", "-o", "%i").stdout
    config = str(REPO / "configs/tiny.yaml")
    for args, says in [
        (["--partition=gpu"], "--partition gpu: no such partition (this cluster has: debug)"),
        (["--nodes=3"], "--nodes 3: partition debug has 2 node(s)"),
        (["--gpus-per-node=8"], "--gpus-per-node 8: partition debug has no GPUs"),
        (["--time=soon"], "sbatch refused the job: "),
        (["--max-requeues=-1"], "--max-requeues -1: must be 0 or more"),
    ]:
        assert main(["submit", config, f"run.dir={tmp_path / 'run'}", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "run").exists()
    assert cluster.run("squeue", "-h", "-o", "%i").stdout == before


@pytest.mark.slurm
@needs_slurm
def test_a_queued_job_shows_as_queued_and_resume_resubmits_a_cancelled_one(cluster, tmp_path):
    """No training: a job held for an hour is `queued`; `resume` leaves it alone; once it
    is cancelled, `resume` resubmits the run with its recorded SLURM options."""
    run = tmp_path / "run"
    later = ["--sbatch-arg=--begin=now+1hour"]
    job = submit(cluster, f"run.dir={run}", *CPU_JOB, *later)
    record = cluster.job(job)
    assert record["JobState"] == "PENDING", record
    assert "mem=4000M" in record["TRES"], record  # --mem=0: all of the node's memory
    status = run_cli("status", str(run), env=cluster.env).stdout
    assert "state       queued" in status and f"{job} (PENDING)" in status, status
    r = run_cli("resume", str(run), env=cluster.env)
    assert r.returncode == 1 and "is queued; nothing to resume" in r.stdout, r.stdout
    cluster.run("scancel", job)
    cluster.wait(job, states=("CANCELLED",), timeout=60)

    r = run_cli("resume", str(run), env=cluster.env)
    assert r.returncode == 0, r.stdout + r.stderr
    again = re.search(r"submitted job (\d+)", r.stdout).group(1)
    assert again != job
    record = cluster.job(again)
    assert record["JobState"] == "PENDING" and record["NumCPUs"] == "2", record
    assert json.loads((run / "launch.json").read_text())["job_id"] == again
    cluster.run("scancel", again)
