"""Fully sharded data parallel with FSDP2 (`fully_shard`): parameters, gradients and
optimizer state are split across ranks.

The model is built on the meta device, each transformer block is sharded, then the root,
and only then are parameters materialised (each rank allocates its shard) and
initialised, so no rank ever holds the whole model. `Transformer.init_weights` draws
each full tensor in turn and keeps the local slice, so the sharded model starts exactly
like a single-process one. Checkpoints are DCP-sharded (each rank writes its part) and
load onto any number of ranks.

Gradient accumulation reduce-scatters after every micro-batch by default: each rank then
only ever keeps its shard of the (fp32) gradients, accumulated across micro-batches.
Deferring the reduce-scatter to the last micro-batch (`parallel.fsdp_defer_grad_sync`)
communicates less but holds every parameter's unsharded gradient between micro-batches
(+4 bytes per parameter per rank, the size of the whole model): for small models only.

With parallel.tp > 1 the model is first split by tensor (+ sequence) parallelism over each
group of tp consecutive ranks (parallelize.py), then FSDP shards it over the data-parallel
dimensions of the mesh only (dims.py): 2-D parameters.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from pretrain.model import Transformer
from pretrain.model.loss import loss_parallel_backward
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.distributed import DistributedStrategy
from pretrain.parallel.parallelize import parallelize, scale_expert_gradients

log = logging.getLogger("pretrain")


class FSDPStrategy(DistributedStrategy):
    """Each rank holds a shard of every parameter, gradient and optimizer state: for
    models whose training state does not fit on one device. Saves its own shards."""

    casts_weights = True  # FSDP2 casts the parameters to mixed_dtype itself: no autocast

    def mixed_precision_policy(self) -> MixedPrecisionPolicy:
        """bf16 parameters in forward and backward, gradients reduced in fp32; or fp32."""
        if self.mixed_dtype is None:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.mixed_dtype, reduce_dtype=torch.float32)

    _mesh = None

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        dims = self.dims  # a layout that does not fit the ranks started stops every rank now
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        if per_node:
            dims.check_tp_in_node(per_node, cfg.parallel.tp_spans_nodes)

    def setup(self) -> None:
        """Say the layout on rank 0 (and warn of a shard group that spans nodes), then build
        as every strategy does. Said here, not in the constructor: the planner makes
        strategies too, and builds none."""
        dims, per_node = self.dims, int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        if self.rank == 0:
            log.info("fsdp over %d ranks: %s", self.world_size, dims.describe())
            if per_node and dims.spans_nodes(per_node):
                log.warning(
                    "parallel.dp_shard=%d with %d ranks per node: some shard groups span two "
                    "nodes, and their gathers cross the network; a divisor or multiple of %d "
                    "keeps them whole",
                    dims.dp_shard, per_node, per_node,
                )  # fmt: skip
        super().setup()

    @functools.cached_property
    def dims(self) -> ParallelDims:
        """parallel.dp_replicate x dp_shard x tp over this run's ranks (dims.py)."""
        return ParallelDims.resolve(self.cfg.parallel, self.world_size)

    def device_mesh(self):
        """The ranks' mesh on the agreed device (fully_shard's default would pick CUDA
        whenever a GPU is visible, even with parallel.device=cpu): (dp_replicate, dp_shard,
        tp), dimensions of 1 left out but dp_shard. Made once, and outside any fake-tensor
        mode (the planner builds it before tracing a step)."""
        if self._mesh is None:
            self._mesh = self.dims.mesh(self.device.type)
        return self._mesh

    _expert_mesh = None

    def expert_mesh(self):
        """The experts' mesh (dims.expert_mesh) under expert parallelism, made once; None
        without it."""
        if self._expert_mesh is None and self.dims.ep > 1:
            self._expert_mesh = self.dims.expert_mesh(self.device.type)
        return self._expert_mesh

    _dp_group = None

    def process_group(self, over: str):
        """With tensor parallelism, "dp" is the group of this rank's tp position across the
        data-parallel ranks (the mesh's dp dimensions, flattened into one once)."""
        dims = self.dims
        if over == "world" or dims.tp == 1:
            return None
        if self._dp_group is None:
            dp = self.device_mesh()[dims.dp_names]
            self._dp_group = (dp._flatten("dp") if dp.ndim > 1 else dp).get_group()
        return self._dp_group

    def build_model(self) -> nn.Module:
        model = self.sharded_meta_model()
        model.to_empty(device=self.device)
        model.init_weights()
        return model

    def sharded_meta_model(self) -> Transformer:
        """The model on the meta device, laid out over the mesh (tensor parallelism, then
        checkpointing, compile, FSDP: `parallelize`): no memory yet (the planner
        materialises it as fake tensors instead of real ones)."""
        with torch.device("meta"):
            model = Transformer(self.cfg.model)
        p, policy = self.cfg.parallel, self.mixed_precision_policy()
        return parallelize(model, p, self.dims, self.device_mesh(), policy, self.expert_mesh())

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        if self.cfg.parallel.fsdp_defer_grad_sync:  # reduce-scatter once, after the last
            self.model.set_requires_gradient_sync(last)
        with loss_parallel_backward(self.model):
            loss.backward()

    def step(self, max_norm: float) -> torch.Tensor:
        if self.dims.ep > 1:
            scale_expert_gradients(self.model, self.dims.ep)
        return super().step(max_norm)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """The global norm over every gradient, then each clipped by it. Gradients on
        different meshes (the experts' under expert parallelism) cannot be stacked into
        one norm: each mesh's norm is reduced over its own ranks, then they are combined."""
        by_mesh: dict = {}
        for param in self.model.parameters():
            if param.grad is not None:
                mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
                by_mesh.setdefault(mesh, []).append(param)
        norms = []
        for params in by_mesh.values():
            norm = nn.utils.get_total_norm([q.grad for q in params], foreach=True)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        if not norms:
            return torch.zeros((), device=self.device)
        total = torch.stack(norms).norm() if len(norms) > 1 else norms[0]
        limit = max_norm if max_norm > 0 else float("inf")
        for params in by_mesh.values():
            nn.utils.clip_grads_with_norm_(params, limit, total, foreach=True)
        return total
