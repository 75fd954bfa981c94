"""Data start-up as it must behave on a cluster, with real torchrun ranks and real signals:
only global rank 0 checks the data and a restart re-hashes nothing unchanged (issue 12
item 1); caches live on node-local scratch and the sample order is chosen once per run
(item 2); DataLoader workers survive a preemption signal sent to the process group (item
10) and a long run directory path (item 11); batches are pinned for CUDA."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import iotrace
from pretrain.data import order as data_order
from tests.helpers.runs import REPO, prep, run_cli, with_overrides
from tests.test_data_dist import torchrun


@pytest.fixture(scope="module")
def sharded(dataset, tmp_path_factory) -> Path:
    """The session corpus in a dozen small local shards, so hashing counts mean something."""
    out = tmp_path_factory.mktemp("sharded") / "mds"
    prep(
        "shards", "--inputs", dataset["corpus"], "--text-field", "body",
        "--tokenizer", dataset["tokenizer"], "--seq-len", "64", "--val-fraction", "0.1",
        "--out", out, "--shard-size-limit", "64KB",
    )  # fmt: skip
    return out


def _hashed(trace: Path) -> list[dict]:
    return [r for r in iotrace.read(trace) if r["kind"] == iotrace.HASH]


@pytest.mark.torchrun
def test_only_rank0_checks_and_a_restart_hashes_nothing(sharded, tiny_overrides, dataset, tmp_path):
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    overrides = with_overrides(tiny_overrides, f"data.streams=[{{path: {sharded}}}]")
    shards = sorted(sharded.glob("*/*/shard.*.mds"))  # train and val
    assert len(shards) > 3 and {p.parent.parent.name for p in shards} == {"train", "val"}
    traces = [tmp_path / f"trace{i}" for i in range(3)]
    for trace in traces:
        trace.mkdir()

    def start(i: int, nproc: int, *args) -> list[dict]:
        env = {"PRETRAIN_SCRATCH": str(scratch), iotrace.ENV: str(traces[i])}
        torchrun(nproc, *args, tmp_path / f"out{i}", 2, *overrides, env=env)
        return _hashed(traces[i])

    # First start: rank 0 hashes each shard once; rank 1 reads, lists and hashes nothing.
    hashed = start(0, 2, "--save-at", 1)
    assert iotrace.counts(hashed, iotrace.HASH) == {0: len(shards)}
    assert sorted(r["what"] for r in hashed) == [str(p) for p in shards]
    assert not [r for r in iotrace.read(traces[0]) if r["rank"] != 0]
    # Rank 0 alone reads the tokenizer (once: both splits are checked in one round) and
    # the run directory; rank 1 opens and lists neither.
    opened = [json.loads((tmp_path / "out0" / f"opened{r}.json").read_text()) for r in (0, 1)]
    tokenizer = str(dataset["tokenizer"])
    assert [p for p in opened[0] if p == tokenizer] == [tokenizer]
    assert [p for p in opened[0] if p.startswith(str(run))]
    assert [p for p in opened[1] if p == tokenizer or p.startswith(str(run))] == []
    # The streaming cache is on node-local scratch, never in the shared run directory.
    (cache,) = scratch.glob("pretrain-*/cache/streams0/train")
    assert (cache / "index.json").read_bytes() == (sharded / "train" / "index.json").read_bytes()
    assert not (run / "cache").exists() and not (run / "tmp").exists()
    assert json.loads((run / "data_order.json").read_text())["num_canonical_nodes"] == 1

    # The restart (resuming the saved position): no rank hashes anything. With a checkpoint
    # to protect, rank 0 reads the saved config and lists the checkpoints; rank 1 does not.
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    assert start(1, 2, "--resume", tmp_path / "out0" / "state.json") == []
    opened = json.loads((tmp_path / "out1" / "opened1.json").read_text())
    assert [p for p in opened if p == tokenizer or p.startswith(str(run))] == []

    # A shard written again (new mtime) is the only one hashed again.
    st = shards[3].stat()
    os.utime(shards[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert [r["what"] for r in start(2, 1)] == [str(shards[3])]


def test_the_sample_order_is_chosen_once_and_recorded(tmp_path):
    four_nodes = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2"}
    assert data_order.resolve(None, tmp_path, four_nodes) == (4, "for 4 node(s)")
    # The next start, on three nodes, keeps the recorded value.
    value, why = data_order.resolve(None, tmp_path, {"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "2"})
    assert value == 4 and "recorded" in why
    # An explicit value is used as is.
    assert data_order.resolve(6, tmp_path, four_nodes)[0] == 6
    elastic = {**four_nodes, data_order.NNODES_RANGE_ENV: "3:4"}
    assert data_order.resolve(None, tmp_path / "elastic", elastic)[0] == 12


@pytest.mark.parametrize(("low", "high"), [(3, 4), (1, 8), (2, 6), (7, 8), (30, 40)])
def test_an_elastic_range_gives_a_value_every_node_count_starts_with(low, high):
    """Checked against streaming's own partitioning, which refuses any other value."""
    from pretrain.data.streaming_compat import streaming_module

    streaming_module()
    from streaming.base.partition import get_partitions

    value = data_order.choose(high, (low, high))
    assert value == 1 or value <= data_order.MAX_CHOSEN
    for nodes in range(low, high + 1):
        assert value % nodes == 0 or value == 1
        get_partitions("orig", 50_000, value, nodes, ranks_per_node=2, workers_per_rank=1, batch_size=4)  # fmt: skip


@pytest.mark.slow
def test_workers_survive_a_preemption_signal_to_the_group_and_the_run_resumes_in_order(
    tiny_overrides, tmp_path
):
    """SIGTERM to the whole process group (as SLURM sends it) with a DataLoader worker: the
    trainer saves and exits 75. The run was made as before data_order.json existed (its
    config.yaml fixes num_canonical_nodes, the old default was 1); a config that leaves it
    to be chosen resumes it as the same experiment, in the same order."""
    run = tmp_path / "run"
    overrides = with_overrides(tiny_overrides, "data.num_workers=1", "train.eval_every=100000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pretrain", "train", "configs/tiny.yaml", *overrides,
         "train.max_steps=100000", "data.num_canonical_nodes=3"],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as under SLURM
    )  # fmt: skip
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its DataLoader worker alike
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 75, err[-3000:]
    assert "killed by signal" not in err and "preempted (SIGTERM" in err
    saved = max((run / "checkpoints").glob("step_*"))

    (run / "data_order.json").unlink()  # as a run made before the file existed
    steps = int(saved.name.split("_")[1]) + 2
    r = run_cli("train", "configs/tiny.yaml", *overrides, f"train.max_steps={steps}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "num_canonical_nodes=3" in r.stderr
    assert data_order.recorded(run) == 3


@pytest.mark.slow
def test_a_long_run_directory_path_trains_with_workers(tiny_overrides, tmp_path):
    """AF_UNIX socket paths are limited to 107 bytes: temp files must not follow RUN_DIR."""
    run = tmp_path / ("long-" * 30) / "run"
    assert len(str(run)) >= 150
    r = run_cli(
        "train",
        "configs/tiny.yaml",
        *with_overrides(
            tiny_overrides, f"run.dir={run}", "data.num_workers=1", "train.max_steps=3"
        ),
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert '"step": 3' in (run / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_batches_are_pinned_for_cuda_only(tiny_overrides, tmp_path, device):
    from pretrain.config.load import load_config
    from pretrain.data.loader import TrainBatches

    cfg = load_config(
        REPO / "configs/tiny.yaml",
        with_overrides(tiny_overrides, "data.num_workers=1", f"run.scratch={tmp_path / 'scratch'}"),
    )
    data = TrainBatches(cfg, tmp_path / "run", torch.device(device))
    try:
        batch = data.next()
        assert data.loader.pin_memory == (device == "cuda")
        assert batch.is_pinned() == (device == "cuda")
    finally:
        del data
        gc.collect()
