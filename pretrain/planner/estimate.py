"""From a traced step to what a rank of the cluster needs: memory with headroom, step time,
tokens/s and MFU. Every number that is not traced is an assumption, named here, printed
with the plan, and overridable where a user knows better (`Assumptions`).

Memory: the tracker's peak is tensor memory. A GPU process also holds its CUDA context,
cuBLAS workspaces and NCCL's buffers (together about 1-2 GiB on H100-class cards), and
the caching allocator rounds and fragments (reserved memory runs 5-15% over allocated in
long runs). So the headroom is a fixed `overhead_gib` plus `fragmentation` x the peak, and a
config fits when peak + headroom <= the card's usable memory (`Accelerator.usable_gib`).

Time: compute is the roofline of the traced ops (counters.roofline_seconds). Collectives
are NCCL rings; the trace counts the bytes each rank sends, (n-1)/n of the buffer for an
all-gather or reduce-scatter and twice that for an all-reduce, which is what nccl-tests
call bus bandwidth (busbw): time = bytes / busbw + latency.

* Bandwidth. Inside a node every ring hop is the GPU link (NVLink, Infinity Fabric: the
  table's bidirectional figure halved). Across nodes NCCL lays one ring per channel, and
  gives the channels different NICs (rails): each ring enters and leaves a node once, so
  the node's NICs together carry what one ring hop carries, while each GPU still sends
  its whole share over the in-node link. A ring's busbw across nodes is therefore
  min(in-node link, NICs per node x NIC speed) - not one GPU's port: 8 x 400 Gb/s = 400
  GB/s on a DGX H100, against 450 GB/s of NVLink a direction (a node needs each gathered
  byte once, whatever its GPU count). Both at `link_efficiency`. NICs per node default to
  the card's reference node in pretrain.hardware, scaled to the GPUs per node used.
* Latency, after NCCL's own tuning model (src/graph/tuning.cc, Simple protocol, the one
  its large FSDP/ZeRO/DDP buffers use): a base per call plus one hop latency per ring
  step, in-node hops at `intra_hop_us`, node-to-node hops at `net_hop_us`. An all-gather
  or reduce-scatter on n ranks over N nodes takes n-1 steps, N-1 of them across nodes;
  an all-reduce twice that, or a tree (NCCL picks it where it is faster): 2 x (the
  node's G-1 hops + log2(N) network hops) at the tree's own, larger hop latencies. Latency grows with the hop count, not log2(n).

Collectives overlap the compute of their micro-batch (FSDP prefetches, DDP and ZeRO reduce
in buckets during backward), except for at least one block's share (the first gather, the
last reduction): exposed communication is max(comm - compute, comm / (layers + 1)) per
micro-batch. Tensor parallelism's collectives (on the tp group: consecutive ranks, stride 1)
overlap nothing: each gathers a block's input or reduces its output, which the next op
needs at once (eager DTensor; no asynchronous TP), so they are exposed in full. Nor do
expert parallelism's all-to-alls (the tokens to their experts and back: the next op waits
for them). An all-to-all is no ring: each rank sends its share to every peer at once, at
the GPU link inside a node; across nodes the part bound for other nodes shares the node's
NICs with every GPU of the node (`Fabric.all_to_all_bytes_s`), one hop of latency a call.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

from pretrain.errors import ConfigError
from pretrain.hardware import Accelerator
from pretrain.planner.counters import OpCounts, Rates, roofline_seconds

GIB = 2**30


@dataclass(frozen=True)
class Assumptions:
    matmul_efficiency: float = 0.6  # of the dense tensor peak, for matmuls and attention
    memory_efficiency: float = 0.8  # of the HBM bandwidth, for everything else
    launch_us: float = 4.0  # the least time a kernel takes
    link_efficiency: float = 0.75  # of link and NIC bandwidth a collective achieves (busbw)
    nics_per_node: float | None = None  # None: the card's reference node's, per GPU used
    nic_gbit_s: float | None = None  # None: the card's reference node's
    network: str = ""  # where the two figures above came from (set by `for_node`)
    # NCCL tuning.cc (NVIDIA/nccl 01afd20), ring, Simple protocol: baseLat, hwLat NVLink
    # and NET, in microseconds.
    base_latency_us: float = 8.4
    intra_hop_us: float = 3.4
    net_hop_us: float = 9.6
    # The same table's tree, Simple protocol: no base, a hop is a 256 kB chunk's latency.
    tree_intra_hop_us: float = 28.0
    tree_net_hop_us: float = 50.0
    overhead_gib: float = 1.5  # CUDA context, cuBLAS and NCCL buffers
    fragmentation: float = 0.10  # caching allocator's reserve over allocated

    def for_node(self, card: Accelerator, gpus_per_node: int) -> Assumptions:
        """These assumptions with the network figures filled in: given, or the card's
        reference node's (its NICs per GPU x `gpus_per_node`)."""
        ref = card.network
        nics = self.nics_per_node
        speed = self.nic_gbit_s
        given = [flag for flag, v in (("--nics-per-node", nics), ("--nic-gbps", speed)) if v]
        source = f"{ref.platform}'s: {ref.nics:g} per {ref.gpus} GPUs"
        if given:
            source = " and ".join(given) + (", the rest " + source if len(given) == 1 else "")
        return replace(
            self,
            nics_per_node=nics if nics is not None else ref.nics_for(gpus_per_node),
            nic_gbit_s=speed if speed is not None else ref.nic_gbit_s,
            network=self.network or source,
        )

    def lines(self) -> list[str]:
        if self.nics_per_node is None or self.nic_gbit_s is None:
            nics = "the card's reference node's NICs"
        else:
            nics = f"{self.nics_per_node:g} x {self.nic_gbit_s:g} Gb/s NICs per node"
            nics += f" ({self.network})" if self.network else ""
        return [
            f"matmuls/attention at {self.matmul_efficiency:.0%} of peak, other ops at "
            f"{self.memory_efficiency:.0%} of HBM bandwidth, >= {self.launch_us:g} us a kernel "
            "(eager, compile off)",
            f"collectives are NCCL rings at {self.link_efficiency:.0%} of the in-node link or, "
            f"across nodes, of the lesser of it and {nics}; {self.base_latency_us:g} us a call "
            f"+ {self.intra_hop_us:g} us an in-node hop + {self.net_hop_us:g} us a network hop "
            f"(all-reduce: or a tree at {self.tree_intra_hop_us:g} / {self.tree_net_hop_us:g} us "
            "a hop); overlapped with compute except one block's share (tensor parallelism's: "
            "not at all)",
            f"headroom: {self.overhead_gib:g} GiB (CUDA context, NCCL, cuBLAS) + "
            f"{self.fragmentation:.0%} of the tracked peak (allocator fragmentation)",
        ]


def add_network_flags(p: argparse.ArgumentParser) -> None:
    """`pretrain plan`'s flags for a cluster whose network is not its card's reference node."""
    p.add_argument(
        "--nics-per-node", type=float,
        help="NICs per node carrying GPU traffic between nodes (default: the card's reference "
        "node's per GPU, e.g. 8 for 8 H100s as on a DGX H100)",
    )  # fmt: skip
    p.add_argument("--nic-gbps", type=float, help="one NIC's speed in Gb/s (default: as above)")
    p.add_argument("--network-gbps", type=float, help=argparse.SUPPRESS)  # retired: an error


def network_flags(args: argparse.Namespace) -> dict:
    """The Assumptions fields the network flags set; a one-line ConfigError for a bad one."""
    if args.network_gbps is not None:
        raise ConfigError(
            "--network-gbps (one GPU's port) is replaced by --nic-gbps (one NIC's speed) and "
            "--nics-per-node: a ring across nodes uses all of a node's NICs at once"
        )
    for flag, value in (("--nics-per-node", args.nics_per_node), ("--nic-gbps", args.nic_gbps)):
        if value is not None and not value > 0:
            raise ConfigError(f"{flag} must be positive, got {value}")
    return {"nics_per_node": args.nics_per_node, "nic_gbit_s": args.nic_gbps}


def headroom_bytes(peak: int, a: Assumptions) -> int:
    return int(a.overhead_gib * GIB + a.fragmentation * peak)


def rates(card: Accelerator, precision: str, a: Assumptions) -> Rates:
    peak = card.peak("bf16" if precision == "bf16" else "fp32") or card.tensor16
    return Rates(
        peak, card.memory_tb_s * 1e12, a.matmul_efficiency, a.memory_efficiency, a.launch_us * 1e-6
    )


@dataclass(frozen=True)
class Fabric:
    """What a collective over all `ranks` crosses: its busbw per rank and its ring's hops;
    `over` gives a sub-group's (HSDP's shard groups and replica groups)."""

    ranks: int
    nodes: int
    bytes_s: float  # busbw per rank (module doc)
    a: Assumptions
    in_node_bytes_s: float = 0.0  # a direction of the GPU link, before link_efficiency
    node_net_bytes_s: float = 0.0  # all of a node's NICs together, likewise
    gpus_per_node: int = 0

    def over(self, n: int, stride: int) -> Fabric:
        """The fabric of a group of `n` ranks `stride` apart (ranks placed node by node).
        Inside a node: the GPU link. Across nodes, the group's ring enters each node once,
        while the other groups with ranks on that node run at the same time and share its
        NICs: G / (the group's ranks per node) groups. For the whole world that is one
        group with all the NICs (`fabric`); for HSDP's replicas, one rank per node in each
        of G groups, each gets a G-th of the NICs (a rail each, on a DGX)."""
        g = self.gpus_per_node
        if not g or (n, stride) == (self.ranks, 1):
            return self
        span = stride * (n - 1) + 1
        nodes = 1 if span <= g else (n if stride >= g else -(-span // g))
        per_rank = self.in_node_bytes_s
        if nodes > 1:
            sharing = max(1, g // max(1, n // nodes))
            per_rank = min(per_rank, self.node_net_bytes_s / sharing)
        return replace(self, ranks=n, nodes=nodes, bytes_s=per_rank * self.a.link_efficiency)

    def latency_s(self, kind: str) -> float:
        """One call's latency: NCCL's base plus a hop latency per ring (or tree) step."""
        n, nodes, a = self.ranks, self.nodes, self.a
        if n < 2:
            return 0.0
        if kind == "all_to_all":  # every peer at once: one hop
            return (a.base_latency_us + (a.net_hop_us if nodes > 1 else a.intra_hop_us)) * 1e-6
        twice = 2 if kind == "all_reduce" else 1
        steps, net_steps = twice * (n - 1), twice * (nodes - 1)
        ring = a.base_latency_us + (steps - net_steps) * a.intra_hop_us + net_steps * a.net_hop_us
        if kind == "all_reduce":
            per_node = n // nodes
            hops = (per_node - 1) * a.tree_intra_hop_us + math.log2(nodes) * a.tree_net_hop_us
            ring = min(ring, 2 * hops)
        return ring * 1e-6

    def seconds(self, counts: OpCounts, only=None) -> float:
        """The traced collectives' time: bytes at their group's busbw plus each call's
        latency on that group; only those for which `only(kind, n, stride)` holds if given."""
        total = 0.0
        for (kind, n, stride), calls in counts.group_calls.items():
            if only is not None and not only(kind, n, stride):
                continue
            group = self.over(n, stride)
            sent = counts.group_bytes[(kind, n, stride)]
            if kind == "all_to_all":
                total += self.all_to_all_bytes_s(group, sent) + calls * group.latency_s(kind)
                continue
            total += (sent / group.bytes_s if sent else 0.0) + calls * group.latency_s(kind)
        return total

    def all_to_all_bytes_s(self, group: Fabric, sent: int) -> float:
        """Seconds to send `sent` bytes in all-to-alls over `group`: not a ring, every rank
        sends to every other at once. Inside a node at the GPU link; across nodes, the
        share bound for other nodes leaves through the node's NICs, which every GPU of the
        node uses at once (each its own all-to-all or the same): a G-th of them a rank."""
        if not sent:
            return 0.0
        link = self.in_node_bytes_s * self.a.link_efficiency
        if group.nodes == 1 or not self.gpus_per_node:
            return sent / (link or group.bytes_s)
        n, per_node = group.ranks, group.ranks // group.nodes
        away = sent * (n - per_node) / (n - 1)
        net = self.node_net_bytes_s / self.gpus_per_node * self.a.link_efficiency
        return max((sent - away) / link, away / net)


def fabric(card: Accelerator, world: int, gpus_per_node: int, a: Assumptions) -> Fabric:
    """The links of `world` ranks, `gpus_per_node` to a node (module doc)."""
    a = a.for_node(card, gpus_per_node)
    in_node = card.link_gb_s * 1e9 / 2
    nodes = max(1, -(-world // gpus_per_node))
    node_net = a.nics_per_node * a.nic_gbit_s * 1e9 / 8
    per_rank = in_node if nodes == 1 else min(in_node, node_net)
    return Fabric(world, nodes, per_rank * a.link_efficiency, a, in_node, node_net, gpus_per_node)


# The name plan.py (owned by the planner's maintainers) imports; it passes the result on to
# step_time untouched.
link_bytes_s = fabric


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
    network: Fabric,
    world: int,
    a: Assumptions,
    tp: int = 1,
) -> StepTime:
    """(accum - 1) micro-batches like `micro`, the last like `last`, then the optimizer.
    (`world` and `a` are `network`'s; plan.py passes them too.) With `tp` > 1 the
    collectives of the tensor-parallel group (`tp` consecutive ranks; every data-parallel
    group is `tp` ranks apart) are exposed in full, and so are expert parallelism's
    all-to-alls (the experts wait for the tokens, the next op for their outputs); the
    others overlap compute (module doc)."""

    def serial(kind: str, n: int, stride: int) -> bool:
        return kind == "all_to_all" or (tp > 1 and (n, stride) == (tp, 1))

    total = compute = comm = exposed = 0.0
    for counts, times in ((micro, accum - 1), (last, 1)):
        c = roofline_seconds(counts, r)
        s = network.seconds(counts, serial)
        m = network.seconds(counts) - s
        e = s + max(m - c, m / (n_layers + 1))
        m += s
        total += times * (c + e)
        compute, comm, exposed = compute + times * c, comm + times * m, exposed + times * e
    c = roofline_seconds(optimizer, r)
    m = network.seconds(optimizer)  # clipping's norm: not overlapped
    total += c + m
    return StepTime(total, compute + c, comm + m, exposed + m)
