"""Fully sharded data parallel with FSDP2 (`fully_shard`): parameters, gradients and
optimizer state are split across ranks.

The model is built on the meta device, each transformer block is sharded, then the root,
and only then are parameters materialised (each rank allocates its shard) and
initialised, so no rank ever holds the whole model. `Transformer.init_weights` draws
each full tensor in turn and keeps the local slice, so the sharded model starts exactly
like a single-process one. Checkpoints are DCP-sharded (each rank writes its part) and
load onto any number of ranks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from pretrain.model import Transformer
from pretrain.parallel.base import prepare_blocks
from pretrain.parallel.ddp import DDPStrategy


class FSDPStrategy(DDPStrategy):
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
        reshard = p.reshard_after_forward
        for block in model.layers:  # one all-gather per block, freed after use
            fully_shard(block, mp_policy=self.mp_policy, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=self.mp_policy, reshard_after_forward=reshard)
        model.to_empty(device=self.device)
        model.init_weights()
        return model

    @property
    def unwrapped(self) -> nn.Module:
        return self.model

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # Reduce-scatter gradients once per step, after the last micro-batch.
        self.model.set_requires_gradient_sync(last)
        loss.backward()
