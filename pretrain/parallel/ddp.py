"""Data parallel: every rank holds the whole model; gradients are averaged across ranks.

Started by torchrun (one process per device); NCCL on CUDA, gloo on CPU. Gradient
communication is skipped for all but the last micro-batch of a step (`no_sync`), so
accumulation costs one all-reduce per step. Checkpoints go through DCP, which writes the
replicated state once.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.parallel.base import Strategy, new_transformer
from pretrain.runtime import init_distributed


class DDPStrategy(Strategy):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.rank, self.world_size = init_distributed(cfg.fault.collective_timeout_s)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = (
            torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        )

    def setup(self) -> None:
        super().setup()
        if self.cfg.checkpoint.async_save:  # background writes talk on their own group
            self.checkpoint_group = dist.new_group(backend="gloo")

    def build_model(self) -> nn.Module:
        model = new_transformer(self.cfg, self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @property
    def unwrapped(self) -> nn.Module:
        return self.model.module

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        with contextlib.nullcontext() if last else self.model.no_sync():
            loss.backward()

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
