"""Goodput under failures: a real 2-rank torchrun job with one rank killed (-9) every M s.

The tiny demo config trains under `torchrun --standalone --nproc-per-node 2
--max-restarts 1000` (ddp, gloo, fp32) for `--duration` seconds; every `--fail-every`
seconds a randomly chosen rank of the current attempt gets SIGKILL, torchrun brings the
group down and back, and every rank resumes from the latest complete checkpoint on its
own. At the end torchrun gets SIGTERM and passes it on (the workers save and exit).

From `metrics.jsonl` (rank 0 logs every step with its duration and a wall-clock time):
  - goodput: the time of the steps that count (the last run of each step number: steps
    redone after a failure count once) over the wall time from launch to the last step;
  - recovery: for each failure, the time from the kill to the first step of the next
    attempt (process start, imports, process group, data loader, checkpoint load, and the
    step itself);
  - lost work: the steps run after the last checkpoint before each failure, redone later.
The same job without failures is measured first, over the same duration, so the cost of
evaluation and checkpointing (which are not failures) shows separately.

    python bench/goodput.py [--duration 900] [--fail-every 300] [--checkpoint-every 20]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.rundir import RunDir  # noqa: E402
from pretrain.train.metrics import read_metrics  # noqa: E402

DATA = REPO / "data" / "shakespeare"


def launch(run: Path, checkpoint_every: int) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--max-restarts=1000", "-m", "pretrain", "train", "configs/tiny.yaml",
        f"run.dir={run}", "parallel.strategy=ddp", "train.max_steps=100000",
        "schedule.decay_steps=100000", "train.micro_batch_size=8",
        f"checkpoint.every={checkpoint_every}",
        "checkpoint.keep_last=2", "checkpoint.async_save=true", "train.eval_every=100000",
        "train.log_every=50",
    ]  # fmt: skip
    log = open(run.parent / f"{run.name}.log", "w")  # noqa: SIM115 - closed with the job
    # A session of its own, so that a job torchrun cannot stop is ended with its workers.
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def workers(job: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(job.pid).children():
        try:
            if "RANK" in child.environ():
                found.append(child)
        except psutil.Error:  # exiting
            continue
    return found


def steps_logged(run: Path) -> int:
    if not RunDir(run).metrics.exists():
        return 0
    return sum(1 for r in read_metrics(run) if "loss" in r)


def run_job(run: Path, duration: float, fail_every: float, seed: int, ckpt_every: int) -> dict:
    rng = random.Random(seed)
    start = time.time()
    job = launch(run, ckpt_every)
    kills = []
    next_kill = start + fail_every if fail_every else float("inf")
    while time.time() - start < duration:
        time.sleep(0.2)
        assert job.poll() is None, f"the job ended early; see {run.parent / run.name}.log"
        if next_kill <= time.time() < start + duration - 1:
            ranks = workers(job)
            if ranks and steps_logged(run):
                victim = rng.choice(ranks)
                kills.append(time.time())
                victim.send_signal(signal.SIGKILL)
                next_kill += fail_every
    job.send_signal(signal.SIGTERM)  # torchrun passes it on: the workers save and exit
    try:
        job.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)  # torchrun and every worker it left
    return analyse(run, start, kills)


def analyse(run: Path, start: float, kills: list[float]) -> dict:
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    counted = {}
    for r in steps:  # a redone step replaces the earlier run of it
        counted[r["step"]] = r
    end = max(r["time"] for r in steps)
    useful = sum(r["step_s"] for r in counted.values())
    recoveries, lost = [], []
    for k in kills:
        after = [r for r in steps if r["time"] > k]
        before = [r["step"] for r in steps if r["time"] <= k]
        resumes = [r for r in records if r.get("event") == "resume" and r["time"] > k]
        if after:
            recoveries.append(after[0]["time"] - k)
        if resumes and before:
            lost.append(max(before) - resumes[0]["step"])
    return {
        "wall_s": end - start,
        "useful_s": useful,
        "goodput": useful / (end - start),
        "steps": max(counted),
        "step_s": useful / len(counted),
        "failures": len(kills),
        "recovery_s": sum(recoveries) / len(recoveries) if recoveries else float("nan"),
        "recoveries": recoveries,
        "lost_steps": lost,
        "restarts": max((r.get("restart", 0) for r in records if "event" in r), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=900)
    parser.add_argument("--fail-every", type=float, default=300)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    if not (DATA / "mds" / "meta.json").exists():
        subprocess.run(["make", "-C", str(REPO), "data/shakespeare/mds/meta.json"], check=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    root = Path(tempfile.mkdtemp(prefix="goodput-"))
    rows = []
    if not args.skip_baseline:
        rows.append(
            ("no failures", run_job(root / "base", args.duration, 0, 0, args.checkpoint_every))
        )
    rows.append(
        (
            f"kill -9 every {args.fail_every:g} s",
            run_job(
                root / "faults", args.duration, args.fail_every, args.seed, args.checkpoint_every
            ),
        )
    )
    print(
        f"\ntiny config, ddp on 2 ranks (gloo, fp32), checkpoint every {args.checkpoint_every} steps, {args.duration:g} s each; logs in {root}"
    )
    print(
        f"{'run':<24} {'wall s':>7} {'steps':>6} {'s/step':>7} {'goodput':>8} {'failures':>8} {'recovery s':>10}  lost steps"
    )
    for name, r in rows:
        print(
            f"{name:<24} {r['wall_s']:>7.0f} {r['steps']:>6} {r['step_s']:>7.3f} {r['goodput']:>8.1%} "
            f"{r['failures']:>8} {r['recovery_s']:>10.1f}  {r['lost_steps']}"
        )
    if len(rows) == 2:
        ratio = rows[1][1]["goodput"] / rows[0][1]["goodput"]
        print(f"goodput with failures / without: {ratio:.3f}")


if __name__ == "__main__":
    main()
