"""Parallel strategies under real torchrun (2 ranks, gloo, fp32): each matches the
single-process run on the same global batch, and resumes exactly."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO, losses_by_step, read_metrics, run_cli, run_torchrun, with_overrides

pytestmark = pytest.mark.slow


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


STRATEGIES = [
    ["parallel.strategy=ddp"],
    ["parallel.strategy=fsdp"],
    *(["parallel.strategy=zero", f"parallel.zero_stage={n}"] for n in (1, 2, 3)),
]
IDS = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_2_ranks_match_one_process(tiny_overrides, tmp_path, strategy):
    steps = ["train.max_steps=8", "train.eval_every=4"]
    single = with_overrides(tiny_overrides, f"run.dir={tmp_path / 'single'}", *steps)
    assert run_cli("train", "configs/tiny.yaml", *single).returncode == 0
    torchrun_train(2, *with_overrides(tiny_overrides, *strategy, *steps))
    assert_close_losses(tmp_path / "single", tmp_path / "run")


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_stop_and_resume_is_exact(tiny_overrides, tmp_path, strategy):
    ddp = [*strategy, "schedule.decay_steps=10"]
    torchrun_train(
        2,
        *with_overrides(tiny_overrides, f"run.dir={tmp_path / 'ref'}", "train.max_steps=10", *ddp),
    )
    # DCP strategies save in the background here (every 2 steps: each save commits the one
    # before), and must still resume exactly like the reference's blocking saves.
    saves = [] if "zero" in strategy[0] else ["checkpoint.async_save=true", "checkpoint.every=2"]
    torchrun_train(2, *with_overrides(tiny_overrides, "train.max_steps=5", *ddp, *saves))
    if saves:
        assert sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*")) == [
            "step_00000004",
            "step_00000005",
        ]
    r = torchrun_train(2, *with_overrides(tiny_overrides, "train.max_steps=10", *ddp, *saves))
    assert "resumed from" in r.stderr and "step_00000005" in r.stderr
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "ref")


def test_fsdp_checkpoint_of_2_ranks_resumes_on_1(tiny_overrides, tmp_path):
    """DCP reshards: the 2-rank run's checkpoint at step 5 continues on one rank."""
    fsdp = ["parallel.strategy=fsdp", "schedule.decay_steps=10", "train.eval_every=5"]
    torchrun_train(
        2,
        *with_overrides(tiny_overrides, f"run.dir={tmp_path / 'ref'}", "train.max_steps=10", *fsdp),
    )
    torchrun_train(2, *with_overrides(tiny_overrides, "train.max_steps=5", *fsdp))
    r = torchrun_train(1, *with_overrides(tiny_overrides, "train.max_steps=10", *fsdp))
    assert "resumed from" in r.stderr
    assert_close_losses(tmp_path / "ref", tmp_path / "run")

    # The 2-rank sharded checkpoint consolidates, tensor by tensor, into full weights equal
    # to the ones DCP loads into a whole model in one go.
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from pretrain.config import load_config
    from pretrain.model import Transformer

    ckpt = tmp_path / "ref" / "checkpoints" / "step_00000010"
    r = run_cli("consolidate", str(ckpt), "--out", str(tmp_path / "model.safetensors"))
    assert r.returncode == 0, r.stderr
    full = load_file(tmp_path / "model.safetensors")
    cfg = load_config(
        REPO / "configs/tiny.yaml", with_overrides(tiny_overrides, "model.max_seq_len=64")
    )
    model = Transformer(cfg.model)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))
    assert full.keys() == state["model"].keys()
    assert all(torch.equal(full[k], state["model"][k]) for k in full)


def test_zero_checkpoint_refuses_another_number_of_ranks(tiny_overrides, tmp_path):
    zero = ["parallel.strategy=zero", "schedule.decay_steps=10"]
    torchrun_train(2, *with_overrides(tiny_overrides, "train.max_steps=5", *zero))
    r = torchrun_train(
        1,
        *with_overrides(tiny_overrides, "train.max_steps=10", "train.global_batch_size=8", *zero),
        check=False,
    )
    assert r.returncode != 0  # torchrun reports a worker's exit status 2 as its own 1
    assert "config error: " in r.stderr
    assert "is a ZeRO checkpoint of 2 ranks; it resumes only on 2 (this run has 1)" in r.stderr


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


@pytest.mark.parametrize("mode", ["full", "every"])
def test_activation_checkpointing_gives_the_same_losses(tiny_overrides, tmp_path, mode):
    steps = ["train.max_steps=4", "train.eval_every=2", "checkpoint.every=2"]
    plain = with_overrides(tiny_overrides, f"run.dir={tmp_path / 'plain'}", *steps)
    assert run_cli("train", "configs/tiny.yaml", *plain).returncode == 0
    r = run_cli(
        "train",
        "configs/tiny.yaml",
        *tiny_overrides,
        *steps,
        f"parallel.activation_checkpointing={mode}",
    )
    assert r.returncode == 0, r.stderr
    assert_close_losses(tmp_path / "plain", tmp_path / "run")


def test_activation_checkpointing_under_fsdp(tiny_overrides, tmp_path):
    steps = ["train.max_steps=4", "train.eval_every=2"]
    single = with_overrides(tiny_overrides, f"run.dir={tmp_path / 'single'}", *steps)
    assert run_cli("train", "configs/tiny.yaml", *single).returncode == 0
    torchrun_train(
        2,
        *with_overrides(
            tiny_overrides,
            "parallel.strategy=fsdp",
            "parallel.activation_checkpointing=full",
            *steps,
        ),
    )
    assert_close_losses(tmp_path / "single", tmp_path / "run")


def test_compiled_blocks_train_like_eager_ones(tiny_overrides, tmp_path):
    steps = ["train.max_steps=4", "train.eval_every=2", "checkpoint.every=4"]
    eager = with_overrides(tiny_overrides, f"run.dir={tmp_path / 'eager'}", *steps)
    assert run_cli("train", "configs/tiny.yaml", *eager).returncode == 0
    r = run_cli("train", "configs/tiny.yaml", *tiny_overrides, *steps, "parallel.compile=true")
    assert r.returncode == 0, r.stderr
    assert_close_losses(tmp_path / "eager", tmp_path / "run")
    # compile works in place: the checkpoint has the eager model's parameter names
    from safetensors.torch import load_file

    for name in ("eager", "run"):
        ckpt = tmp_path / name / "checkpoints/step_00000004"
        r = run_cli("consolidate", str(ckpt), "--out", str(tmp_path / f"{name}.safetensors"))
        assert r.returncode == 0, r.stderr
    eager_w, compiled_w = (load_file(tmp_path / f"{n}.safetensors") for n in ("eager", "run"))
    assert eager_w.keys() == compiled_w.keys()


@pytest.mark.parametrize(
    ("mode", "expected"), [("none", [0, 0, 0, 0]), ("full", [1, 1, 1, 1]), ("every", [0, 1, 0, 1])]
)
def test_activation_checkpointing_wraps_the_chosen_blocks(mode, expected):
    import torch
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from pretrain.config import load_config
    from pretrain.parallel.base import new_transformer

    overrides = [
        "model.n_layers=4",
        f"parallel.activation_checkpointing={mode}",
        "parallel.activation_checkpointing_every=2",
    ]
    model = new_transformer(load_config(REPO / "configs/tiny.yaml", overrides), torch.device("cpu"))
    assert [int(type(b).__name__ == "CheckpointWrapper") for b in model.layers] == expected
    plain = new_transformer(
        load_config(REPO / "configs/tiny.yaml", overrides[:1]), torch.device("cpu")
    )
    assert (
        get_model_state_dict(model).keys() == get_model_state_dict(plain).keys()
    )  # checkpoints interchange
