"""The planner's cluster model: how fast a collective crosses nodes (a node's NICs, a hop's
latency) and how a GPU type is named and sized (SLURM GRES names, usable memory)."""

from __future__ import annotations

import pytest

from launch.fitcheck import card_named, gres_gpu_type
from pretrain import hardware
from pretrain.config.load import load_config
from pretrain.errors import ConfigError
from pretrain.planner import Cluster, plan
from pretrain.planner.cli import parse
from pretrain.planner.estimate import Assumptions, fabric
from pretrain.tools.compute_optimal import peak_flops
from tests.helpers.runs import REPO, TINY_MODEL

GIB = 2**30
H100 = hardware.by_name("H100")


def small(*extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [*TINY_MODEL, "data.seq_len=64", *extra])


# ------------------------------------------------------------------ bandwidth between nodes


def test_a_ring_across_nodes_gets_the_nodes_nics_not_one_gpus_port():
    # DGX H100: 8 x 400 Gb/s = 400 GB/s a node, under NVLink's 450 GB/s a direction; one
    # GPU's port alone (the old model) would be 50 GB/s.
    two_nodes = fabric(H100, 16, 8, Assumptions())
    assert two_nodes.bytes_s == pytest.approx(0.75 * 8 * 400e9 / 8)
    one_node = fabric(H100, 8, 8, Assumptions())
    assert one_node.bytes_s == pytest.approx(0.75 * 900e9 / 2)
    # The in-node link caps it: 8 x 800 Gb/s NICs would outrun NVLink.
    fast_nics = fabric(H100, 16, 8, Assumptions(nic_gbit_s=800))
    assert fast_nics.bytes_s == pytest.approx(one_node.bytes_s)


def test_nics_follow_the_gpus_used_per_node_unless_given():
    # 4 GPUs of each DGX H100: their 4 NICs. DGX-1 (V100): 4 NICs for 8 GPUs.
    assert fabric(H100, 16, 4, Assumptions()).bytes_s == pytest.approx(0.75 * 4 * 50e9)
    v100 = hardware.by_name("V100")
    assert fabric(v100, 16, 8, Assumptions()).bytes_s == pytest.approx(0.75 * 4 * 12.5e9)
    given = fabric(H100, 16, 8, Assumptions(nics_per_node=2, nic_gbit_s=100))
    assert given.bytes_s == pytest.approx(0.75 * 2 * 12.5e9)


def test_a_two_node_plan_times_its_gathers_at_the_node_aggregate():
    """End to end: the traced bytes of an fsdp step on 2 x 8 H100s at 300 GB/s (the nodes'
    8 NICs at 75%), plus NCCL's latency per call: 8.4 us + 14 NVLink hops x 3.4 us + 1
    network hop x 9.6 us for a gather or reduce-scatter on 16 ranks."""
    cfg = small("parallel.strategy=fsdp", "train.micro_batch_size=1", "train.global_batch_size=16")
    p = plan(cfg, Cluster.of(2, 8, "H100"))
    counts = p.trace.counts
    assert set(counts.comm_calls) >= {"all_gather", "reduce_scatter"}
    ring_us = 8.4 + 14 * 3.4 + 9.6
    reduce_us = 8.4 + 28 * 3.4 + 2 * 9.6  # all-reduce: 30 ring steps beat the tree on 2 nodes
    latency = sum(
        calls * (reduce_us if kind == "all_reduce" else ring_us) * 1e-6
        for kind, calls in counts.comm_calls.items()
    )
    assert p.time.comm_s == pytest.approx(sum(counts.comm_bytes.values()) / 300e9 + latency)


# ------------------------------------------------------------------ latency per hop


def test_ring_latency_grows_with_hops_and_all_reduce_takes_the_tree():
    a = Assumptions()

    def gather_us(ranks: int) -> float:
        return fabric(H100, ranks, 8, a).latency_s("all_gather") * 1e6

    # n - 1 steps, one per node boundary across the network: linear in ranks, not log2.
    assert gather_us(8) == pytest.approx(8.4 + 7 * 3.4)
    assert gather_us(512) == pytest.approx(8.4 + 448 * 3.4 + 63 * 9.6)
    assert gather_us(512) / gather_us(64) > 7
    # All-reduce: 2(n-1) ring steps, or a tree's 2 x (7 NVLink + log2(64) network) hops at
    # the tree's hop latencies (28 and 50 us): the ring on 2 nodes, the tree on 64.
    small_ = fabric(H100, 16, 8, a)
    assert small_.latency_s("all_reduce") * 1e6 == pytest.approx(8.4 + 28 * 3.4 + 2 * 9.6)
    big = fabric(H100, 512, 8, a)
    assert big.latency_s("all_reduce") * 1e6 == pytest.approx(2 * (7 * 28 + 6 * 50))
    assert fabric(H100, 1, 1, a).latency_s("all_gather") == 0.0


# ------------------------------------------------------------------ flags and printing


def test_the_plan_names_the_nics_it_assumed():
    line = Assumptions().for_node(H100, 8).lines()[1]
    assert "8 x 400 Gb/s NICs per node (DGX H100's: 8 per 8 GPUs)" in line
    line = Assumptions(nic_gbit_s=200).for_node(H100, 4).lines()[1]
    assert "4 x 200 Gb/s NICs per node (--nic-gbps, the rest DGX H100's" in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--network-gbps", "100"], "--network-gbps .* replaced by --nic-gbps .* --nics-per-node"),
        (["--nic-gbps", "0"], "--nic-gbps must be positive, got 0"),
        (["--nics-per-node", "-1"], "--nics-per-node must be positive"),
    ],
)
def test_network_flags_are_checked(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse(["cfg.yaml", *flags])


def test_network_flags_reach_the_assumptions():
    args = parse(["cfg.yaml", "--nics-per-node", "4", "--nic-gbps", "200"])
    assert args.network == {"nics_per_node": 4, "nic_gbit_s": 200}


# ------------------------------------------------------------------ GPU names and memory

# As SLURM's NVML autodetection writes GRES types: the driver's name, lower-cased, spaces
# as underscores.
GRES_NAMES = {
    "nvidia_h100_80gb_hbm3": "H100-SXM",
    "nvidia_h100_pcie": "H100-PCIE",
    "nvidia_h100_nvl": "H100-NVL",
    "nvidia_h200": "H200-SXM",
    "nvidia_h200_nvl": "H200-NVL",
    "nvidia_gh200_480gb": "GH200",
    "nvidia_a100-sxm4-40gb": "A100-SXM-40GB",
    "nvidia_a100-sxm4-80gb": "A100-SXM-80GB",
    "nvidia_a100-pcie-40gb": "A100-PCIE-40GB",
    "nvidia_a100_80gb_pcie": "A100-PCIE-80GB",
    "nvidia_l40s": "L40S",
    "tesla_v100-sxm2-32gb": "V100",
}


@pytest.mark.parametrize(("gres", "card"), GRES_NAMES.items())
def test_slurm_gres_autodetect_names_resolve(gres, card):
    assert gres_gpu_type([f"gpu:{gres}:8(S:0-1)"]) == gres
    assert card_named(gres, "partition gpu's type").name == card


def test_a100_alone_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"'a100' is ambiguous: A100-SXM-40GB or A100-SXM-80GB "
                       r"or A100-PCIE-40GB or A100-PCIE-80GB.*--gpu-type"):  # fmt: skip
        card_named("a100", "partition gpu's type")
    with pytest.raises(ConfigError, match="ambiguous"):
        peak_flops("A100")
    # A V100 of 16 GB is not the table's 32 GB card.
    with pytest.raises(ConfigError, match="not a GPU type"):
        card_named("tesla_v100-sxm2-16gb", "--gpu-type")


def test_capacity_is_the_usable_memory_not_the_nominal():
    assert H100.capacity_bytes == int(79.11 * GIB) < 80 * GIB
    for card in hardware.ACCELERATORS:  # below the nominal GB, read as GiB
        assert 0.9 * card.memory_gb < card.usable_gib < card.memory_gb, card.name


def test_the_fit_check_uses_the_usable_memory():
    cfg = small("train.micro_batch_size=1", "train.global_batch_size=1")
    assert plan(cfg, Cluster.of(1, 1, "H100")).capacity_bytes == H100.capacity_bytes
