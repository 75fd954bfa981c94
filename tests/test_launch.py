"""`pretrain launch | resume | status | sweep` on this machine, with real torchrun agents:
per-rank logs, exit codes that are never restarted, resume of a run killed with kill -9,
preemption of the launcher, and two agents training together as two "nodes"."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.local import worker_exit_code
from launch.spec import node_range, read_history, record
from launch.sweep import parse_grid
from pretrain.errors import ConfigError
from pretrain.train.metrics import read_metrics
from tests.helpers.runs import REF, REPO, STRATEGIES, losses_by_step, run_cli, with_overrides

DDP = [*STRATEGIES["ddp"], *REF]


def launch(*args: str, env: dict | None = None, own_shm: bool = False) -> subprocess.Popen:
    """`pretrain launch ARGS` in its own session (so the test can kill the whole tree);
    with `own_shm`, in a mount namespace with a /dev/shm of its own, like another node."""
    cmd = [sys.executable, "-m", "pretrain", "launch", *args]
    if own_shm:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh", *cmd]  # fmt: skip
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended before {what}:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def logged_step(run: Path) -> int:
    return max((r["step"] for r in read_metrics(run) if "loss" in r), default=0)


def test_exit_codes_of_failed_workers():
    assert worker_exit_code({0: 75, 1: -15}, 75)[0] == 75  # rank 1 was torn down
    assert worker_exit_code({0: 2, 1: 2}, 75)[0] == 2
    assert worker_exit_code({1: 3}, 75)[0] == 3
    assert worker_exit_code({0: -9}, 75) == (137, "failed: rank 0 killed by SIGKILL")
    assert worker_exit_code({0: 1, 1: -9}, 75)[0] == 1
    # The cause, not the survivors' exits after torchrun's SIGTERM (signal or 128+15).
    assert worker_exit_code({0: 143, 1: -9}, 75)[0] == 137
    assert worker_exit_code({0: -15, 1: -9, 2: 143}, 75)[0] == 137
    assert worker_exit_code({0: 143, 1: -15}, 75)[0] == 143


def _record_many(run: str, node: int, n: int) -> None:
    for i in range(n):
        record(Path(run), event="launch", node=node, i=i, why="x" * 300)


def test_every_node_appends_to_the_launch_record_at_once(tmp_path):
    """Eight "nodes" append 50 records each at the same time: all 400 arrive whole. A line
    cut short by a writer killed mid-write costs that line only, not the next one."""
    import multiprocessing

    # Forked: the children only append lines, and start at once instead of each importing
    # torch first (spawn), so the eight writers really overlap.
    procs = [
        multiprocessing.get_context("fork").Process(target=_record_many, args=(str(tmp_path), n, 50))
        for n in range(8)
    ]  # fmt: skip
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    history = read_history(tmp_path)
    assert len(history) == 400
    assert {(r["node"], r["i"]) for r in history} == {(n, i) for n in range(8) for i in range(50)}

    with open(tmp_path / "launches.jsonl", "a") as f:
        f.write('{"event": "exit", "node": 3, "exit_co')  # a writer died here
    record(tmp_path, event="exit", node=0, exit_code=0)
    assert read_history(tmp_path)[-1]["event"] == "exit"


def test_node_ranges():
    assert node_range(4) == (4, 4) and node_range("3:4") == (3, 4) and node_range("2") == (2, 2)
    for bad in ("0", "4:3", "x", "1:2:3", "3:", ""):
        with pytest.raises(ConfigError, match="expected a node count N or a range MIN:MAX"):
            node_range(bad)


def test_grid_values_split_outside_brackets():
    grid = parse_grid(["optim.lr=1e-3,3e-3", "data.streams=[{path: a},{path: b}],[]"])
    assert grid == {
        "optim.lr": ["1e-3", "3e-3"],
        "data.streams": ["[{path: a},{path: b}]", "[]"],
    }
    for bad in (["optim.lr"], ["optim.lr=1,,2"], ["optim.lr=1", "optim.lr=2"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


@pytest.mark.torchrun
def test_kill_9_then_resume_finishes_like_an_uninterrupted_run(tiny_overrides, tmp_path, reference):
    """A 2-rank launch is killed with kill -9 (launcher and ranks) mid-run; `status` says
    failed; `resume RUN_DIR` relaunches it as launched and every loss equals the
    uninterrupted run's; each rank of each launch has its own log."""
    run = tmp_path / "run"
    # 1 s a step: `status` (a process of its own) answers while the run is still going
    proc = launch("configs/tiny.yaml", *with_overrides(tiny_overrides, *DDP), "--nproc-per-node=2",
                  env={"PRETRAIN_FAULTS": "steptime@1"})  # fmt: skip
    wait_for(lambda: logged_step(run) >= 1, proc, "step 1")
    running = run_cli("status", str(run))
    assert "state       running" in running.stdout, running.stdout
    wait_for(lambda: logged_step(run) >= 5, proc, "step 5")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # the ranks are in the same session: all gone, their locks released
    status = run_cli("status", str(run))
    assert status.returncode == 0 and "state       failed" in status.stdout, status.stdout

    r = run_cli("resume", str(run), cwd=tmp_path)  # from another directory
    assert r.returncode == 0, r.stdout + r.stderr
    ref = losses_by_step(reference("ddp", tiny_overrides))
    assert losses_by_step(run) == ref
    status = run_cli("status", str(run)).stdout
    assert "state       finished (last exit 0)" in status and "restarts    1" in status, status
    launches = sorted((run / "logs").iterdir())
    assert len(launches) == 2
    for folder in launches:
        assert {p.name for p in folder.glob("attempt0.rank*.err")} == {
            "attempt0.rank0.err", "attempt0.rank1.err"
        }  # fmt: skip
    assert "resumed from" in (launches[1] / "attempt0.rank0.err").read_text()
    assert "step     16/16" in (launches[1] / "attempt0.rank0.out").read_text()


@pytest.mark.torchrun
def test_final_exit_codes_are_not_restarted(tiny_overrides, tmp_path):
    """Under --max-restarts 3, a config error (2) and a preemption (75) end the launch at
    once with the workers' code; a preempted run says so in `status`."""
    run = tmp_path / "run"
    bad = launch("configs/tiny.yaml", *tiny_overrides, "--nproc-per-node=2", "--max-restarts=3")
    out, _ = bad.communicate(timeout=120)
    assert bad.returncode == 2, out
    assert "parallel.strategy=single runs one process, but 2 were started" in out
    assert not list(run.glob("logs/*/attempt1.*")), "a config error was restarted"

    proc = launch("configs/tiny.yaml", *with_overrides(tiny_overrides, *DDP),
                  "--nproc-per-node=2", "--max-restarts=3",
                  env={"PRETRAIN_FAULTS": "steptime@0.2"})  # fmt: skip
    wait_for(lambda: logged_step(run) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGUSR1)  # to the launcher only, as SLURM's --signal does
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    events = [r for r in read_metrics(run) if r.get("event") == "preempted"]
    assert len(events) == 1 and (run / "checkpoints" / "latest").exists()
    assert not list(run.glob("logs/*/attempt1.*")), "a preempted run was restarted"
    status = run_cli("status", str(run)).stdout
    assert "state       preempted (last exit 75)" in status, status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Burns half a core in 50 ms slices: the ranks' and agents' threads are put off and woken
# at varying points of every start-up and teardown, at half the cost of a busy loop.
BURNER = """import time
while True:
    end = time.monotonic() + 0.05
    while time.monotonic() < end:
        pass
    time.sleep(0.05)
"""


@pytest.mark.torchrun
def test_two_agents_train_together_as_two_nodes_again_and_again_under_load(
    tiny_overrides, tmp_path, reference
):
    """`pretrain launch --nnodes 2` twice, rendezvous on 127.0.0.1: one job of 2 ranks,
    bit for bit the first steps of the 2-rank run of one torchrun. Each agent has a
    /dev/shm of its own, as on two machines (streaming's shared memory is per node). Two
    jobs in a row while another process burns CPU, each bounded: a start or an exit that
    hangs once in a while (a rendezvous, a process group's teardown) shows here, not in a
    user's job. 8 of the reference's 16 steps: a job's cost is its start and exit (~17 s
    on 2 cores), not its steps, and the schedule (decay_steps) is the reference's."""
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"needs root for a private /dev/shm per node: {probe.stderr.decode()}")
    steps = 8
    expected = {s: loss for s, loss in losses_by_step(reference("ddp", tiny_overrides)).items()
                if s <= steps}  # fmt: skip
    burner = subprocess.Popen([sys.executable, "-c", BURNER])
    took = []
    try:
        for rep in range(2):
            run = tmp_path / f"run{rep}"
            port = _free_port()
            # The sample order of the one-node reference (chosen from its node count, 1;
            # two nodes would choose 2).
            overrides = with_overrides(tiny_overrides, *DDP, "data.num_canonical_nodes=1",
                                       f"train.max_steps={steps}", f"run.dir={run}")  # fmt: skip
            start = time.monotonic()
            agents = [
                launch("configs/tiny.yaml", *overrides, "--nnodes=2", "--nproc-per-node=1",
                       f"--node-rank={node}", f"--rdzv-endpoint=127.0.0.1:{port}",
                       f"--rdzv-id=two-nodes-{rep}", own_shm=True)
                for node in (0, 1)
            ]  # fmt: skip
            outs = [agent.communicate(timeout=150)[0] for agent in agents]
            took.append(round(time.monotonic() - start, 1))
            assert [a.returncode for a in agents] == [0, 0], f"job {rep}:\n" + "\n".join(outs)
            assert losses_by_step(run) == expected, f"job {rep}"
            spec = json.loads((run / "launch.json").read_text())
            assert spec["nnodes"] == 2 and spec["nproc_per_node"] == 1
    finally:
        burner.kill()
        burner.wait()
        print(f"two-agent jobs under load took {took} s")


@pytest.mark.torchrun
def test_a_killed_worker_is_posted_by_its_launcher_so_its_stuck_peer_leaves_at_once(
    tiny_overrides, tmp_path
):
    """Rank 1 is killed with -9 while rank 0 is stuck in step 5 (asleep: like a rank in an
    NCCL collective, a closed connection does not wake it). The launcher posts the failure
    before torchrun's SIGTERM, so rank 0 leaves at once, not as a preemption (before: it
    took the SIGTERM for one and slept on until torchrun's SIGKILL, 30 s later)."""
    import psutil

    run = tmp_path / "run"
    proc = launch("configs/tiny.yaml", *with_overrides(tiny_overrides, *DDP), "--nproc-per-node=2",
                  env={"PRETRAIN_FAULTS": "hang@5:0"})  # fmt: skip

    def hung() -> bool:
        return any("hangs in step 5" in p.read_text() for p in run.glob("logs/*/*rank0.err"))

    wait_for(hung, proc, "rank 0's hang")
    (victim,) = [c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1"]
    victim.kill()
    start = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 137, out
    assert (
        "rank 0: SIGTERM after rank 1 killed by SIGKILL (seen by node 0's launcher): the job "
        "is stopping, not a preemption; exiting without a checkpoint"
    ) in out, out
    assert "preempted (" not in out
    assert took < 20, f"the job took {took:.0f} s to end after the kill\n{out}"


@pytest.mark.torchrun
def test_a_local_sweep_runs_its_points_one_after_another(tiny_overrides, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = with_overrides(tiny_overrides, "train.max_steps=4", "train.eval_every=2",
                               "checkpoint.every=2")  # fmt: skip
    r = run_cli("sweep", "configs/tiny.yaml", *overrides, "--grid", "optim.lr=1e-3,3e-3",
                "--grid", "model.n_layers=1", "--out", str(sweep))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    table = run_cli("sweep-status", str(sweep)).stdout.splitlines()
    assert table[0].split()[:5] == ["run", "optim.lr", "model.n_layers", "state", "step"]
    rows = [line.split() for line in table[1:]]
    assert [row[:5] for row in rows] == [
        ["00_lr-1e-3_n_layers-1", "1e-3", "1", "finished", "4/4"],
        ["01_lr-3e-3_n_layers-1", "3e-3", "1", "finished", "4/4"],
    ], table
    assert "n_layers: 1" in (sweep / rows[1][0] / "config.yaml").read_text()


def test_bad_input_is_one_line_and_creates_nothing(tmp_path, tiny_overrides, capsys, monkeypatch):
    """The CLI in this process (the same main() as `pretrain`): exit 2, one line, nothing
    written."""
    from pretrain.__main__ import main

    monkeypatch.chdir(tmp_path)

    def refused(*args: str, says: str) -> None:
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err

    refused("launch", "nope.yaml", "--nproc-per-node=2", says="config file not found:")
    refused("status", str(tmp_path), says="not a run directory (no config.yaml)")
    refused("resume", str(tmp_path / "missing"), says="no such run directory")
    config = str(REPO / "configs/tiny.yaml")
    refused("sweep", config, *tiny_overrides, "--grid", "optim.lrr=1,2",
            says="unknown key 'optim.lrr'")  # fmt: skip
    refused("launch", config, *tiny_overrides, "--nnodes=2", says="needs --rdzv-endpoint")
    refused("launch", config, *tiny_overrides, "--nnodes=4:3", says="--nnodes 4:3: expected")
    refused("sweep-status", str(tmp_path), says="not a sweep folder")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("runs"))


def test_submit_dry_run_prints_the_script_and_writes_nothing(tmp_path, tiny_overrides):
    r = run_cli("submit", str(REPO / "configs/tiny.yaml"), *tiny_overrides, "--nodes=4",
                "--gpus-per-node=8", "--partition=gpu", "--time=2-00:00:00",
                "--cpus-per-task=64", "--dry-run", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    script = r.stdout
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --signal=USR1@180", "#SBATCH --requeue",
                 "--nproc-per-node 8", f"RUN_DIRS=({tmp_path / 'run'})"):  # fmt: skip
        assert line in script, line
    assert "{{" not in script
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    assert not (tmp_path / "run").exists()
