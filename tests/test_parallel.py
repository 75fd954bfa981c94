"""Parallel strategies under real torchrun (2 ranks, gloo, fp32): each matches the
single-process run on the same global batch, and resumes exactly. (What each strategy holds
inside its ranks is checked in test_parallel_ranks.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers.runs import (
    REF,
    REF_STEPS,
    REPO,
    STRATEGIES,
    losses_by_step,
    read_metrics,
    run_cli,
    run_torchrun,
    with_overrides,
)


def torchrun_train(nproc: int, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_torchrun(
        nproc, "-m", "pretrain", "train", "configs/tiny.yaml", *overrides, check=check
    )


def assert_close_losses(run_a, run_b) -> None:
    one, two = read_metrics(run_a), read_metrics(run_b)
    for key in ("loss", "val_loss"):
        a = {r["step"]: r[key] for r in one if key in r}
        b = {r["step"]: r[key] for r in two if key in r}
        assert a.keys() == b.keys() and len(a) >= 2
        for step in a:  # same global batch, gradients averaged instead of accumulated
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-5), (key, step)


@pytest.mark.torchrun
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_2_ranks_match_one_process(tiny_overrides, reference, name):
    assert_close_losses(reference("single", tiny_overrides), reference(name, tiny_overrides))


@pytest.mark.torchrun
@pytest.mark.parametrize("name", ["zero3"])  # ddp, fsdp, zero2: kill -9 in test_faults
def test_stop_and_resume_is_exact(tiny_overrides, tmp_path, reference, name):
    expected = losses_by_step(reference(name, tiny_overrides))
    stop = REF_STEPS // 2
    overrides = with_overrides(tiny_overrides, *STRATEGIES[name], *REF)
    torchrun_train(2, *with_overrides(overrides, f"train.max_steps={stop}"))
    latest = tmp_path / "run" / "checkpoints" / f"step_{stop:08d}"
    assert (latest / "manifest.json").exists()
    r = torchrun_train(2, *overrides)
    assert f"resumed from {latest}" in r.stderr
    assert losses_by_step(tmp_path / "run") == expected


@pytest.mark.torchrun
def test_fsdp_checkpoint_of_2_ranks_resumes_on_1(tiny_overrides, tmp_path, reference):
    """DCP reshards: the 2-rank run's checkpoint half-way continues on one rank."""
    ref = reference("fsdp", tiny_overrides)
    fsdp = with_overrides(tiny_overrides, *STRATEGIES["fsdp"], *REF)
    torchrun_train(2, *with_overrides(fsdp, f"train.max_steps={REF_STEPS // 2}"))
    r = torchrun_train(1, *fsdp)
    assert "resumed from" in r.stderr
    assert_close_losses(ref, tmp_path / "run")

    # The 2-rank sharded checkpoint consolidates, tensor by tensor, into full weights equal
    # to the ones DCP loads into a whole model in one go.
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from pretrain.config.load import load_config
    from pretrain.model import Transformer

    ckpt = ref / "checkpoints" / f"step_{REF_STEPS:08d}"
    r = run_cli("consolidate", str(ckpt), "--out", str(tmp_path / "model.safetensors"))
    assert r.returncode == 0, r.stderr
    full = load_file(tmp_path / "model.safetensors")
    model = Transformer(load_config(ckpt / "config.yaml").model)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    assert full.keys() == state["model"].keys()
    assert all(torch.equal(full[k], state["model"][k]) for k in full)


@pytest.mark.torchrun
def test_zero_checkpoint_refuses_another_number_of_ranks(tiny_overrides, tmp_path, reference):
    import shutil

    shutil.copytree(reference("zero2", tiny_overrides), tmp_path / "run")
    r = torchrun_train(
        1,
        *with_overrides(
            tiny_overrides,
            *STRATEGIES["zero2"],
            *REF,
            f"train.max_steps={REF_STEPS + 4}",
            "train.global_batch_size=8",
        ),
        check=False,
    )
    assert r.returncode != 0  # torchrun reports a worker's exit status 2 as its own 1
    assert "config error: " in r.stderr
    assert "is a ZeRO checkpoint of 2 ranks; it resumes only on 2 (this run has 1)" in r.stderr


@pytest.mark.torchrun
def test_batch_sizes_must_divide_over_the_ranks(tiny_overrides):
    r = torchrun_train(
        2,
        *with_overrides(tiny_overrides, "parallel.strategy=ddp", "train.global_batch_size=24"),
        check=False,
    )
    assert r.returncode != 0
    assert (
        "train.global_batch_size (24) must be a multiple of train.micro_batch_size x ranks (8 x 2)"
        in r.stderr
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "every"])
def test_activation_checkpointing_gives_the_same_losses(tiny_overrides, reference, mode):
    ac = f"parallel.activation_checkpointing={mode}"
    r = run_cli("train", "configs/tiny.yaml", *with_overrides(tiny_overrides, *REF, ac))
    assert r.returncode == 0, r.stderr
    assert_close_losses(reference("single", tiny_overrides), with_run_dir(tiny_overrides))


@pytest.mark.torchrun
def test_activation_checkpointing_under_fsdp(tiny_overrides, reference):
    ac = "parallel.activation_checkpointing=full"
    torchrun_train(2, *with_overrides(tiny_overrides, *STRATEGIES["fsdp"], *REF, ac))
    assert_close_losses(reference("single", tiny_overrides), with_run_dir(tiny_overrides))


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tiny_overrides, reference):
    ref = reference("single", tiny_overrides)
    short = with_overrides(tiny_overrides, *REF, "train.max_steps=6", "train.eval_every=6")
    r = run_cli("train", "configs/tiny.yaml", *short, "parallel.compile=true")
    assert r.returncode == 0, r.stderr
    run = with_run_dir(tiny_overrides)
    eager, compiled = losses_by_step(ref), losses_by_step(run)
    assert sorted(compiled) == list(range(1, 7))
    assert all(compiled[s] == pytest.approx(eager[s], rel=1e-5) for s in compiled)
    # compile works in place: the checkpoint has the eager model's parameter names
    from safetensors.torch import load_file

    names = []
    for ckpt in (ref / "checkpoints/step_00000016", run / "checkpoints/step_00000006"):
        out = ckpt.parent.parent / "model.safetensors"
        r = run_cli("consolidate", str(ckpt), "--out", str(out))
        assert r.returncode == 0, r.stderr
        names.append(set(load_file(out)))
    assert names[0] == names[1]


def with_run_dir(overrides: list[str]):
    return Path(next(o for o in overrides if o.startswith("run.dir=")).split("=", 1)[1])


@pytest.mark.parametrize(
    ("mode", "expected"), [("none", [0, 0, 0, 0]), ("full", [1, 1, 1, 1]), ("every", [0, 1, 0, 1])]
)
def test_activation_checkpointing_wraps_the_chosen_blocks(mode, expected):
    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from pretrain.config.load import load_config
    from pretrain.parallel.base import new_transformer

    overrides = [
        "model.n_layers=4",
        f"parallel.activation_checkpointing={mode}",
        "parallel.activation_checkpointing_every=2",
    ]
    model = new_transformer(load_config(REPO / "configs/tiny.yaml", overrides), torch.device("cpu"))
    assert [int(type(b).__name__ == "CheckpointWrapper") for b in model.layers.values()] == expected
    plain = new_transformer(
        load_config(REPO / "configs/tiny.yaml", overrides[:1]), torch.device("cpu")
    )
    assert (
        get_model_state_dict(model).keys() == get_model_state_dict(plain).keys()
    )  # checkpoints interchange


@pytest.mark.torchrun
@pytest.mark.parametrize("name", ["fsdp", "zero2", "zero3"])
def test_gradient_accumulation_matches_one_process(tiny_overrides, reference, name):
    """2 micro-batches per rank per step (1 in the other tests): the losses of one process
    on the same global batch, with gradients reduce-scattered after every micro-batch (fsdp)
    or reduced in overlap with backward and accumulated in DeepSpeed's partitions (zero)."""
    overrides = [*STRATEGIES[name], *REF, "train.micro_batch_size=4"]
    torchrun_train(2, *with_overrides(tiny_overrides, *overrides))
    # training losses only: evaluation reads micro-batches, here of another size
    one = losses_by_step(reference("single", tiny_overrides))
    two = losses_by_step(with_run_dir(tiny_overrides))
    assert one.keys() == two.keys() and len(one) == REF_STEPS
    assert all(two[s] == pytest.approx(one[s], rel=1e-5, abs=1e-5) for s in one), (one, two)


def test_replica_share_gives_each_tensor_to_one_rank():
    import torch

    from pretrain.parallel.ddp import replica_share

    msd = {f"w{i}": torch.zeros(n) for i, n in enumerate([100, 10, 50, 40, 1])}
    osd = {
        "state": {k: {"exp_avg": torch.zeros_like(v), "step": torch.tensor(1.0)} for k, v in msd.items()},
        "param_groups": [{"lr": 1.0, "params": list(msd)}],
    }  # fmt: skip
    shares = [replica_share(msd, osd, rank, 3) for rank in range(3)]
    keys = [set(model) for model, _ in shares]
    assert set().union(*keys) == set(msd) and sum(map(len, keys)) == len(msd)
    assert all(set(optim["state"]) == k for (_, optim), k in zip(shares, keys, strict=True))
    assert all(optim["param_groups"] == osd["param_groups"] for _, optim in shares)
    assert keys[0] == {"w0"}  # the largest alone; the rest balanced over the others


def test_device_cuda_without_a_gpu_is_a_one_line_error(tiny_overrides, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from pretrain.__main__ import main

    args = ["train", str(REPO / "configs/tiny.yaml"), *tiny_overrides, "parallel.device=cuda"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "config error: parallel.device=cuda, but CUDA is not usable in this process: check "
        "the GPU and driver (nvidia-smi), or set parallel.device=cpu to train on CPU"
    ]


@pytest.mark.torchrun
@pytest.mark.parametrize(
    ("device", "verdicts", "message"),
    [
        # rank 0 claims a GPU (test-only fault injection), rank 1 has none
        ("auto", "0:1", "parallel.device=auto: CUDA is usable on 1 of 2 ranks but not on rank 1"),
        ("cuda", "", "parallel.device=cuda, but CUDA is not usable in any of the 2 ranks"),
    ],
)
def test_ranks_that_disagree_on_cuda_all_stop_with_the_reason(
    tiny_overrides, device, verdicts, message
):
    import torch

    from pretrain.parallel.device import FAULT_CUDA_ENV

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overrides = with_overrides(tiny_overrides, "parallel.strategy=ddp", f"parallel.device={device}")
    r = run_torchrun(
        2, "-m", "pretrain", "train", "configs/tiny.yaml", *overrides,
        env={FAULT_CUDA_ENV: verdicts}, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode != 0
    assert r.stderr.count(f"config error: {message}") == 2, r.stderr  # every rank, no hang
