"""What the multi-process strategies (DDP, FSDP, ZeRO) share: one process per device,
started by torchrun and joined into one process group.

The group is joined in the constructor (`device.init_distributed`, where every rank
agrees on the device before a backend is chosen: NCCL on CUDA, gloo on CPU), so rank,
world size and device are known before data or a model is built. Metrics are averaged,
votes taken and barriers held over that group, and the group is destroyed at `close`, or
aborted (`abort`) when this rank leaves on an error. How the model is held (replicated, sharded, inside a DeepSpeed engine), how gradients
travel and how checkpoints are written is each subclass's own.
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist

from pretrain.parallel.base import Strategy
from pretrain.parallel.device import choose_device, cuda_usable, init_distributed
from pretrain.train.resilience import announce_failure, bound_teardown

_OPS = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


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
        joined = not dist.is_initialized()
        self.rank, self.world_size = init_distributed(cfg.fault.collective_timeout_s, requested)
        if dist.is_initialized():  # the backend is the device all ranks agreed on
            kind = "cuda" if dist.get_backend() == "nccl" else "cpu"
            if joined:  # ours to end: a process that leaves without `close` aborts it
                atexit.register(self._abort_if_open)
        else:
            kind = choose_device(requested, cuda_usable())
        self.device = local_device(kind)

    def setup(self) -> None:
        super().setup()
        # Background checkpoint writes (DCP async_save) talk on their own group; the
        # config checks refuse async_save for zero, which writes its own checkpoints.
        if self.cfg.checkpoint.async_save:
            # new_group does not inherit the default group's timeout: torch gives it 30 min.
            timeout = datetime.timedelta(seconds=self.cfg.fault.collective_timeout_s)
            self.checkpoint_group = dist.new_group(backend="gloo", timeout=timeout)

    def reduce(self, value: torch.Tensor, over: str = "world", op: str = "mean") -> torch.Tensor:
        if over not in ("world", "dp") or op not in _OPS:
            raise ValueError(f"reduce over {over!r} by {op!r}: over is world or dp, op {_OPS}")
        group = self.process_group(over)
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        if size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=_OPS[op], group=group)
        return value / size if op == "mean" else value

    def process_group(self, over: str):
        """The process group of the ranks `over` names (None: the default group, every
        rank). Every rank of a data-parallel strategy is its own data-parallel rank."""
        return None

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
        """Free the model, then destroy every process group (every rank, at the same point).

        The model goes first: DDP's Reducer (a DeepSpeed engine likewise) holds the group, so
        destroying the group first leaves the Reducer to free the last of it later, in
        `~ProcessGroupGloo`, which waits for gloo's worker threads while holding the GIL:
        a worker that needs the GIL to free a tensor then hangs the process for good (at
        the latest when the interpreter shuts down)."""
        super().close()
        if dist.is_initialized():
            self.release_model()
            dist.destroy_process_group()

    def abort(self, why: str) -> None:
        """Leave after an error on this rank: post the failure notice for the peers (their
        stop is then no preemption, `resilience.Preemption`), free the model, and abort
        every process group. Aborting waits for nothing: destroying would wait for the
        collectives in flight (NCCL: until its timeout), which peers may never join."""
        if not dist.is_initialized():
            return super().abort(why)
        announce_failure(f"rank {self.rank} failed: {why}")
        super().close()
        self.release_model()
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()  # every group: the default one and those made after it

    def _abort_if_open(self) -> None:
        # The process is exiting with the group still up: `close` never ran (an error
        # before training began). Abort while the interpreter can still run the teardown.
        if dist.is_initialized():
            bound_teardown()  # an abort can hang too (NCCL's); nothing else bounds it here
            self.abort("it left before training ended")
