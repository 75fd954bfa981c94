"""Data parallel: every rank holds the whole model; gradients are averaged across ranks.

Started by torchrun (one process per device); NCCL on CUDA, gloo on CPU, as all ranks
agreed (`parallel.device`, see `runtime.init_distributed`). Gradient communication is
skipped for all but the last micro-batch of a step (`no_sync`), so accumulation costs one
all-reduce per step. Checkpoints go through DCP; each rank saves a disjoint share of the
replicated state, so it is copied (async save) and written once, not once per rank.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.parallel.base import Strategy, new_transformer
from pretrain.parallel.device import choose_device, cuda_usable, init_distributed


def local_device(kind: str) -> torch.device:
    """This process's device of `kind` (cuda: the GPU of its LOCAL_RANK)."""
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class DDPStrategy(Strategy):
    replicated = True

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
        if self.cfg.checkpoint.async_save:  # background writes talk on their own group
            self.checkpoint_group = dist.new_group(backend="gloo")

    def build_model(self) -> nn.Module:
        model = new_transformer(self.cfg, self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        t = self.cfg.train
        settle_bucket_order(ddp, (t.micro_batch_size, self.cfg.data.seq_len), self.device)
        return ddp

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
        super().close()
        if dist.is_initialized():
            dist.destroy_process_group()


def settle_bucket_order(
    ddp: DistributedDataParallel, shape: tuple[int, int], device: torch.device
) -> None:
    """One synchronised backward of a zero loss, so DDP lays out its buckets now.

    DDP all-reduces its first backward in buckets laid out by parameter order, then
    rebuilds them in the order gradients became ready. On 3 or more ranks the two layouts
    split the ring all-reduce differently, so the same gradients sum in another order:
    step 1 of every start differs in the last bits, and a resumed run drifts from the
    uninterrupted one (seen on 8 ranks, 2e-9). After this warm-up every start trains with
    the rebuilt layout from its first step. Costs one small forward/backward and one
    gradient all-reduce per start, on a micro-batch's shape (B, T) so a compiled model
    meets the shape it trains on; the zero gradients are dropped.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    tokens = torch.zeros(shape, dtype=torch.long, device=device)  # (B, T)
    ddp(tokens).float().sum().mul(0).backward()
    ddp.zero_grad(set_to_none=True)
