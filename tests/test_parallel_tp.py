"""Tensor + sequence parallelism (`parallel.tp`, pretrain/parallel/tp.py) on the fsdp strategy.

On 4 real gloo ranks a test model whose head counts divide by 4 (GQA: 8 query heads over 4
kv heads, tied embeddings) trains as one process does, step by step, on tp 2 x dp_shard 2
and on HSDP 2 x 2 (the mesh of test_parallel_mesh.py); a rank killed with SIGKILL resumes
bit for bit on its own layout, HSDP too from its own checkpoint, and the checkpoint resumes
through DCP's resharding on FSDP alone, HSDP, tp 4, HSDP x tp and FSDP over 2 ranks, one
after another (one test: one single-process run serves them all). ALiBi with an untied head
and a chunked loss runs on tp 4. The layout checks are one line each.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess

import pytest
import torch

from pretrain.config.load import load_config
from pretrain.errors import ConfigError
from pretrain.parallel.dims import ParallelDims
from tests.helpers.runs import REPO, losses_by_step, run_cli, torchrun_command, with_overrides
from tests.test_faults import finish, wait_for_step, worker
from tests.test_parallel import torchrun_train

STEPS = 20
# Whole heads for up to 4 ranks: 8 query heads over 4 kv heads (GQA), head_dim 8.
TP_MODEL = ["model.n_heads=8", "model.n_kv_heads=4", "train.log_every=1", "train.eval_every=10",
            f"schedule.decay_steps={STEPS}"]  # fmt: skip
FOUR = ["parallel.strategy=fsdp", f"train.max_steps={STEPS}", "checkpoint.keep_last=4"]
# Each layout reads the global batch of 16 in one micro-batch per data-parallel rank.
LAYOUTS = {
    "tp2": ["parallel.tp=2", "train.micro_batch_size=8"],
    "fsdp4": ["train.micro_batch_size=4"],
    "tp4": ["parallel.tp=4", "train.micro_batch_size=16"],
    "hsdp-tp": ["parallel.tp=2", "parallel.dp_replicate=2", "train.micro_batch_size=8"],
    "hsdp": ["parallel.dp_replicate=2", "train.micro_batch_size=4"],
}


def tp_overrides(tiny_overrides: list[str], run_dir, *extra: str) -> list[str]:
    return with_overrides(tiny_overrides, f"run.dir={run_dir}", *TP_MODEL, *extra)


# ------------------------------------------------------------------ layout checks
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.tp=0"], "parallel.tp must be >= 1 (got 0)"),
        (["parallel.tp=2", "parallel.strategy=zero"], "parallel.tp=2 (tensor parallelism) needs parallel.strategy=fsdp (got zero)"),
        (["parallel.tp=2", "parallel.strategy=ddp"], "needs parallel.strategy=fsdp (got ddp)"),
        (["parallel.tp=4"], "model.n_heads=6 does not divide by parallel.tp=4"),
        (["parallel.tp=3", "model.n_kv_heads=6"], "model.vocab_size=4096 does not divide by parallel.tp=3"),
        (["parallel.tp=2", "model.n_kv_heads=1"], "model.n_kv_heads=1 does not divide by parallel.tp=2"),
        (["parallel.tp=2", "data.seq_len=255", "model.max_seq_len=255"], "data.seq_len=255 does not divide"),
        (["parallel.tp=2", "model.mlp_hidden=511"], "model.mlp_hidden=511 does not divide by parallel.tp=2"),
        (["parallel.tp=2", "model.position=learned"], "model.position=learned is not supported yet"),
    ],
)  # fmt: skip
def test_a_tp_layout_that_cannot_work_is_refused_before_any_rank_starts(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["parallel.strategy=fsdp", *overrides])
    assert message in str(e.value) and "\n" not in str(e.value)


class P:
    def __init__(self, tp: int, dp_replicate: int = 1, dp_shard: int = -1) -> None:
        self.tp, self.dp_replicate, self.dp_shard = tp, dp_replicate, dp_shard


def test_tp_is_the_innermost_dimension_and_stays_in_a_node():
    dims = ParallelDims.resolve(P(2, 2), 16)
    assert dims == ParallelDims(2, 4, 2) and dims.dp == 8
    assert (dims.shape, dims.names) == ((2, 4, 2), ("dp_replicate", "dp_shard", "tp"))
    # Consecutive ranks form a tp group and read one data-parallel rank's samples.
    assert [dims.dp_rank(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert dims.describe() == "HSDP: 2 replicas x 4 shards x TP 2"
    with pytest.raises(ConfigError, match=r"^parallel.tp=3 does not divide the 16 ranks"):
        ParallelDims.resolve(P(3), 16)
    with pytest.raises(ConfigError, match=r"dp_replicate=3 does not divide the 8 data-parallel"):
        ParallelDims.resolve(P(2, 3), 16)
    ParallelDims(1, 2, 8).check_tp_in_node(8, allowed=False)
    ParallelDims(1, 2, 4).check_tp_in_node(8, allowed=False)
    with pytest.raises(ConfigError, match=r"^parallel.tp=16 with 8 GPUs per node: .* or set parallel.tp_spans_nodes=true$"):  # fmt: skip
        ParallelDims(1, 1, 16).check_tp_in_node(8, allowed=False)
    ParallelDims(1, 1, 16).check_tp_in_node(8, allowed=True)


def test_tp_splits_whole_heads_and_keeps_the_tie():
    """On a fake 4-rank group (dp_shard 2 x tp 2): rank 0 computes query heads 0-3 with kv
    heads 0-1, and its q/k/v rows are exactly those heads' rows; the embedding and the head
    are one parameter, split over the vocabulary; FSDP shards over the dp dimension."""
    from torch.distributed.tensor import DTensor, Shard

    from pretrain.planner.build import build_for_plan
    from pretrain.planner.trace import fake_world

    cfg = load_config(
        "configs/tiny.yaml", ["parallel.strategy=fsdp", "parallel.tp=2", "model.n_heads=8",
                              "model.n_kv_heads=4", "model.d_model=64"],
    )  # fmt: skip
    with fake_world(4):
        _, meta, _ = build_for_plan(cfg, 4)
        attn = meta.layers["0"].attn
        assert attn.heads == (0, 4)
        q, k = attn.q_proj.weight, attn.k_proj.weight
        assert isinstance(q, DTensor) and q.device_mesh.mesh_dim_names == ("dp_shard", "tp")
        assert q.shape == (8 * 8, 64) and q.placements[1] == Shard(0)  # heads split over tp
        assert k.shape == (4 * 8, 64) and k.placements[1] == Shard(0)
        assert meta.lm_head.weight is meta.tok_emb.weight
        assert meta.tok_emb.weight.placements[1] == Shard(0)  # vocabulary rows over tp


def test_alibi_slopes_follow_the_global_head_index():
    """A rank holding heads 2-3 of 4 gets those heads' ALiBi biases, not heads 0-1's."""
    from pretrain.model.attention import build_attention_bias

    args = (4, True, None, 0, 8, 8, torch.device("cpu"), torch.float32)
    whole = build_attention_bias(*args)
    assert torch.equal(build_attention_bias(*args, heads=(2, 2)), whole[:, 2:4])
    assert not torch.equal(whole[:, 0:2], whole[:, 2:4])


# ------------------------------------------------------------------ 4 real ranks
def start_four(overrides: list[str], max_restarts: int) -> subprocess.Popen:
    cmd = torchrun_command(
        4, "-m", "pretrain", "train", "configs/tiny.yaml", *overrides, max_restarts=max_restarts
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.torchrun
def test_tp_hsdp_and_fsdp_on_4_ranks_train_like_one_process_and_resume_on_any_layout(
    tiny_overrides, tmp_path
):
    """One single-process run, and on 4 ranks tp 2 x dp_shard 2, HSDP (dp_replicate 2 x
    dp_shard 2) and the default, FSDP over 4, from the start: each logs the single
    process's losses, step by step. A tp
    rank killed with SIGKILL resumes bit for bit, and so does HSDP from its own half-way
    checkpoint. The tp run's step-10 checkpoint then moves through every other layout, each
    resuming from the one before (DCP reshards model and AdamW state): FSDP over 4 ranks,
    HSDP, tp 4 and HSDP x tp; losses within 1e-5 of the uninterrupted run. (Another world
    size on resume: test_parallel.py's FSDP 2 -> 1 and test_nodes.py's 8 -> 6 ranks.)"""
    single_dir = tmp_path / "single"
    r = run_cli("train", "configs/tiny.yaml", *tp_overrides(tiny_overrides, single_dir,
                f"train.max_steps={STEPS}"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    single = losses_by_step(single_dir)
    assert len(single) == STEPS

    def train(run_dir, layout: str, *extra: str):
        overrides = tp_overrides(tiny_overrides, run_dir, *FOUR, *LAYOUTS[layout], *extra)
        return torchrun_train(4, *overrides)

    def copy_until(run_dir, name: str, step: int):
        """A copy of `run_dir` without its checkpoints after `step`."""
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        for checkpoint in (copy / "checkpoints").glob("step_*"):
            if int(checkpoint.name.removeprefix("step_")) > step:
                shutil.rmtree(checkpoint)
        return copy

    # Uninterrupted on tp 2 x dp_shard 2, HSDP 2 x 2 and FSDP 4: one process's losses, step by step.
    uninterrupted = {}
    for layout, banner in (("tp2", "FSDP: 2 shards x TP 2"), ("hsdp", "HSDP: 2 replicas x 2 shards"),
                           ("fsdp4", "FSDP: 4 shards")):  # fmt: skip
        r = train(tmp_path / layout, layout)
        assert banner in r.stderr, layout
        uninterrupted[layout] = losses_by_step(tmp_path / layout)
        assert uninterrupted[layout].keys() == single.keys(), layout
        for step, loss in single.items():
            assert uninterrupted[layout][step] == pytest.approx(loss, rel=1e-5), (layout, step)

    # A rank killed (SIGKILL) after the step-10 checkpoint: torchrun restarts the ranks, they
    # resume on the same layout, and every logged loss is the uninterrupted run's, bit for bit.
    killed = tmp_path / "killed"
    proc = start_four(tp_overrides(tiny_overrides, killed, *FOUR, *LAYOUTS["tp2"]), 1)
    wait_for_step(proc, killed, 12, 0)
    victim = worker(proc, random.Random("tp-kill").randint(0, 3), 0)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    code, out = finish(proc)
    assert code == 0 and "resumed from" in out, out
    assert losses_by_step(killed) == uninterrupted["tp2"]

    # HSDP from its own step-10 checkpoint: bit for bit.
    again = copy_until(tmp_path / "hsdp", "again", 10)
    assert "resumed from" in train(again, "hsdp").stderr
    assert losses_by_step(again) == uninterrupted["hsdp"]

    # The tp run's step-10 checkpoint on every other layout in turn, each resuming from the
    # checkpoint the one before saved last; losses within 1e-5 of the uninterrupted run.
    moved = copy_until(tmp_path / "tp2", "moved", 10)
    last = 10
    for layout, steps in (("fsdp4", 12), ("hsdp", 14), ("tp4", 16), ("hsdp-tp", STEPS)):
        extra = [f"train.max_steps={steps}", "checkpoint.every=2"]
        r = train(moved, layout, *extra)
        assert f"step_{last:08d} (step {last};" in r.stderr, (layout, r.stderr[-2000:])
        last = steps
    resumed = losses_by_step(moved)
    assert resumed.keys() == single.keys()
    for step, loss in uninterrupted["tp2"].items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5), step

    # What export, generate and eval read: the tp checkpoint as whole tensors, the single
    # process's final weights. Within 1e-3: AdamW turns float rounding in a gradient near
    # zero into up to a step of lr (3e-3) over 20 steps; rows from the wrong head or
    # vocabulary shard would be off by the weights' own scale (init_std 0.02).
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from pretrain.__main__ import main as pretrain_main
    from pretrain.model import Transformer
    from pretrain.rundir import checkpoint_config, resolve_checkpoint

    weights = {}
    for run in (single_dir, tmp_path / "tp2"):
        checkpoint = resolve_checkpoint(run)
        state = {"model": Transformer(checkpoint_config(checkpoint).model).state_dict()}
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
        weights[run] = state["model"]
    assert weights[tmp_path / "tp2"].keys() == weights[single_dir].keys()
    for name, tensor in weights[single_dir].items():
        torch.testing.assert_close(weights[tmp_path / "tp2"][name], tensor, rtol=0, atol=1e-3)
    # HSDP's checkpoint consolidated (`pretrain consolidate`): every tensor, whole.
    checkpoint = resolve_checkpoint(tmp_path / "hsdp")
    assert pretrain_main(["consolidate", str(checkpoint), "--out", str(tmp_path / "w.st")]) == 0
    whole = Transformer(checkpoint_config(checkpoint).model).state_dict()
    consolidated = load_file(tmp_path / "w.st")
    assert {k: v.shape for k, v in consolidated.items()} == {k: v.shape for k, v in whole.items()}


@pytest.mark.torchrun
def test_tp_4_with_alibi_an_untied_head_and_loss_chunks_trains_like_one_process(
    tiny_overrides, tmp_path
):
    """Each rank's heads keep their own ALiBi slopes, the untied head is split over the
    vocabulary and the loss is taken in chunks on the split logits (3 a micro-batch of
    4 x 64 tokens, the last one shorter)."""
    extra = ["model.position=alibi", "model.tie_embeddings=false", "parallel.loss_chunk_tokens=112",
             "train.global_batch_size=4", "train.micro_batch_size=4", "train.max_steps=20"]  # fmt: skip
    single_dir, tp4 = tmp_path / "single", tmp_path / "tp4"
    r = run_cli("train", "configs/tiny.yaml", *tp_overrides(tiny_overrides, single_dir, *extra))
    assert r.returncode == 0, r.stderr
    torchrun_train(4, *tp_overrides(tiny_overrides, tp4, *FOUR, *extra, "parallel.tp=4"))
    single, tp = losses_by_step(single_dir), losses_by_step(tp4)
    assert tp.keys() == single.keys() and len(single) == STEPS
    for step, loss in single.items():
        assert tp[step] == pytest.approx(loss, rel=1e-5), step


# ------------------------------------------------------------------ GPUs (NCCL, bf16)
@pytest.mark.gpu
@pytest.mark.torchrun
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
@pytest.mark.parametrize("layout", ["tp2", "hsdp-tp"])
def test_tp_over_nccl_in_bf16_follows_one_fp32_process(tiny_overrides, tmp_path, layout):
    """The same mesh on GPUs: NCCL groups, FSDP's bf16 policy over TP-split parameters; the
    losses follow an fp32 single process within bf16's precision."""
    gpus = 4 if layout == "hsdp-tp" else 2
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs")
    single_dir, run = tmp_path / "single", tmp_path / layout
    r = run_cli("train", "configs/tiny.yaml", *tp_overrides(tiny_overrides, single_dir))
    assert r.returncode == 0, r.stderr
    extra = [*FOUR, *LAYOUTS[layout], "parallel.device=cuda", "parallel.mixed_precision=bf16"]
    r = torchrun_train(gpus, *tp_overrides(tiny_overrides, run, *extra))
    assert "TP 2" in r.stderr
    single, gpu = losses_by_step(single_dir), losses_by_step(run)
    assert gpu.keys() == single.keys()
    for step, loss in single.items():
        assert gpu[step] == pytest.approx(loss, rel=3e-2), step


def test_evaluation_batches_are_padded_to_split_evenly_and_score_the_same():
    """Sequence parallelism splits every sequence over the tp ranks: a task batch of 63
    positions is right-padded to 64 (unscored), and every score is what it was. (By hand on
    4 gloo ranks: tp 2 x dp 2 scored two tasks exactly as FSDP over 4 ranks did.)"""
    from pretrain.evals.evaluator import padded
    from pretrain.model import Transformer
    from pretrain.model.config import ModelConfig

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=64)
    )
    inputs, targets = torch.randint(0, 64, (2, 63)), torch.randint(-1, 64, (2, 63))
    seen = []

    def forward(i, t, planned):
        seen.append(i.shape[1])
        return model(i, t, scores=True, planned_tokens=planned)

    whole = forward(inputs, targets, 0)
    # (Equal up to float rounding: the kernels tile 64 positions unlike 63.)
    torch.testing.assert_close(padded(forward, 4)(inputs, targets, 0), whole)
    assert seen == [63, 64]
