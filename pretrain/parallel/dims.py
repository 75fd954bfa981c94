"""The ranks as a product of parallel degrees, and the one device mesh over them.

`parallel.dp_replicate` x `parallel.dp_shard` must equal the world size (either may be -1:
what the world size leaves). An elastic job (`--nnodes MIN:MAX`) that may lose nodes sets
dp_shard to the GPUs of a node and dp_replicate to -1, so the shard groups stay whole nodes
whatever the number of nodes left. Every rank is a data-parallel rank (it reads its own
samples); the two degrees only say how the fsdp strategy holds the model over them:

- dp_shard alone (the default, dp_shard = world size): FSDP, every parameter, gradient and
  optimizer state split over all ranks;
- dp_replicate > 1: HSDP, a 2-D mesh (dp_replicate, dp_shard). Each group of dp_shard
  consecutive ranks holds one copy of the model sharded among its members; parameters are
  all-gathered and gradients reduce-scattered inside the group (inside a node when
  dp_shard is at most its GPUs: NVLink), and only the reduced gradient shards are
  all-reduced across the dp_replicate copies (the network).

Consecutive ranks share a node under torchrun and SLURM, so the innermost dimension is the
one whose traffic is heaviest (dp_shard now; tensor parallelism, when it comes, inside it).
Checkpoints are DCP: a run saved on one layout resumes on any other (DCP reshards).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int

    @classmethod
    def resolve(cls, parallel, world_size: int) -> ParallelDims:
        """The degrees `parallel` (the config section) asks for on `world_size` ranks, -1
        resolved; a layout that does not multiply to the world size is a ConfigError."""
        replicate, shard = parallel.dp_replicate, parallel.dp_shard
        if replicate == -1 and shard == -1:
            raise ConfigError(
                "parallel.dp_replicate and parallel.dp_shard are both -1: fix one of them "
                "(for HSDP, dp_shard = the GPUs of a node and dp_replicate = -1)"
            )
        fixed, key = (shard, "dp_shard") if replicate == -1 else (replicate, "dp_replicate")
        if world_size % fixed:
            raise ConfigError(
                f"parallel.{key}={fixed} does not divide the {world_size} ranks started; "
                f"use a divisor of {world_size}"
            )
        if replicate == -1:
            replicate = world_size // shard
        if shard == -1:
            shard = world_size // replicate
        if replicate * shard != world_size:
            raise ConfigError(
                f"parallel.dp_replicate={replicate} x parallel.dp_shard={shard} is "
                f"{replicate * shard} ranks, but {world_size} were started; set "
                f"parallel.dp_shard={world_size // replicate} or -1"
                + (
                    f", or parallel.dp_replicate={world_size // shard} or -1"
                    if world_size % shard == 0
                    else ""
                )
            )
        return cls(replicate, shard)

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The mesh's shape, outermost first: (dp_replicate, dp_shard) for HSDP."""
        return (self.dp_replicate, self.dp_shard) if self.hsdp else (self.dp_shard,)

    @property
    def names(self) -> tuple[str, ...]:
        return ("dp_replicate", "dp_shard") if self.hsdp else ("dp_shard",)

    def spans_nodes(self, per_node: int) -> bool:
        """Whether some HSDP shard group has ranks on two nodes of `per_node` ranks each (a
        dp_shard that neither divides nor is a multiple of `per_node`)."""
        return self.hsdp and bool(self.dp_shard % per_node and per_node % self.dp_shard)

    def describe(self) -> str:
        if self.hsdp:
            return f"HSDP: {self.dp_replicate} replicas x {self.dp_shard} shards"
        return f"FSDP: {self.dp_shard} shards"

    def mesh(self, device_type: str):
        """The device mesh of these degrees over the default process group's ranks."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, self.shape, mesh_dim_names=self.names)
