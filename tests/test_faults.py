"""Fault tolerance with real processes (torchrun, 2 ranks, gloo): kill -9 under
`--max-restarts`, kill during a checkpoint write, SIGTERM preemption, a hung rank, and
non-finite steps. Every recovery must reproduce the uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from pretrain.train.metrics import read_metrics
from tests.helpers.runs import (
    REF,
    REF_STEPS,
    REPO,
    STRATEGIES,
    losses_by_step,
    run_torchrun,
    torchrun_command,
    with_overrides,
)


def start(tiny_overrides, name: str, *extra: str, max_restarts=0, env=None) -> subprocess.Popen:
    overrides = with_overrides(tiny_overrides, *STRATEGIES[name], *REF, *extra)
    cmd = torchrun_command(
        2, "-m", "pretrain", "train", "configs/tiny.yaml", *overrides, max_restarts=max_restarts
    )
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def worker(proc: subprocess.Popen, rank: int, attempt: int) -> psutil.Process | None:
    for child in psutil.Process(proc.pid).children():
        try:
            env = child.environ()
        except psutil.Error:  # exiting
            continue
        if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == str(attempt):
            return child
    return None


def wait_for_step(proc, run: Path, step: int, attempt: int, timeout: float = 180) -> None:
    """Until attempt `attempt` of the job has logged training step `step`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the job ended early:\n" + proc.stdout.read()
        records = read_metrics(run) if (run / "metrics.jsonl").exists() else []
        starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
        if (
            starts
            and records[starts[-1]].get("restart") == attempt
            and any("loss" in r and r["step"] >= step for r in records[starts[-1] :])
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"attempt {attempt} never reached step {step}")


def assert_every_logged_loss_matches(run: Path, expected: dict[int, float]) -> None:
    """Every loss logged (killed attempts' steps included) equals the reference exactly."""
    logged = [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    assert {s for s, _ in logged} == set(expected)
    assert all(loss == expected[step] for step, loss in logged)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{REF_STEPS:08d}"
    deepspeed = ckpt / "zero" / "mp_rank_00_model_states.pt"
    if deepspeed.exists():  # ZeRO-2 keeps the whole fp32 module in the model states file
        return torch.load(deepspeed, weights_only=False)["module"]
    import torch.distributed.checkpoint as dcp

    from pretrain.config.load import load_config
    from pretrain.model import Transformer

    model = Transformer(load_config(ckpt / "config.yaml").model)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state["model"]


@pytest.mark.torchrun
@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero2"])
def test_kill_9_ranks_under_max_restarts_resumes_bit_for_bit(
    tiny_overrides, tmp_path, reference, name
):
    ref_run = reference(name, tiny_overrides)
    expected = losses_by_step(ref_run)
    rng = random.Random(f"kill-{name}")
    kills = [(rng.randint(4, 7), rng.randint(0, 1)), (rng.randint(10, 13), rng.randint(0, 1))]
    run = tmp_path / "run"
    # DCP strategies save in the background (each save commits the one before), and must
    # still give the reference's blocking saves' results, kills included.
    saves = [] if name.startswith("zero") else ["checkpoint.async_save=true"]
    proc = start(tiny_overrides, name, *saves, max_restarts=3)
    for attempt, (step, rank) in enumerate(kills):
        wait_for_step(proc, run, step, attempt)
        victim = worker(proc, rank, attempt)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
    code, out = finish(proc)
    assert code == 0, out
    records = read_metrics(run)
    assert [r["restart"] for r in records if r.get("event") == "start"] == [0, 1, 2], out
    for i, r in enumerate(records):  # steps lost: those logged since the checkpoint resumed
        if r.get("event") == "resume":
            logged = max(x["step"] for x in records[:i] if "loss" in x)
            assert r["steps_lost"] == logged - r["step"] >= 0
    assert_every_logged_loss_matches(run, expected)
    mine, ref = final_weights(run), final_weights(ref_run)
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


@pytest.mark.torchrun
def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_one(
    tiny_overrides, tmp_path, reference
):
    expected = losses_by_step(reference("ddp", tiny_overrides))
    run = tmp_path / "run"
    proc = start(tiny_overrides, "ddp", env={"PRETRAIN_FAULTS": "slowsave@6"})
    partial = run / "checkpoints" / ".tmp-step_00000006"
    deadline = time.time() + 120
    while not (partial / ".metadata").exists():  # the model files are written, not the rest
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    for rank in (0, 1):
        worker(proc, rank, 0).send_signal(signal.SIGKILL)
    finish(proc)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003"]

    r = run_torchrun(
        2, "-m", "pretrain", "train", "configs/tiny.yaml",
        *with_overrides(tiny_overrides, *STRATEGIES["ddp"], *REF),
    )  # fmt: skip
    assert "resumed from" in r.stderr and "step_00000003" in r.stderr
    assert not partial.exists()
    assert_every_logged_loss_matches(run, expected)


@pytest.mark.torchrun
def test_sigterm_to_one_rank_saves_everywhere_and_exits_to_be_requeued(
    tiny_overrides, tmp_path, reference
):
    expected = losses_by_step(reference("ddp", tiny_overrides))
    run = tmp_path / "run"
    proc = start(tiny_overrides, "ddp")
    wait_for_step(proc, run, 5, 0)
    worker(proc, 1, 0).send_signal(signal.SIGTERM)
    code, out = finish(proc)
    # torchrun ends the other rank as soon as the first exits: one 75 is in its report
    assert code != 0 and "exitcode  : 75" in out, out
    preempted = [r for r in read_metrics(run) if r.get("event") == "preempted"]
    assert len(preempted) == 1 and preempted[0]["step"] < REF_STEPS
    saved = f"step_{preempted[0]['step']:08d}"
    assert (run / "checkpoints" / saved / "manifest.json").exists()

    r = run_torchrun(
        2, "-m", "pretrain", "train", "configs/tiny.yaml",
        *with_overrides(tiny_overrides, *STRATEGIES["ddp"], *REF),
    )  # fmt: skip
    assert f"resumed from {run / 'checkpoints' / saved}" in r.stderr
    assert losses_by_step(run) == expected
    resume = [r for r in read_metrics(run) if r.get("event") == "resume"][-1]
    assert resume["steps_lost"] == 0  # the preemption save was at the last logged step


@pytest.mark.torchrun
def test_a_hung_rank_is_dumped_and_aborted_then_the_restart_resumes(
    tiny_overrides, tmp_path, reference
):
    expected = losses_by_step(reference("ddp", tiny_overrides))
    run = tmp_path / "run"
    proc = start(
        tiny_overrides,
        "ddp",
        "fault.watchdog_s=8",
        max_restarts=1,
        env={"PRETRAIN_FAULTS": "hang@7:1"},
    )
    code, out = finish(proc)
    assert code == 0, out
    stacks = {p.name.split("-")[0]: p.read_text() for p in (run / "stacks").glob("*.txt")}
    assert stacks.keys() == {"rank0", "rank1"}, out  # every rank's stack is on disk
    assert all("no training progress for" in s for s in stacks.values())
    assert "maybe_hang" in stacks["rank1"]  # the hung rank's stack shows where it hangs
    assert "failed (exitcode: 124)" in out  # torchrun saw the watchdog's exit, and restarted
    resumes = [r for r in read_metrics(run) if r.get("event") == "resume"]
    assert [(r["restart"], r["step"]) for r in resumes] == [(1, 6)]
    assert losses_by_step(run) == expected


@pytest.mark.torchrun
def test_a_failing_rank_ends_the_job_at_once_and_its_stuck_peer_is_not_preempted(
    tiny_overrides, tmp_path
):
    """Rank 1 raises at step 5 while rank 0 is stuck there (asleep: like a rank in an NCCL
    collective, a closed connection does not wake it). Rank 1 posts its failure notice and
    aborts; torchrun's SIGTERM then ends rank 0 at once, not as a preemption (before:
    rank 0 took it for one and slept on until torchrun's SIGKILL, 30 s later)."""
    run = tmp_path / "run"
    proc = start(tiny_overrides, "ddp", env={"PRETRAIN_FAULTS": "raise@5:1 hang@5:0"})
    wait_for_step(proc, run, 1, 0)  # logged at once; steps 2 to 4 take a second or so
    t0 = time.monotonic()
    code, out = finish(proc, timeout=120)
    took = time.monotonic() - t0
    assert code != 0 and "RuntimeError: PRETRAIN_FAULTS: rank 1 fails in step 5" in out, out
    assert (
        "rank 0: SIGTERM after rank 1 failed: RuntimeError: PRETRAIN_FAULTS: rank 1 fails in "
        "step 5: the job is stopping, not a preemption; exiting without a checkpoint"
    ) in out, out
    assert "preempted (" not in out and "Sending process" in out
    assert not [r for r in read_metrics(run) if r.get("event") == "preempted"]
    assert took < 20, f"the job took {took:.0f} s to end after step 1\n{out}"


@pytest.mark.torchrun
def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(
    tiny_overrides, tmp_path, reference
):
    expected = losses_by_step(reference("ddp", tiny_overrides))
    r = run_torchrun(
        2, "-m", "pretrain", "train", "configs/tiny.yaml",
        *with_overrides(tiny_overrides, *STRATEGIES["ddp"], *REF),
        env={"PRETRAIN_FAULTS": "nan@4"},
    )  # fmt: skip
    records = [x for x in read_metrics(tmp_path / "run") if "loss" in x]
    assert [x["step"] for x in records if x.get("skipped")] == [4]
    assert all(x["loss"] == expected[x["step"]] for x in records[:3])  # before the NaN: same
    later = [x["loss"] for x in records[4:]]
    assert later and all(loss == loss and abs(loss) < 100 for loss in later)  # finite: no NaN
    assert "update skipped (1 in a row)" in r.stderr

    stop = tmp_path / "stop"
    r = run_torchrun(
        2, "-m", "pretrain", "train", "configs/tiny.yaml",
        *with_overrides(tiny_overrides, f"run.dir={stop}", *STRATEGIES["ddp"], *REF),
        "fault.max_bad_steps=2",
        env={"PRETRAIN_FAULTS": "nan@4,5,6"},
        check=False,
    )  # fmt: skip
    assert r.returncode != 0
    assert (
        "training stopped: 3 non-finite steps in a row at step 6 (fault.max_bad_steps=2); "
        "the last good checkpoint is step_00000003"
    ) in r.stderr
    assert sorted(p.name for p in (stop / "checkpoints").glob("step_*")) == ["step_00000003"]


def test_step_vote_answers_one_step_late_in_one_process():
    from pretrain.train.resilience import StepVote

    vote = StepVote(torch.device("cpu"), world_size=1)
    assert vote.collect() is False  # nothing cast yet
    assert vote.any_write_running(False) is True  # no vote yet: a write may still run
    vote.cast(preempted=True)
    assert vote.collect() is True and vote.any_write_running(True) is False  # last vote's
    vote.write_started()  # a save began after the commit check: not reported finished
    vote.cast(preempted=False)
    assert vote.collect() is False and vote.any_write_running(False) is True


VOTE_RANKS = """
import json, os, sys, weakref
import torch, torch.distributed as dist
from pretrain.train.resilience import StepVote

given = []  # every tensor a vote hands to a collective, as a weak reference
all_reduce = dist.all_reduce
def spy(tensor, *args, **kwargs):
    given.append(weakref.ref(tensor))
    return all_reduce(tensor, *args, **kwargs)
dist.all_reduce = spy

dist.init_process_group("gloo")
rank = dist.get_rank()
vote = StepVote(torch.device("cpu"), dist.get_world_size())
seen = []
for step in range(1, 7):
    preempted = vote.collect()
    running = vote.any_write_running(rank == 1 and step < 4)  # rank 1's write ends at step 4
    seen.append([step, preempted, running])
    vote.cast(preempted=rank == 1 and step >= 3)  # a signal on rank 1 only, at step 3
vote.collect()
dist.destroy_process_group()
# Owned by the vote to the end: no collective's thread ever frees a vote's tensor.
owned = len(given) == 6 and all(ref() is not None for ref in given)
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"seen": seen, "owned": owned}, f)
"""


@pytest.mark.torchrun
def test_step_vote_gives_every_rank_the_same_answer_at_the_same_step(tmp_path):
    script = tmp_path / "vote.py"
    script.write_text(VOTE_RANKS)
    run_torchrun(2, script, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["owned"] for r in ranks] == [True, True]
    seen = [r["seen"] for r in ranks]
    assert seen[0] == seen[1]  # the same decisions on every rank at every step
    preempted = [step for step, p, _ in seen[0] if p]
    writing = [step for step, _, w in seen[0] if w]
    assert preempted == [4, 5, 6]  # seen at step 3 on rank 1, acted on everywhere at 4
    assert writing == [1, 2, 3, 4]  # before any vote, then rank 1's flag one step late
