"""`pretrain submit` and `pretrain sweep --slurm` on a real single-node SLURM cluster
(slurmctld, slurmd and munged from Debian's packages, on 127.0.0.1): a 2-rank job
trains; a job signalled with USR1 checkpoints, requeues itself and resumes to the same
losses as an uninterrupted run; a sweep runs as a job array; bad submissions are refused
before anything is submitted."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from pretrain.metrics import read_metrics
from tests.conftest import REF, REPO, STRATEGIES, losses_by_step, run_cli, with_overrides
from tests.slurmcluster import SlurmCluster, slurm_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available())),
]
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
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


def test_usr1_checkpoints_requeues_and_resumes_exactly(
    cluster, tiny_overrides, tmp_path, reference
):
    run = tmp_path / "run"
    overrides = with_overrides(tiny_overrides, *STRATEGIES["ddp"], *REF)
    job = submit(cluster, *overrides, *CPU_JOB, "--nproc-per-node=2",
                 env={"PRETRAIN_FAULTS": "steptime@0.25"})  # fmt: skip
    deadline = time.time() + 180
    while not any(r.get("step", 0) >= 4 and "loss" in r for r in read_metrics(run)):
        assert time.time() < deadline, job_log(run, job)
        time.sleep(0.1)
    signalled = time.time()
    cluster.run("scancel", "--signal=USR1", job)
    while sum(r.get("event") == "start" for r in read_metrics(run)) < 2:
        assert time.time() < deadline + 120, job_log(run, job)
        time.sleep(0.2)
    back = time.time()
    record = cluster.wait(job, timeout=300)
    log = job_log(run, job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", log
    assert "preempted: requeueing job" in log and "training exited 75" in log, log

    metrics = read_metrics(run)
    preempted = [r for r in metrics if r.get("event") == "preempted"]
    resumed = [r for r in metrics if r.get("event") == "resume"]
    assert len(preempted) == 1 and resumed[-1]["step"] == preempted[0]["step"]
    assert resumed[-1]["steps_lost"] == 0
    assert losses_by_step(run) == losses_by_step(reference("ddp", tiny_overrides))
    exits = [h["exit_code"] for h in map(json.loads, (run / "launches.jsonl").open())
             if h["event"] == "exit"]  # fmt: skip
    assert exits == [75, 0]
    print(f"USR1 to the restarted job's first step: {back - signalled:.1f} s")


def test_a_sweep_runs_as_a_job_array(cluster, tiny_overrides, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = with_overrides(tiny_overrides, "train.max_steps=6", "train.eval_every=3")
    r = run_cli("sweep", "configs/tiny.yaml", *overrides, "--grid", "optim.lr=1e-3,3e-3",
                "--slurm", "--nodes=1", "--cpus-per-task=1", "--time=10",
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
        (["--nodes=3"], "--nodes 3: partition debug has 1 node(s)"),
        (["--gpus-per-node=8"], "--gpus-per-node 8: partition debug has no GPUs"),
        (["--time=soon"], "sbatch refused the job: "),
    ]:
        assert main(["submit", config, f"run.dir={tmp_path / 'run'}", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "run").exists()
    assert cluster.run("squeue", "-h", "-o", "%i").stdout == before


def test_a_queued_job_shows_as_queued_and_resume_resubmits_a_cancelled_one(cluster, tmp_path):
    """No training: a job held for an hour is `queued`; `resume` leaves it alone; once it
    is cancelled, `resume` resubmits the run with its recorded SLURM options."""
    run = tmp_path / "run"
    later = ["--sbatch-arg=--begin=now+1hour"]
    job = submit(cluster, f"run.dir={run}", *CPU_JOB, *later)
    assert cluster.job(job)["JobState"] == "PENDING"
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
