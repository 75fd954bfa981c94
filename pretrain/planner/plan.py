"""The plan of a config on a cluster: per-rank memory and fit, FLOPs, step time, MFU, and the
smallest change that makes a config fit when it does not."""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain import hardware
from pretrain.errors import ConfigError
from pretrain.model.flops import flops_per_token
from pretrain.planner.estimate import (
    Assumptions,
    StepTime,
    headroom_bytes,
    link_bytes_s,
    rates,
    step_time,
)
from pretrain.planner.trace import Trace, fake_world, trace_step

GIB = 2**30


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    card: hardware.Accelerator

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def of(cls, nodes: int, gpus_per_node: int, gpu_type: str) -> Cluster:
        """ConfigError, naming the value, for an unknown GPU type or an impossible layout."""
        for flag, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a whole number >= 1, got {value!r}")
        if gpus_per_node > 72:  # the largest NVLink domain sold (GB200 NVL72)
            raise ConfigError(
                f"--gpus-per-node {gpus_per_node}: no node has that many GPUs (at most 72)"
            )
        return cls(nodes, gpus_per_node, hardware.lookup(gpu_type, "--gpu-type"))

    def describe(self) -> str:
        return f"{self.nodes} x {self.gpus_per_node} {self.card.name} ({self.world} ranks)"


@dataclass
class Plan:
    cfg: object
    cluster: Cluster
    trace: Trace
    time: StepTime
    assumptions: Assumptions
    analytic_flops_per_step: float  # per rank: 6N + attention (model.flops)
    memory: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.memory = dict(self.trace.memory)

    @property
    def peak_bytes(self) -> int:
        return self.trace.peak_bytes

    @property
    def headroom_bytes(self) -> int:
        return headroom_bytes(self.peak_bytes, self.assumptions)

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.headroom_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.cluster.card.capacity_bytes  # usable, as the driver reports it

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @property
    def flops_per_step(self) -> int:
        """Per rank, traced: every FLOP the step runs, recomputation included."""
        return self.trace.counts.flops

    @property
    def model_flops_per_step(self) -> int:
        """Per rank, traced, without recomputing checkpointed blocks."""
        return self.trace.counts.model_flops

    @property
    def attention_recompute_flops(self) -> float:
        """What torch's counter charges SDPA's backward beyond the analytic count: it
        recomputes QK^T (2 x d_model x seq_len per token and layer; the analytic 12 L d S
        term, like PaLM's, leaves that out)."""
        m, seq = self.cfg.model, self.cfg.data.seq_len
        return 2 * m.n_layers * m.d_model * seq * self.tokens_per_rank

    @property
    def tokens_per_rank(self) -> float:
        return self.tokens_per_step / self.cluster.world

    @property
    def step_time_s(self) -> float:
        return self.time.seconds

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.data.seq_len

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def mfu(self) -> float:
        """Model FLOPs (analytic, no recomputation) per second over the peak, per rank."""
        r = rates(self.cluster.card, self.cfg.parallel.mixed_precision, self.assumptions)
        return self.analytic_flops_per_step / self.step_time_s / r.peak_flops

    @property
    def comm_bytes_per_step(self) -> int:
        return sum(self.trace.counts.comm_bytes.values())


def check_layout(cfg, cluster: Cluster) -> None:
    """One-line ConfigErrors for a config that cannot run on the cluster at all."""
    world, t = cluster.world, cfg.train
    if cfg.parallel.strategy == "single" and world > 1:
        raise ConfigError(
            f"parallel.strategy=single runs one process, but the cluster has {world} ranks: "
            "set parallel.strategy=fsdp (or ddp, zero), or --nodes 1 --gpus-per-node 1"
        )
    dp, ranks = world, "ranks"
    if cfg.parallel.strategy == "fsdp":  # the mesh's own checks, as the ranks would make them
        from pretrain.parallel.dims import ParallelDims

        dims = ParallelDims.resolve(cfg.parallel, world)
        dims.check_tp_in_node(cluster.gpus_per_node, cfg.parallel.tp_spans_nodes)
        dp, ranks = dims.dp, ("ranks" if dims.tp == 1 else "data-parallel ranks")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x {ranks} ({t.micro_batch_size} x {dp}) on {cluster.describe()}"
        )


def plan(cfg, cluster: Cluster, assumptions: Assumptions | None = None) -> Plan:
    """Trace one step of `cfg` for rank 0 of `cluster` and estimate from it."""
    a = assumptions or Assumptions()
    check_layout(cfg, cluster)
    with fake_world(cluster.world):
        trace = trace_step(cfg, cluster.world)
    r = rates(cluster.card, cfg.parallel.mixed_precision, a)
    bandwidth = link_bytes_s(cluster.card, cluster.world, cluster.gpus_per_node, a)
    time = step_time(
        trace.micro, trace.last, trace.optimizer, trace.accum, cfg.model.n_layers, r,
        bandwidth, cluster.world, a, tp=cfg.parallel.tp,
    )  # fmt: skip
    tokens_per_rank = cfg.train.global_batch_size * cfg.data.seq_len / cluster.world
    analytic = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_rank
    return Plan(cfg, cluster, trace, time, a, analytic)
