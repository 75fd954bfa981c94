"""From a traced step to what a rank of the cluster needs: memory with headroom, step time,
tokens/s and MFU. Every number that is not traced is an assumption, named here, printed
with the plan, and overridable where a user knows better (`Assumptions`).

Memory: the tracker's peak is tensor memory. A GPU process also holds its CUDA context,
cuBLAS workspaces and NCCL's buffers (together about 1-2 GiB on H100-class cards), and
the caching allocator rounds and fragments (reserved memory runs 5-15% over allocated in
long runs). So the headroom is a fixed `overhead_gib` plus `fragmentation` x the peak, and a
config fits when peak + headroom <= the card's memory.

Time: compute is the roofline of the traced ops (counters.roofline_seconds). A collective
sends its bytes at the slower link it crosses: NVLink/Infinity Fabric inside a node (the
table's bidirectional figure halved), the per-GPU network port across nodes
(`network_gbit_s`, 400 Gb/s InfiniBand/RoCE per GPU as on DGX H100 nodes), at
`link_efficiency` of either, plus a latency per call. Collectives overlap the compute of
their micro-batch (FSDP prefetches, DDP and ZeRO reduce in buckets during backward), except
for at least one block's share (the first gather, the last reduction): exposed
communication is max(comm - compute, comm / (layers + 1)) per micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.hardware import Accelerator
from pretrain.planner.counters import OpCounts, Rates, roofline_seconds

GIB = 2**30


@dataclass(frozen=True)
class Assumptions:
    matmul_efficiency: float = 0.6  # of the dense tensor peak, for matmuls and attention
    memory_efficiency: float = 0.8  # of the HBM bandwidth, for everything else
    launch_us: float = 4.0  # the least time a kernel takes
    link_efficiency: float = 0.75  # of link bandwidth a collective achieves (NCCL busbw)
    network_gbit_s: float = 400.0  # per GPU, between nodes
    collective_latency_us: float = 15.0  # per collective call, per log2(ranks)
    overhead_gib: float = 1.5  # CUDA context, cuBLAS and NCCL buffers
    fragmentation: float = 0.10  # caching allocator's reserve over allocated

    def lines(self) -> list[str]:
        return [
            f"matmuls/attention at {self.matmul_efficiency:.0%} of peak, other ops at "
            f"{self.memory_efficiency:.0%} of HBM bandwidth, >= {self.launch_us:g} us a kernel "
            "(eager, compile off)",
            f"collectives at {self.link_efficiency:.0%} of the link: in-node link, or "
            f"{self.network_gbit_s:g} Gb/s per GPU across nodes; "
            f"{self.collective_latency_us:g} us x log2(ranks) a call; overlapped with "
            "compute except one block's share",
            f"headroom: {self.overhead_gib:g} GiB (CUDA context, NCCL, cuBLAS) + "
            f"{self.fragmentation:.0%} of the tracked peak (allocator fragmentation)",
        ]


def headroom_bytes(peak: int, a: Assumptions) -> int:
    return int(a.overhead_gib * GIB + a.fragmentation * peak)


def rates(card: Accelerator, precision: str, a: Assumptions) -> Rates:
    peak = card.peak("bf16" if precision == "bf16" else "fp32") or card.tensor16
    return Rates(
        peak, card.memory_tb_s * 1e12, a.matmul_efficiency, a.memory_efficiency, a.launch_us * 1e-6
    )


def link_bytes_s(card: Accelerator, world: int, gpus_per_node: int, a: Assumptions) -> float:
    """What a ring collective over `world` ranks gets per rank: the in-node link when the
    ranks share a node, the network port when they span nodes."""
    if world <= gpus_per_node:
        per_direction = card.link_gb_s * 1e9 / 2
    else:
        per_direction = min(card.link_gb_s * 1e9 / 2, a.network_gbit_s * 1e9 / 8)
    return per_direction * a.link_efficiency


def comm_seconds(counts: OpCounts, world: int, bandwidth: float, a: Assumptions) -> float:
    calls = sum(counts.comm_calls.values())
    latency = a.collective_latency_us * 1e-6 * max(1.0, math.log2(max(world, 2)))
    return sum(counts.comm_bytes.values()) / bandwidth + calls * latency


@dataclass(frozen=True)
class StepTime:
    seconds: float
    compute_s: float
    comm_s: float
    exposed_comm_s: float


def step_time(
    micro: OpCounts,
    last: OpCounts,
    optimizer: OpCounts,
    accum: int,
    n_layers: int,
    r: Rates,
    bandwidth: float,
    world: int,
    a: Assumptions,
) -> StepTime:
    """(accum - 1) micro-batches like `micro`, the last like `last`, then the optimizer."""
    total = compute = comm = exposed = 0.0
    for counts, times in ((micro, accum - 1), (last, 1)):
        c = roofline_seconds(counts, r)
        m = comm_seconds(counts, world, bandwidth, a)
        e = max(m - c, m / (n_layers + 1))
        total += times * (c + e)
        compute, comm, exposed = compute + times * c, comm + times * m, exposed + times * e
    c = roofline_seconds(optimizer, r)
    m = comm_seconds(optimizer, world, bandwidth, a)  # clipping's norm: not overlapped
    total += c + m
    return StepTime(total, compute + c, comm + m, exposed + m)
