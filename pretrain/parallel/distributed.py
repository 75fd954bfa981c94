"""What the multi-process strategies (DDP, FSDP, ZeRO) share: one process per device,
started by torchrun and joined into one process group.

The group is joined in the constructor (`device.init_distributed`, where every rank
agrees on the device before a backend is chosen: NCCL on CUDA, gloo on CPU), so rank,
world size and device are known before data or a model is built. Metrics are averaged,
votes taken and barriers held over that group, and the group is destroyed at `close`.
How the model is held (replicated, sharded, inside a DeepSpeed engine), how gradients
travel and how checkpoints are written is each subclass's own.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pretrain.parallel.base import Strategy
from pretrain.parallel.device import choose_device, cuda_usable, init_distributed


def local_device(kind: str) -> torch.device:
    """This process's device of `kind` (cuda: the GPU of its LOCAL_RANK)."""
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class DistributedStrategy(Strategy):
    """A strategy over the process group of the ranks torchrun started (one process
    without torchrun): the base of DDP, FSDP and ZeRO, which differ only in how the
    model, its gradients and its checkpoints are split across the group."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        requested = cfg.parallel.device
        self.rank, self.world_size = init_distributed(cfg.fault.collective_timeout_s, requested)
        if dist.is_initialized():  # the backend is the device all ranks agreed on
            kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
        else:
            kind = choose_device(requested, cuda_usable())
        self.device = local_device(kind)

    def setup(self) -> None:
        super().setup()
        # Background checkpoint writes (DCP async_save) talk on their own group; the
        # config checks refuse async_save for zero, which writes its own checkpoints.
        if self.cfg.checkpoint.async_save:
            self.checkpoint_group = dist.new_group(backend="gloo")

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
        super().close()
        if dist.is_initialized():
            dist.destroy_process_group()
