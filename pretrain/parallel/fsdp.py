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
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pretrain.model import Transformer
from pretrain.parallel.base import prepare_blocks
from pretrain.parallel.ddp import DDPStrategy


class FSDPStrategy(DDPStrategy):
    replicated = False  # each rank saves its own shards

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if self.autocast_dtype is not None:  # FSDP2 casts parameters itself: no autocast
            self.mp_policy = MixedPrecisionPolicy(
                param_dtype=self.autocast_dtype, reduce_dtype=torch.float32
            )
            self.autocast_dtype = None
        else:
            self.mp_policy = MixedPrecisionPolicy()

    def build_model(self) -> nn.Module:
        with torch.device("meta"):
            model = Transformer(self.cfg.model)
        p = self.cfg.parallel
        prepare_blocks(model, p)
        # The mesh on the agreed device (fully_shard's default would pick CUDA whenever a
        # GPU is visible, even with parallel.device=cpu).
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        shard = dict(
            mesh=mesh, mp_policy=self.mp_policy, reshard_after_forward=p.reshard_after_forward
        )
        for block in model.layers:  # one all-gather per block, freed after use
            fully_shard(block, **shard)
        fully_shard(model, **shard)
        model.to_empty(device=self.device)
        model.init_weights()
        return model

    @property
    def unwrapped(self) -> nn.Module:
        return self.model

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        if self.cfg.parallel.fsdp_defer_grad_sync:  # reduce-scatter once, after the last
            self.model.set_requires_gradient_sync(last)
        loss.backward()
