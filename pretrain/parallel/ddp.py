"""Data parallel: every rank holds the whole model; gradients are averaged across ranks.

Started by torchrun (one process per device); NCCL on CUDA, gloo on CPU, as all ranks
agreed (`parallel.device`, see `device.init_distributed`). Gradient communication is
skipped for all but the last micro-batch of a step (`no_sync`), so accumulation costs one
all-reduce per step. Checkpoints go through DCP; each rank saves a disjoint share of the
replicated state (`replica_share`), so it is copied (async save) and written once, not
once per rank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.parallel.base import new_transformer
from pretrain.parallel.distributed import DistributedStrategy


class DDPStrategy(DistributedStrategy):
    """The whole model on every rank inside DistributedDataParallel: the simplest way to
    use several devices, for models whose weights and optimizer state fit on one."""

    def build_model(self) -> nn.Module:
        return self.replicate(new_transformer(self.cfg, self.device))

    def replicate(self, model: nn.Module) -> DistributedDataParallel:
        """The built model inside DDP, its gradient buckets laid out (`settle_bucket_order`)."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        shape = (self.cfg.train.micro_batch_size, self.cfg.data.seq_len)
        with self.autocast():  # the step's own path: chunked loss, training precision
            settle_bucket_order(ddp, shape, self.device, self.cfg.parallel.loss_chunk_tokens)
        if hasattr(model, "take_moe_step"):
            model.take_moe_step()  # that step's routing is no training step's
        return ddp

    @property
    def unwrapped(self) -> nn.Module:
        # The planner's DDP model is the plain one (see `backward`).
        model = self.model
        return model.module if isinstance(model, DistributedDataParallel) else model

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # The planner's DDP model is the plain one (DDP's reducer cannot run on fake
        # tensors; planner/build.py adds its buckets after the trace): nothing to skip.
        skip_sync = not last and isinstance(self.model, DistributedDataParallel)
        with self.model.no_sync() if skip_sync else contextlib.nullcontext():
            loss.backward()

    def checkpoint_state(self) -> dict:
        """This rank's share of the replicated state (`replica_share`), so each tensor is
        copied and written by one rank only."""
        state = super().checkpoint_state()
        if self.world_size > 1:
            state["model"], state["optim"] = replica_share(
                state["model"], state["optim"], self.rank, self.world_size
            )
        return state


def settle_bucket_order(
    ddp: DistributedDataParallel,
    shape: tuple[int, int],
    device: torch.device,
    loss_chunk_tokens: int = 0,
) -> None:
    """One synchronised backward of a zero loss, so DDP lays out its buckets now.

    DDP all-reduces its first backward in buckets laid out by parameter order, then
    rebuilds them in the order gradients became ready. On 3 or more ranks the two layouts
    split the ring all-reduce differently, so the same gradients sum in another order:
    step 1 of every start differs in the last bits, and a resumed run drifts from the
    uninterrupted one (seen on 8 ranks, 2e-9). After this warm-up every start trains with
    the rebuilt layout from its first step. Costs one small forward/backward and one
    gradient all-reduce per start, on a micro-batch's shape (B, T) so a compiled model
    meets the shape it trains on; the zero gradients are dropped. The loss is taken as a
    step takes it (`loss_chunk_tokens` at a time), never as (B, T, vocab) fp32 logits.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    tokens = torch.zeros(shape, dtype=torch.long, device=device)  # (B, T)
    ddp(tokens, tokens, loss_chunk_tokens=loss_chunk_tokens).float().mul(0).backward()
    ddp.zero_grad(set_to_none=True)


def replica_share(msd: dict, osd: dict, rank: int, world: int) -> tuple[dict, dict]:
    """This rank's share of a state every rank holds whole (DDP): each parameter, with its
    optimizer state, goes to one rank, balanced by bytes; every rank computes the same
    split. DCP merges the shares into one checkpoint that loads like any other, on any
    number of ranks; non-tensor entries (param_groups) are kept everywhere (DCP writes
    those once)."""
    state = osd.get("state", {})

    def nbytes(name: str) -> int:
        tensors = [msd[name], *state.get(name, {}).values()]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    load, owner = [0] * world, {}
    for name in sorted(msd, key=lambda n: (-nbytes(n), n)):
        least = min(range(world), key=lambda r: (load[r], r))
        owner[name] = least
        load[least] += nbytes(name)
    model = {n: v for n, v in msd.items() if owner[n] == rank}
    optim = {**osd, "state": {n: v for n, v in state.items() if owner.get(n, 0) == rank}}
    return model, optim
