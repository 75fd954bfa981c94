"""The interface between the training loop and a way of running it on one or more ranks.

A strategy builds the model where it must live (device, sharding), owns the optimizer
step, reduces metrics across ranks, and writes/reads its part of a checkpoint folder. The
trainer calls only these methods, so adding DDP, FSDP or ZeRO adds a class, not branches.
`Strategy` holds the defaults of one process (`SingleStrategy`); the multi-process
strategies share a process group through `DistributedStrategy` (distributed.py).

Every rank builds the model from the same seed (same initial weights), then reseeds torch
from (seed, rank), so what must differ between ranks (dropout masks) does; each rank's RNG
state is saved in checkpoints, so a resume continues each rank's own stream.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pretrain.checkpoint.legacy import fused_qkv_planner
from pretrain.errors import ConfigError
from pretrain.model import Transformer
from pretrain.model.moe import balance_step
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.parallelize import parallelize
from pretrain.train.optim import build_optimizer


class Strategy(ABC):
    """What the trainer calls, with the defaults of one process on one device.

    A subclass builds the model (`build_model`, the one abstract method) and overrides
    what its way of holding the model changes.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer

    # Whether the strategy keeps the weights in `mixed_dtype` itself (FSDP2's policy,
    # DeepSpeed's bf16 engine): then the forward runs without autocast.
    casts_weights = False
    # Forces the host-side check of a skipped step (see `step`).
    host_sync_skip = False

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        # parallel.mixed_precision as a dtype; None: fp32 throughout.
        self.mixed_dtype = torch.bfloat16 if cfg.parallel.mixed_precision == "bf16" else None

    @functools.cached_property
    def dims(self) -> ParallelDims:
        """The run's parallel degrees (dims.py), made once and handed to what depends on the
        layout (the data, the evaluator): every rank a data-parallel rank of its own,
        unless the strategy splits the model over groups of ranks (fsdp.py)."""
        return ParallelDims(1, self.world_size)

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: each reads its own samples."""
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.rank)

    @property
    def accum_steps(self) -> int:
        """Micro-batches per rank per optimizer step."""
        t = self.cfg.train
        per_step = t.micro_batch_size * self.dp_size
        if t.global_batch_size % per_step:
            ranks = "ranks" if self.dp_size == self.world_size else "data-parallel ranks"
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size x {ranks} ({t.micro_batch_size} x {self.dp_size})"
            )
        return t.global_batch_size // per_step

    # ------------------------------------------------------------ building
    def setup(self) -> None:
        """Build the model (seeded, so every rank and every resume starts alike) and
        optimizer, then reseed torch for this rank (`seed_rank`)."""
        torch.manual_seed(self.cfg.run.seed)
        model = self.build_model()
        self.model, self.optimizer = self.wrap(model, build_optimizer(model, self.cfg.optim))
        seed_rank(self.cfg.run.seed, self.rank)

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """What trains the built model: the model and optimizer themselves, unless a
        strategy hands both to an engine that takes over the step (DeepSpeed)."""
        return model, optimizer

    @property
    def unwrapped(self) -> nn.Module:
        """The plain Transformer under any wrapper."""
        return self.model

    # ------------------------------------------------------------ the step
    def autocast(self):
        if self.mixed_dtype is None or self.casts_weights:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.mixed_dtype)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The model's forward (whatever it takes: tokens, targets, ...) under autocast."""
        with self.autocast():
            return self.model(*args, **kwargs)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a (B, T + 1) micro-batch, taken by the model
        itself (so a sharded wrapper has the output projection whole) from logits of at most
        parallel.loss_chunk_tokens tokens at a time: never B*T*V of them in fp32."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        return self.forward(inputs, targets, loss_chunk_tokens=self.cfg.parallel.loss_chunk_tokens)

    def forward_backward(
        self,
        next_batch: Callable[[int], torch.Tensor],
        micro_batches: int = 1,
        poison: bool = False,
    ) -> torch.Tensor:
        """Forward and backward of a step's `micro_batches` micro-batches; returns their
        mean loss, detached, on the device (nothing waits for it).

        `next_batch(i)` hands over micro-batch i, (B, T + 1) on the device, when its turn
        comes (so it is loaded no earlier; a pipeline schedule, which owns this loop, may
        ask for all of them first). Each loss is divided by `micro_batches` for backward
        (the step's gradient is their mean), and the last backward completes the step's
        gradients. `poison` makes the losses NaN (the tests' fault injection,
        `train.faults`). The trainer, the planner's trace and bench/memory.py all take a
        step as this call and `step`, so what the planner traces is what trains."""
        total = torch.zeros((), device=self.device)
        for i in range(micro_batches):
            loss = self.loss(next_batch(i))
            if poison:
                loss = loss * float("nan")
            self.backward(loss / micro_batches, last=i == micro_batches - 1)
            total += loss.detach()
        return total / micro_batches

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Backward of one micro-batch; `last` says whether the step's gradients are complete
        after it (a strategy may skip gradient communication before then)."""
        loss.backward()

    def step(self, max_norm: float) -> torch.Tensor:
        """Clip gradients to `max_norm` (0: no clipping), take the optimizer step, clear the
        gradients; returns the global gradient norm before clipping, a tensor on the device.

        When that norm is not finite the update is skipped: weights, AdamW moments and step
        count stay as they were (the same on every rank: the norm is global). A fused AdamW
        skips on the device, from a `found_inf` flag as GradScaler hands it, so the host
        need not wait for the norm; other optimizers read it on the host (a sync per step).
        `host_sync_skip = True` on the strategy forces that path (bench/throughput.py's
        comparison with the per-step syncs of earlier versions).
        """
        norm = self.clip_gradients(max_norm)
        fused = self.optimizer.defaults.get("fused")
        if fused and not self.host_sync_skip:
            # Fused AdamW returns early when found_inf is 1 and undoes its step count.
            self.optimizer.found_inf = (~torch.isfinite(norm)).to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif math.isfinite(float(norm)):  # a NaN/inf gradient anywhere: skip the update
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.balance_experts()
        return norm

    # The last step's routing statistics per MoE layer, (L, 4) on the device (None: a
    # dense model): load imbalance, aux loss, z loss, bias range (`moe.balance_step`).
    moe_stats: torch.Tensor | None = None

    def balance_experts(self) -> None:
        """After an optimizer step, a MoE model's routing: the step's token counts summed
        over the data-parallel ranks (one all-reduce, queued), each layer's balance bias
        moved from them (alike on every rank), and `moe_stats` for the trainer to log."""
        model = self.unwrapped
        taken = model.take_moe_step() if isinstance(model, Transformer) else None
        if taken is None:
            self.moe_stats = None
            return

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            return self.reduce(t, over="dp", op="sum")

        self.moe_stats = balance_step(model.moe_layers(), taken, reduce_sum, self.dp_size)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to `max_norm` (0: no clipping); their norm before clipping."""
        limit = max_norm if max_norm > 0 else float("inf")
        return nn.utils.clip_grad_norm_(self.model.parameters(), limit, foreach=True)

    def reduce(self, value: torch.Tensor, over: str = "world", op: str = "mean") -> torch.Tensor:
        """`value` (a tensor on the device) reduced by `op` (mean, sum or max) over the ranks
        `over` names: "world" (every rank) or "dp" (one rank of each data-parallel group:
        what the ranks of a tensor-parallel group hold alike, such as the loss, needs no
        more). A new tensor on the device, queued: nothing waits for it."""
        return value

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (every rank gets the same answer)."""
        return flag

    def barrier(self) -> None:  # one process has nothing to wait for
        return None

    def close(self) -> None:
        """Free what the strategy holds beyond the model (staging buffers, process group)."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def abort(self, why: str) -> None:
        """Leave after an error on this rank (`why`, one line): `close`, without waiting for
        any other rank. One process has no other rank to wait for."""
        self.close()

    def release_model(self) -> None:
        """Drop the model and optimizer (and any wrapper around them) now, in this thread:
        a wrapper may hold the process group (DDP's Reducer, DeepSpeed's engine), and the
        group freed with it after it was destroyed can hang (`DistributedStrategy.close`)."""
        for name in ("model", "optimizer"):
            self.__dict__.pop(name, None)
        gc.collect()  # a wrapper in a reference cycle goes now, not at some later collection

    # ------------------------------------------------------------ checkpoints
    # The process group background checkpoint writes use (None: the default one).
    checkpoint_group = None
    _stager: DefaultStager | None = None

    def checkpoint_state(self) -> dict:
        """What this rank hands to DCP to save: the model's and optimizer's state (of a
        sharded model, this rank's shards)."""
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def save(self, folder: Path) -> Future | None:
        """Write model and optimizer state into `folder` (sharded: each rank its part).

        With `checkpoint.async_save` the state is copied to CPU memory here and written by
        a background thread; the returned Future completes when the files are written. The
        copies go into buffers kept from one save to the next (pinned on CUDA, so the
        device-to-host copy is fast), not new ones each time; the checkpointer waits for the
        previous write before the next save, so a buffer is never overwritten mid-write.
        """
        state = self.checkpoint_state()
        with _quiet_dcp():
            if self.cfg.checkpoint.async_save:
                return dcp.async_save(
                    state,
                    checkpoint_id=folder,
                    process_group=self.checkpoint_group,
                    no_dist=not dist.is_initialized(),
                    async_stager=self.stager(),
                )
            dcp.save(state, checkpoint_id=folder)
        return None

    def stager(self) -> DefaultStager:
        """The staging buffers of background saves, made at the first one."""
        if self._stager is None:
            cuda = self.device.type == "cuda"
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda,
                    use_shared_memory=False,
                    use_async_staging=False,  # the next optimizer step would race the copy
                    use_non_blocking_copy=cuda,
                )
            )
        return self._stager

    def load(self, folder: Path) -> None:
        """Read model and optimizer state from `folder` (written by any number of ranks);
        a checkpoint of the earlier fused q/k/v layout is converted as it is read
        (`fused_qkv_planner`: each rank reads its own rows of the fused tensors)."""
        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=folder, planner=fused_qkv_planner(folder))
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch (CPU and every GPU) with a seed derived from (seed, rank): different on
    every rank, the same on every run."""
    import numpy as np

    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


@contextlib.contextmanager
def _quiet_dcp():
    # In one process DCP warns that it "assumes the intent is to save in a single process".
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def new_transformer(cfg, device: torch.device) -> Transformer:
    """Build on the meta device, then materialise and initialise on `device`.

    No full-size fp32 copy is made on the CPU first; the sharded strategies parallelize
    between the two steps instead (fsdp.py).
    """
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    model.init_weights()
    return parallelize(model, cfg.parallel)  # checkpointing and compile: no mesh
