"""The fsdp strategy's mesh: `parallel.dp_replicate` x `parallel.dp_shard` (pretrain/parallel/
dims.py); the layout checks are one line each. HSDP on 4 real ranks (trains like one
process, resumes bit for bit on its own layout and, through DCP's resharding, on others and
on another number of ranks) is one of the layouts of test_parallel_tp.py's 4-rank test,
which shares their single-process run."""

from __future__ import annotations

import pytest

from pretrain.config.load import load_config
from pretrain.errors import ConfigError
from pretrain.parallel.dims import ParallelDims
from tests.helpers.runs import STRATEGIES, TINY_MODEL, with_overrides
from tests.test_parallel import torchrun_train


class P:  # the two keys of the parallel section that ParallelDims reads
    def __init__(self, dp_replicate: int = 1, dp_shard: int = -1) -> None:
        self.dp_replicate, self.dp_shard = dp_replicate, dp_shard


def test_the_degrees_multiply_to_the_ranks_started():
    assert ParallelDims.resolve(P(), 8) == ParallelDims(1, 8)
    assert ParallelDims.resolve(P(2), 8) == ParallelDims(2, 4)
    hsdp = ParallelDims.resolve(P(2, 4), 8)
    assert (hsdp.shape, hsdp.names) == ((2, 4), ("dp_replicate", "dp_shard"))
    # An elastic job's layout: whole nodes of 4 as shard groups, as many replicas as remain.
    assert ParallelDims.resolve(P(-1, 4), 16) == ParallelDims(4, 4)
    assert ParallelDims.resolve(P(-1, 4), 12) == ParallelDims(3, 4)
    with pytest.raises(ConfigError, match=r"^parallel.dp_replicate=3 does not divide the 8 ranks"):
        ParallelDims.resolve(P(3), 8)
    with pytest.raises(ConfigError, match=r"^parallel.dp_shard=3 does not divide the 8 ranks"):
        ParallelDims.resolve(P(-1, 3), 8)
    with pytest.raises(ConfigError, match=r"are both -1: fix one of them"):
        ParallelDims.resolve(P(-1, -1), 8)
    with pytest.raises(
        ConfigError, match=r"dp_replicate=2 x parallel.dp_shard=2 is 4 ranks, but 8 were started; "
        r"set parallel.dp_shard=4 or -1, or parallel.dp_replicate=4 or -1$",
    ):  # fmt: skip
        ParallelDims.resolve(P(2, 2), 8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.dp_replicate=0"], "parallel.dp_replicate must be >= 1, or -1 for the rest"),
        (["parallel.strategy=fsdp", "parallel.dp_shard=0"], "parallel.dp_shard must be >= 1"),
        (["parallel.strategy=ddp", "parallel.dp_replicate=2"], "parallel.dp_replicate=2 lays"),
        (["parallel.strategy=zero", "parallel.dp_shard=4"], "parallel.dp_shard=4 lays"),
        (["parallel.dp_replicate=-1"], "needs parallel.strategy=fsdp (got single)"),
    ],
)
def test_a_layout_that_cannot_work_is_refused_before_any_rank_starts(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hsdp_shards_inside_a_group_and_replicates_across_groups():
    """On a fake process group of 8 ranks: every parameter is a DTensor on the 2-D mesh
    (dp_replicate 2, dp_shard 4), replicated over the first dimension and sharded over the
    second, so each rank holds a quarter of the model, not an eighth."""
    import torch
    from torch.distributed.tensor import Replicate, Shard

    from pretrain.planner.build import build_for_plan
    from pretrain.planner.trace import fake_world

    cfg = load_config("configs/tiny.yaml", ["parallel.strategy=fsdp", "parallel.dp_replicate=2"])
    with fake_world(8):
        strategy, meta, _ = build_for_plan(cfg, 8)
        params = list(meta.parameters())
        assert strategy.device_mesh().mesh.shape == torch.Size([2, 4])
        for p in params:
            assert p.device_mesh.mesh_dim_names == ("dp_replicate", "dp_shard")
            assert p.placements == (Replicate(), Shard(0))
            assert p.to_local().shape[0] == -(-p.shape[0] // 4)


# ------------------------------------------------------------------ the planner
def test_the_plan_charges_hsdp_gathers_on_the_shard_group_and_gradients_across_replicas():
    """HSDP 2 x 4 traced on a fake 8-rank group: parameters are gathered and gradients
    reduce-scattered over the 4 ranks of a shard group, exactly as FSDP over 4 ranks does;
    the reduced gradient shards (fp32, a quarter of the model) are all-reduced over the 2
    replicas, ranks 4 apart: 2 (2-1)/2 of a quarter of the model's bytes."""
    from pretrain.model import count_params
    from pretrain.planner.trace import fake_world, trace_step

    base = ["parallel.strategy=fsdp", *TINY_MODEL, "train.micro_batch_size=1"]

    def traced(world: int, *extra: str):
        cfg = load_config("configs/tiny.yaml", [*base, f"train.global_batch_size={world}", *extra])
        with fake_world(world):
            return trace_step(cfg, world).counts, cfg

    hsdp, cfg = traced(8, "parallel.dp_replicate=2")
    fsdp, _ = traced(4)
    for kind in ("all_gather", "reduce_scatter"):
        assert hsdp.group_bytes[(kind, 4, 1)] == fsdp.group_bytes[(kind, 4, 1)] > 0, kind
    quarter = 4 * count_params(cfg.model) / 4
    assert hsdp.group_bytes[("all_reduce", 2, 4)] == pytest.approx(quarter, rel=0.01)
    assert {n for _, n, _ in hsdp.group_bytes} <= {2, 4, 8}  # the norm's all-reduce: all 8
    assert sum(hsdp.comm_bytes.values()) == sum(hsdp.group_bytes.values())


def test_a_group_inside_a_node_gets_the_gpu_link_and_replicas_share_the_nics():
    """16 H100s on 2 DGX nodes: a shard group of 8 consecutive ranks stays on NVLink; the
    replica groups (one rank per node, 8 of them side by side) get a NIC each; the whole
    world's ring gets all 8 NICs, as before."""
    from pretrain.hardware import by_name
    from pretrain.planner.estimate import Assumptions, fabric

    h100 = by_name("H100")
    world = fabric(h100, 16, 8, Assumptions())
    shard, replicas = world.over(8, 1), world.over(2, 8)
    assert (shard.nodes, replicas.nodes) == (1, 2)
    assert shard.bytes_s == pytest.approx(0.75 * h100.link_gb_s * 1e9 / 2)
    assert replicas.bytes_s == pytest.approx(0.75 * 400e9 / 8)  # one 400 Gb/s NIC
    assert world.over(16, 1) is world and world.bytes_s == pytest.approx(0.75 * 8 * 50e9)
    assert replicas.latency_s("all_reduce") < world.latency_s("all_reduce")


def test_a_config_too_big_for_hsdp_is_offered_full_sharding():
    """The fit check's fixes: HSDP holds dp_replicate times more of the model per rank than
    sharding over every rank, so "more sharding" includes dropping the replicas."""
    from pretrain.planner.fit import everything, more_sharding

    cfg = load_config("configs/tiny.yaml", ["parallel.strategy=fsdp", "parallel.dp_replicate=4"])
    assert more_sharding(cfg, 16) == [("parallel.dp_replicate=1", "parallel.dp_shard=-1")]
    elastic = load_config("configs/tiny.yaml", ["parallel.strategy=fsdp", "parallel.dp_replicate=-1", "parallel.dp_shard=4"])  # fmt: skip
    assert more_sharding(elastic, 16) == [("parallel.dp_replicate=1", "parallel.dp_shard=-1")]
    assert {"parallel.dp_replicate=1", "parallel.dp_shard=-1"} <= set(everything(cfg, 16))
    fsdp = load_config("configs/tiny.yaml", ["parallel.strategy=fsdp"])
    assert more_sharding(fsdp, 16) == []


def test_the_plan_names_the_layout(capsys):
    from pretrain.planner.cli import main

    args = ["configs/tiny.yaml", "parallel.strategy=fsdp", "parallel.dp_replicate=2", "train.micro_batch_size=2",
            "--nodes", "2", "--gpus-per-node", "4", "--gpu-type", "H100"]  # fmt: skip
    assert main(args) == 0
    assert "fsdp (HSDP: 2 replicas x 4 shards), fp32" in capsys.readouterr().out
    # Shard groups of 3 on nodes of 4 span nodes, which the network model does not price.
    args = [*args[:2], "parallel.dp_replicate=-1", "parallel.dp_shard=3", "train.micro_batch_size=1", "train.global_batch_size=12",
            "--nodes", "3", "--gpus-per-node", "4", "--gpu-type", "H100"]  # fmt: skip
    assert main(args) == 0
    assert "4 replicas x 3 shards; shard groups span nodes" in capsys.readouterr().out


# ------------------------------------------------------------------ embedding and head groups
def _fsdp_groups(*overrides: str) -> dict[str, list[str]]:
    """The parameters each FSDP group of the fsdp strategy's model manages (fake 4 ranks)."""
    from torch.distributed.fsdp import FSDPModule

    from pretrain.planner.build import build_for_plan
    from pretrain.planner.trace import fake_world

    cfg = load_config("configs/tiny.yaml", ["parallel.strategy=fsdp", *overrides])
    with fake_world(4):
        _, meta, _ = build_for_plan(cfg, 4)
    names = {id(p): n for n, p in meta.named_parameters()}
    groups = {}
    for name, module in meta.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            params = group.fsdp_params if group is not None else []
            groups[name or "root"] = sorted(names[id(p.sharded_param)] for p in params)
    return groups


def test_an_untied_embedding_and_head_are_groups_of_their_own():
    """Untied, the embedding and the final norm + output head are FSDP groups of their own
    (the root would hold both gathered for the whole step); tied, the one shared weight
    stays in the root group."""
    untied = _fsdp_groups("model.tie_embeddings=false")
    assert untied["tok_emb"] == ["tok_emb.weight"]
    assert untied["norm"] == untied["lm_head"] == ["lm_head.weight", "norm.weight"]  # one group
    assert untied["root"] == []  # nothing left for the root to hold
    tied = _fsdp_groups()
    assert tied["root"] == ["norm.weight", "tok_emb.weight"] and "tok_emb" not in tied


@pytest.mark.torchrun
def test_an_untied_head_in_its_own_group_trains_like_one_process(tiny_overrides, tmp_path):
    """Untied, on 2 ranks with 2 micro-batches of 3 loss chunks each: the head's group is
    called 3 times a forward and again when each chunk is recomputed in backward, and its
    gradient must still be reduced once a step: losses and gradient norms of one process."""
    from pretrain.train.metrics import read_metrics
    from tests.helpers.runs import run_cli

    untied = ["model.tie_embeddings=false", "parallel.loss_chunk_tokens=96",
              "train.micro_batch_size=4", "train.max_steps=8", "checkpoint.every=8"]  # fmt: skip
    runs = {}
    for name, nproc in (("single", 1), ("fsdp", 2)):
        overrides = with_overrides(tiny_overrides, f"run.dir={tmp_path / name}", *untied)
        if nproc == 1:
            r = run_cli("train", "configs/tiny.yaml", *overrides)
            assert r.returncode == 0, r.stderr
        else:
            torchrun_train(2, *overrides, *STRATEGIES["fsdp"])
        runs[name] = [x for x in read_metrics(tmp_path / name) if "loss" in x]
    assert len(runs["single"]) == len(runs["fsdp"]) == 8
    for one, two in zip(runs["single"], runs["fsdp"], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5), one["step"]
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5), one["step"]
