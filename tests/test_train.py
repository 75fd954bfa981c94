"""End-to-end training through the real CLI: loss falls, outputs land, resume is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers.runs import REPO, losses_by_step, prep, read_metrics, run_cli, shakespeare_texts

pytestmark = pytest.mark.slow


def _train(overrides, *extra):
    r = run_cli("train", "configs/tiny.yaml", *overrides, *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_training_learns_and_leaves_a_complete_run_directory(tiny_overrides, tmp_path):
    r = _train(tiny_overrides)
    run = tmp_path / "run"
    records = read_metrics(run)
    train = [x for x in records if "loss" in x]
    assert [x["step"] for x in train] == list(range(1, 21))
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "tokens"):
        assert key in train[0]
    assert train[-1]["tokens"] == 20 * 16 * 64
    val = [x for x in records if "val_loss" in x]
    assert [x["step"] for x in val] == [10, 20] and val[1]["val_loss"] < val[0]["val_loss"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["d_model"] == 64 and saved["run"]["dir"] == str(run)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000015", "step_00000020"]  # keep_last=2
    assert json.loads((run / "checkpoints/latest").read_text())["step"] == 20
    assert "step     20/20" in r.stdout and "val_loss" in r.stdout
    # Running the finished run again is a no-op that says so.
    again = _train(tiny_overrides)
    assert "already complete at step 20" in again.stderr + again.stdout
    assert len([x for x in read_metrics(run) if "loss" in x]) == 20


def test_kill_9_then_rerun_gives_the_uninterrupted_losses_bit_for_bit(tiny_overrides, tmp_path):
    steps = ["train.max_steps=40", "checkpoint.every=7"]
    ref = [
        o if not o.startswith("run.dir=") else f"run.dir={tmp_path / 'ref'}" for o in tiny_overrides
    ]
    _train(ref, *steps)
    expected = losses_by_step(tmp_path / "ref")

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pretrain",
            "train",
            "configs/tiny.yaml",
            *tiny_overrides,
            *steps,
            "checkpoint.keep_last=10",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 somewhere after the second checkpoint
        if (run / "checkpoints" / "step_00000014").exists():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(losses_by_step(run))
    assert killed_at < 40

    _train(tiny_overrides, *steps, "checkpoint.keep_last=10")
    records = read_metrics(run)
    resume = [r for r in records if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] >= 14
    assert resume[0]["steps_lost"] == killed_at - resume[0]["step"]
    assert losses_by_step(run) == expected  # every step, bit for bit (exact floats)


def test_stop_and_extend_matches_a_longer_run(tiny_overrides, tmp_path):
    """Train 10 steps, then rerun asking for 20: equals 20 steps in one go (fixed decay)."""
    fixed = ["schedule.decay_steps=20"]
    ref = [
        o if not o.startswith("run.dir=") else f"run.dir={tmp_path / 'ref'}" for o in tiny_overrides
    ]
    _train(ref, *fixed)
    _train(tiny_overrides, *fixed, "train.max_steps=10")
    _train(tiny_overrides, *fixed)
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "ref")


def test_shipped_demo_config_trains_on_the_test_data(dataset, tmp_path):
    """configs/tiny.yaml's own model and downstream tasks (only vocab and data swapped)
    run a few steps; its task files are made where the demo makes them (relative to the
    working directory), from two plays, by `pretrain prep tasks`."""
    texts = [str(p) for p in shakespeare_texts()[8:10]]
    prep("tasks", "--inputs", *texts, "--out", tmp_path / "data/shakespeare/tasks", "--examples", "20")  # fmt: skip
    r = run_cli(
        "train", str(REPO / "configs/tiny.yaml"), f"run.dir={tmp_path / 'demo'}", f"data.tokenizer={dataset['tokenizer']}",
        f"data.streams=[{{path: {dataset['mds']}}}]", "data.seq_len=64", "model.vocab_size=512",
        "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(losses_by_step(tmp_path / "demo")) == 2
    (scores,) = [r for r in read_metrics(tmp_path / "demo") if "eval/core" in r]
    assert scores["step"] == 2 and set(scores) >= {"eval/word_order", "eval/cloze"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.vocab_size=1000", "does not match the tokenizer"),
        ("data.seq_len=32", "packs sequences of 64 tokens but data.seq_len is 32"),
        ("data.tokenizer=/nonexistent/tok.model", "data.tokenizer:"),
        ("data.streams=[{path: /nonexistent}]", "no meta.json"),
    ],
)
def test_data_that_does_not_fit_is_refused_before_training(
    tiny_overrides, tmp_path, override, expected
):
    r = run_cli("train", "configs/tiny.yaml", *tiny_overrides, override)
    assert r.returncode == 2
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_allow_vocab_padding(tiny_overrides, tmp_path):
    r = run_cli(
        "train",
        "configs/tiny.yaml",
        *tiny_overrides,
        "model.vocab_size=576",
        "data.allow_vocab_padding=true",
        "train.max_steps=1",
    )
    assert r.returncode == 0, r.stderr


def test_reusing_a_run_dir_for_another_model_is_refused(tiny_overrides, tmp_path):
    _train(tiny_overrides, "train.max_steps=1")
    r = run_cli("train", "configs/tiny.yaml", *tiny_overrides, "model.n_layers=3")
    assert r.returncode == 2
    assert "holds a run with model.n_layers=2, this config has 3" in r.stderr
    assert yaml.safe_load((tmp_path / "run/config.yaml").read_text())["model"]["n_layers"] == 2


def test_a_run_that_never_checkpointed_can_change_its_config(tiny_overrides, tmp_path):
    r = run_cli(
        "train", "configs/tiny.yaml", *tiny_overrides, "data.seq_len=32", "model.n_layers=3"
    )
    assert r.returncode == 2 and "packs sequences of 64 tokens" in r.stderr
    _train(tiny_overrides, "train.max_steps=1")  # the fixed config starts; nothing was trained


def test_gradient_accumulation_matches_one_big_batch(tiny_overrides, tmp_path):
    """2 micro-batches of 8 give the same steps as 1 batch of 16 (up to float rounding)."""
    steps = ["train.max_steps=6", "train.eval_every=6", "checkpoint.every=0"]
    big = [
        o if not o.startswith("run.dir=") else f"run.dir={tmp_path / 'big'}" for o in tiny_overrides
    ]
    _train(tiny_overrides, *steps)  # micro 8, accumulate 2
    _train(big, *steps, "train.micro_batch_size=16")
    accum, whole = losses_by_step(tmp_path / "run"), losses_by_step(tmp_path / "big")
    assert accum.keys() == whole.keys()
    for step in accum:
        assert accum[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-5)


def test_bf16_autocast_step_is_close_to_fp32(tiny_overrides, tmp_path):
    """bf16 crawls on this CPU, so: two steps, first loss near the fp32 one."""
    steps = [
        "train.max_steps=2",
        "train.eval_every=2",
        "train.eval_batches=1",
        "checkpoint.every=0",
    ]
    bf16 = [
        o if not o.startswith("run.dir=") else f"run.dir={tmp_path / 'bf16'}"
        for o in tiny_overrides
    ]
    _train(tiny_overrides, *steps)
    _train(bf16, *steps, "parallel.mixed_precision=bf16")
    fp32, low = losses_by_step(tmp_path / "run"), losses_by_step(tmp_path / "bf16")
    assert low[1] != fp32[1]  # it really ran in another precision
    assert low[1] == pytest.approx(fp32[1], rel=2e-2)


def test_wandb_offline_run_needs_no_account(tiny_overrides, tmp_path):
    env = {"WANDB_API_KEY": "", "WANDB_SILENT": "true"}
    r = run_cli(
        "train",
        "configs/tiny.yaml",
        *tiny_overrides,
        "train.max_steps=2",
        "logging.wandb=true",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def _start(overrides, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "pretrain", "train", "configs/tiny.yaml", *overrides, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_process_on_a_running_run_dir_is_refused(tiny_overrides, tmp_path):
    first = _start(tiny_overrides, "train.max_steps=100000", "checkpoint.every=0")
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists():
            assert time.time() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.1)
        r = run_cli("train", "configs/tiny.yaml", *tiny_overrides)
        assert r.returncode == 2
        assert f"is in use by another training process (pid {first.pid})" in r.stderr
    finally:
        first.kill()
        first.wait()
    # kill -9 released the lock: the run can be started again.
    _train(tiny_overrides, "train.max_steps=1")


def test_two_runs_on_the_same_data_at_once_do_not_disturb_each_other(tiny_overrides, tmp_path):
    """Each run's streaming shared memory is its own: concurrent runs equal solo runs."""
    solo = [
        o if not o.startswith("run.dir=") else f"run.dir={tmp_path / 'solo'}"
        for o in tiny_overrides
    ]
    _train(solo)
    other = [
        o if not o.startswith("run.dir=") else f"run.dir={tmp_path / 'other'}"
        for o in tiny_overrides
    ]
    runs = [_start(tiny_overrides), _start(other, "run.seed=1")]
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "leaked shared_memory" not in err
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "solo")


# Counts, in a training process, the ops that copy a tensor's value to the host (`.item()`,
# `float()`, `bool()` of a tensor): on a GPU each makes the host wait for the device.
SYNC_PROBE = """
import json, sys
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from pretrain.config import load_config
from pretrain.train.trainer import Trainer

READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

class CountReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func in READS
        return func(*args, **(kwargs or {}))

trainer = Trainer(load_config("configs/tiny.yaml", sys.argv[1:]))
trainer.train_step()  # warm-up: the data loader seeds its first iterator with an .item()
out = {}
for mode in ("deferred", "per-step"):
    trainer.sync_every_step = trainer.strategy.host_sync_skip = mode == "per-step"
    with CountReads() as probe:
        for _ in range(3):
            trainer._step()
    records, stop = trainer._read_steps()
    out[mode] = {"reads": probe.reads, "steps": [r["step"] for r in records],
                 "keys": sorted(records[0]), "stop": stop is not None}
trainer.close()
print(json.dumps(out))
"""


def test_training_steps_never_wait_for_the_device_between_reads(tiny_overrides):
    """Three steps queue without one value read back (before: float(norm) before the update,
    then loss and norm .item(), every step); `_read_steps` then reads all three at once."""
    r = subprocess.run(
        [sys.executable, "-c", SYNC_PROBE, *tiny_overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["deferred"]["reads"] == 0
    assert out["per-step"]["reads"] >= 3  # the probe sees the old path's float(norm)
    assert out["deferred"]["steps"] == [2, 3, 4] and out["per-step"]["steps"] == [5, 6, 7]
    keys = ["data_s", "eta_s", "grad_norm", "loss", "lr", "mem_gb", "mfu", "step", "step_s"]
    assert out["deferred"]["keys"] == sorted([*keys, "time", "tokens", "tokens_per_s"])
    assert not out["deferred"]["stop"]
