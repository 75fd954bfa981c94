"""The ranks as a product of parallel degrees, and the one device mesh over them.

`parallel.dp_replicate` x `parallel.dp_shard` x `parallel.tp` must equal the world size
(either dp degree may be -1: what the world size leaves). An elastic job (`--nnodes MIN:MAX`) that may lose nodes sets
dp_shard to the GPUs of a node and dp_replicate to -1, so the shard groups stay whole nodes
whatever the number of nodes left. The tp consecutive ranks of a tensor-parallel group
read the same samples (one data-parallel rank, `dp_rank`); the dp degrees say how the fsdp
strategy holds the model over the data-parallel ranks:

- dp_shard alone (the default, dp_shard = world size): FSDP, every parameter, gradient and
  optimizer state split over all ranks;
- dp_replicate > 1: HSDP, a 2-D mesh (dp_replicate, dp_shard). Each group of dp_shard
  consecutive ranks holds one copy of the model sharded among its members; parameters are
  all-gathered and gradients reduce-scattered inside the group (inside a node when
  dp_shard is at most its GPUs: NVLink), and only the reduced gradient shards are
  all-reduced across the dp_replicate copies (the network).

- tp > 1: tensor + sequence parallelism (parallel/parallelize.py) inside each data-parallel rank,
  the innermost mesh dimension; FSDP then shards over the dp dimensions only.

Consecutive ranks share a node under torchrun and SLURM, so the innermost dimension is the
one whose traffic is heaviest: tp (every layer, forward and backward), then dp_shard.
Checkpoints are DCP: a run saved on one layout resumes on any other (DCP reshards).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pretrain.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int = 1
    # Expert parallelism (expert_parallel.py): ep consecutive data-parallel ranks of a
    # shard group split the experts; borrowed from dp_shard, so it must divide it.
    ep: int = 1

    @classmethod
    def resolve(cls, parallel, world_size: int) -> ParallelDims:
        """The degrees `parallel` (the config section) asks for on `world_size` ranks, -1
        resolved; a layout that does not multiply to the world size is a ConfigError."""
        tp = getattr(parallel, "tp", 1)
        if world_size % tp:
            raise ConfigError(
                f"parallel.tp={tp} does not divide the {world_size} ranks started; use a "
                f"divisor of {world_size}"
            )
        dims = cls._resolve_dp(parallel, world_size // tp, tp)
        ep = getattr(parallel, "ep", 1)
        if dims.dp_shard % ep:
            raise ConfigError(
                f"parallel.ep={ep} does not divide parallel.dp_shard={dims.dp_shard}: expert "
                "parallelism splits each shard group; use an ep that divides it"
            )
        return dataclasses.replace(dims, ep=ep)

    @classmethod
    def _resolve_dp(cls, parallel, world_size: int, tp: int) -> ParallelDims:
        """dp_replicate x dp_shard over the world_size data-parallel ranks (the world / tp)."""
        replicate, shard = parallel.dp_replicate, parallel.dp_shard
        ranks = "ranks started" if tp == 1 else f"data-parallel ranks (world / parallel.tp={tp})"
        if replicate == -1 and shard == -1:
            raise ConfigError(
                "parallel.dp_replicate and parallel.dp_shard are both -1: fix one of them "
                "(for HSDP, dp_shard = the GPUs of a node and dp_replicate = -1)"
            )
        fixed, key = (shard, "dp_shard") if replicate == -1 else (replicate, "dp_replicate")
        if world_size % fixed:
            raise ConfigError(
                f"parallel.{key}={fixed} does not divide the {world_size} {ranks}; "
                f"use a divisor of {world_size}"
            )
        if replicate == -1:
            replicate = world_size // shard
        if shard == -1:
            shard = world_size // replicate
        if replicate * shard != world_size:
            raise ConfigError(
                f"parallel.dp_replicate={replicate} x parallel.dp_shard={shard} is "
                f"{replicate * shard} ranks, but {world_size} "
                f"{'were started' if tp == 1 else f'are data-parallel (world / parallel.tp={tp})'}; set "
                f"parallel.dp_shard={world_size // replicate} or -1"
                + (
                    f", or parallel.dp_replicate={world_size // shard} or -1"
                    if world_size % shard == 0
                    else ""
                )
            )
        return cls(replicate, shard, tp)

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads its own samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.tp

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global `rank` (its tp group's index)."""
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    @property
    def dp_names(self) -> tuple[str, ...]:
        """The mesh dimensions FSDP shards (and HSDP replicates) over."""
        return ("dp_replicate", "dp_shard") if self.hsdp else ("dp_shard",)

    @property
    def names(self) -> tuple[str, ...]:
        return self.dp_names + (("tp",) if self.tp > 1 else ())

    @property
    def shape(self) -> tuple[int, ...]:
        """The mesh's shape, outermost first: (dp_replicate, dp_shard, tp), dimensions of 1
        left out (dp_shard is always there)."""
        sizes = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "tp": self.tp}
        return tuple(sizes[n] for n in self.names)

    def spans_nodes(self, per_node: int) -> bool:
        """Whether some HSDP shard group has ranks on two nodes of `per_node` ranks each (its
        dp_shard x tp consecutive ranks neither divide nor are a multiple of `per_node`)."""
        group = self.dp_shard * self.tp
        return self.hsdp and bool(group % per_node and per_node % group)

    def check_tp_in_node(self, per_node: int, allowed: bool) -> None:
        """A ConfigError when some tensor-parallel group would have ranks on two nodes of
        `per_node` ranks (its every-layer traffic on the network), unless `allowed`
        (parallel.tp_spans_nodes)."""
        if self.tp > 1 and per_node % self.tp and not allowed:
            raise ConfigError(
                f"parallel.tp={self.tp} with {per_node} GPUs per node: tensor-parallel groups "
                f"would span nodes, their every-layer traffic on the network; use a tp that "
                f"divides {per_node}, or set parallel.tp_spans_nodes=true"
            )

    def describe(self) -> str:
        if self.hsdp:
            text = f"HSDP: {self.dp_replicate} replicas x {self.dp_shard} shards"
        else:
            text = f"FSDP: {self.dp_shard} shards"
        text += f" x TP {self.tp}" if self.tp > 1 else ""
        return text + (
            f" (experts over EP {self.ep} x {self.dp_shard // self.ep})" if self.ep > 1 else ""
        )

    def mesh(self, device_type: str):
        """The device mesh of these degrees over the default process group's ranks."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, self.shape, mesh_dim_names=self.names)

    @property
    def expert_names(self) -> tuple[str, ...]:
        """The expert mesh's dimensions: dp_replicate (when HSDP), efsdp (the ranks of a
        shard group that hold the same experts) and ep (the ranks that split them)."""
        return (("dp_replicate",) if self.hsdp else ()) + ("efsdp", "ep")

    def expert_mesh(self, device_type: str):
        """The mesh of the experts' parameters (expert_parallel.py), over the same ranks as
        `mesh`: each dp_shard group split into dp_shard / ep groups of ep consecutive ranks."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = ((self.dp_replicate,) if self.hsdp else ()) + (self.dp_shard // self.ep, self.ep)
        return init_device_mesh(device_type, shape, mesh_dim_names=self.expert_names)
