"""Checks inside the ranks of the parallel strategies (torchrun, gloo; tests/helpers/parallel_ranks.py
builds each strategy through its own code on random tokens): DDP's first backward on 3 ranks,
FSDP's sharded gradients between micro-batches, ZeRO's fp32 gradients under bf16, DDP's async
save split over the ranks.

The 2-rank cases share one torchrun launch (`rank_cases`: each builds its own strategy in
turn, in the same process group), since starting ranks costs more than any of them; under
`make test` this file is one xdist group, so that launch is made once, on one worker. A
case that fails fails the tests of every case (the ranks' output names the case).
`run_parallel_ranks` kills every rank of a launch that outlives its timeout, after asking
each for its stacks, so a hang shows where it hangs and leaves no rank behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.runs import REPO, made_once, torchrun_command

pytestmark = pytest.mark.torchrun

# A small model for tests/helpers/parallel_ranks.py (random tokens, no data): 2 micro-batches per
# rank per step on 2 ranks.
SMALL = [
    "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.max_seq_len=64", "data.seq_len=64",
    "train.global_batch_size=8", "train.micro_batch_size=2",
]  # fmt: skip


def launch_ranks(nproc: int, *args, env: dict | None = None, timeout: float = 300) -> None:
    """torchrun of `nproc` ranks running tests/helpers/parallel_ranks.py ARGS, which must
    exit 0. On timeout every rank gets SIGABRT (Python prints each thread's stack to its
    output), then the whole launch is killed, and the failure shows all of it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
           "OMP_NUM_THREADS": "1", **(env or {})}  # fmt: skip
    cmd = torchrun_command(nproc, "tests/helpers/parallel_ranks.py", *args)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # torchrun and its ranks: one process group to end at once
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "parallel_ranks.py"],
                               capture_output=True, text=True).stdout.split()  # fmt: skip
        for pid in ranks:
            if int(pid) != proc.pid:
                os.kill(int(pid), signal.SIGABRT)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"ranks still running after {timeout} s; their stacks:\n{out}"
        ) from None
    assert proc.returncode == 0, out


def run_parallel_ranks(
    out: Path,
    checks: list[str],
    *overrides: str,
    env: dict | None = None,
    timeout: float = 300,
    nproc: int = 2,
) -> list[dict]:
    """Run tests/helpers/parallel_ranks.py on `nproc` ranks; each rank's results."""
    launch_ranks(nproc, out, ",".join(checks), *overrides, env=env, timeout=timeout)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def zero_bf16(stage: int) -> list[str]:
    return [
        "parallel.strategy=zero",
        f"parallel.zero_stage={stage}",
        "parallel.mixed_precision=bf16",
    ]


# name -> (checks, overrides): the 2-rank cases of one launch, in the order they run there:
# fsdp first (its `accum` counts every gradient in the process), ZeRO-3 last.
CASES = {
    "fsdp": (["accum", "init", "backend"], ["parallel.strategy=fsdp"]),
    "ddp-async-save": (
        ["dropout", "stage", "backend"],
        [
            "parallel.strategy=ddp",
            "parallel.device=cpu",
            "checkpoint.async_save=true",
            "model.dropout=0.1",
        ],
    ),
    "zero1-bf16": (["grads"], zero_bf16(1)),
    "zero2-bf16": (["grads"], zero_bf16(2)),
    # A MoE's router and experts, each initialised as its own module (the build
    # materialises one module at a time; as the MoE's children they were left as allocated).
    "zero3-moe": (["init"], ["parallel.strategy=zero", "parallel.zero_stage=3",
                             "model.moe.experts=4", "model.moe.expert_hidden=32",
                             "model.moe.shared_experts=1", "model.moe.first_dense=1"]),
    "zero3-bf16": (["grads", "init", "dropout"], zero_bf16(3)),
}  # fmt: skip


@pytest.fixture(scope="module")
def rank_cases(tmp_path_factory) -> Path:
    """The folder of every case's results (NAME/rank{r}.json), from one 2-rank launch."""

    def make(folder: Path) -> None:
        cases = [f"{n}:{'+'.join(c)}:{','.join([*o, *SMALL])}" for n, (c, o) in CASES.items()]
        launch_ranks(2, "--cases", folder, *cases)

    return made_once(tmp_path_factory, "parallel_rank_cases", make)


def ranks_of(rank_cases: Path, name: str) -> list[dict]:
    return [json.loads((rank_cases / name / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_first_backward_of_a_start_sums_like_every_later_one(tmp_path):
    # On 3+ ranks DDP's first backward used other buckets than later ones, so a resumed
    # run's first step differed from the uninterrupted run's in the last bits.
    ranks = run_parallel_ranks(tmp_path, ["buckets"], "parallel.strategy=ddp", *SMALL, nproc=3)
    assert all(r["buckets"] is True for r in ranks)


def test_fsdp_keeps_only_sharded_gradients_between_micro_batches(rank_cases):
    for r in ranks_of(rank_cases, "fsdp"):
        accum = r["accum"]
        # reduce-scattered after every micro-batch: each rank holds its half, in fp32
        assert accum["default"] <= 0.55 * accum["param_bytes"], accum
        # parallel.fsdp_defer_grad_sync (the old default): every unsharded gradient
        assert accum["deferred"] >= accum["param_bytes"], accum
        assert r["init"] is True  # sharded, the model starts as one process's does
        assert r["backend"] == {"backend": "gloo", "device": "cpu"}  # device=auto, no GPU


def test_zero3_builds_a_moe_model_partitioned_with_one_process_weights(rank_cases):
    assert all(r["init"] is True for r in ranks_of(rank_cases, "zero3-moe"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_bf16_accumulates_and_reduces_gradients_in_fp32(rank_cases, stage):
    ranks = ranks_of(rank_cases, f"zero{stage}-bf16")
    for r in ranks:
        grads = r["grads"]  # after the first of two micro-batches
        assert grads["param_dtype"] == "torch.bfloat16", grads
        assert grads["communication_data_type"] == "torch.float32", grads
        assert grads["buffers"], grads  # the accumulated gradients were found...
        assert all(d == ["torch.float32"] for d in grads["buffers"].values()), grads  # fp32
    if stage == 3:
        # Built partitioned, never whole, yet with a single process's initial weights (cast
        # to bf16 as the engine casts a whole model); dropout differs between ranks.
        assert all(r["init"] is True for r in ranks)
        assert ranks[0]["dropout"]["weights"] == ranks[1]["dropout"]["weights"]
        assert ranks[0]["dropout"]["mask"] != ranks[1]["dropout"]["mask"]


def test_ddp_async_save_copies_each_tensor_on_one_rank(rank_cases):
    ranks = ranks_of(rank_cases, "ddp-async-save")
    whole = ranks[0]["stage"]["whole"]  # bytes of the replicated model + optimizer state
    first, second = zip(*(r["stage"]["staged"] for r in ranks), strict=True)
    assert all(n <= 0.6 * whole for n in first), (first, whole)  # was: all of it on each rank
    assert sum(first) >= 0.9 * whole, (first, whole)  # between them, all of it
    assert all(n <= 0.05 * whole for n in second), second  # the next save reuses the buffers
    assert all(r["stage"]["reloaded_exactly"] for r in ranks)  # 2 ranks load the shares back
    # ... and so does one process without a process group: every tensor is in the files
    import torch.distributed.checkpoint as dcp

    from pretrain.config.load import load_config
    from pretrain.model import Transformer

    model = Transformer(load_config(REPO / "configs/tiny.yaml", SMALL).model)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(rank_cases / "ddp-async-save" / "ckpt1"), no_dist=True)
    model.load_state_dict(state["model"])
    digest = float(sum(p.detach().double().sum() for p in model.parameters()))
    assert digest == ranks[0]["dropout"]["weights"]
    # Same weights on both ranks, different dropout masks; gloo on CPU as asked.
    assert ranks[0]["dropout"]["weights"] == ranks[1]["dropout"]["weights"]
    assert ranks[0]["dropout"]["mask"] != ranks[1]["dropout"]["mask"]
    assert all(r["backend"] == {"backend": "gloo", "device": "cpu"} for r in ranks)
    # The async saves' group times out with the run's collectives, not torch's 30 minutes.
    timeout = load_config(REPO / "configs/tiny.yaml", SMALL).fault.collective_timeout_s
    assert [r["checkpoint_group_timeout_s"] for r in ranks] == [timeout, timeout]
