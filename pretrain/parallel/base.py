"""The interface between the training loop and a way of running it on one or more ranks.

A strategy builds the model where it must live (device, sharding), owns the optimizer
step, reduces metrics across ranks, and writes/reads its part of a checkpoint folder. The
trainer calls only these methods, so adding DDP, FSDP or ZeRO adds a class, not branches.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pretrain.config import ConfigError
from pretrain.model import Transformer
from pretrain.optim import build_optimizer


class Strategy(ABC):
    rank: int = 0
    world_size: int = 1
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.autocast_dtype = torch.bfloat16 if cfg.parallel.mixed_precision == "bf16" else None

    @property
    def accum_steps(self) -> int:
        """Micro-batches per rank per optimizer step."""
        t = self.cfg.train
        per_step = t.micro_batch_size * self.world_size
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size x ranks ({t.micro_batch_size} x {self.world_size})"
            )
        return t.global_batch_size // per_step

    # ------------------------------------------------------------ building
    def setup(self) -> None:
        """Build the model (seeded, so every rank and every resume starts alike) and optimizer."""
        torch.manual_seed(self.cfg.run.seed)
        self.model = self.build_model()
        self.optimizer = build_optimizer(self.model, self.cfg.optim)

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @property
    def unwrapped(self) -> nn.Module:
        """The plain Transformer under any wrapper."""
        return self.model

    # ------------------------------------------------------------ the step
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(tokens)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """Backward of one micro-batch; `last` says whether the step's gradients are complete
        after it (a strategy may skip gradient communication before then)."""
        loss.backward()

    def step(self, max_norm: float) -> torch.Tensor:
        """Clip gradients to `max_norm` (0: no clipping), take the optimizer step, clear the
        gradients; returns the global gradient norm before clipping. When that norm is not
        finite the update is skipped (the same on every rank: the norm is global)."""
        limit = max_norm if max_norm > 0 else float("inf")
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), limit, foreach=True)
        if math.isfinite(float(norm)):  # a NaN/inf gradient anywhere: skip the update
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (every rank gets the same answer)."""
        return flag

    def barrier(self) -> None:  # one process has nothing to wait for
        return None

    def close(self) -> None:  # no process group to leave
        return None

    # ------------------------------------------------------------ checkpoints
    # The process group background checkpoint writes use (None: the default one).
    checkpoint_group = None

    def save(self, folder: Path) -> Future | None:
        """Write model and optimizer state into `folder` (sharded: each rank its part).

        With `checkpoint.async_save` the state is copied to CPU memory here and written by
        a background thread; the returned Future completes when the files are written.
        """
        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        with _quiet_dcp():
            if self.cfg.checkpoint.async_save:
                return dcp.async_save(
                    state,
                    checkpoint_id=folder,
                    process_group=self.checkpoint_group,
                    no_dist=not dist.is_initialized(),
                )
            dcp.save(state, checkpoint_id=folder)
        return None

    def load(self, folder: Path) -> None:
        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=folder)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


@contextlib.contextmanager
def _quiet_dcp():
    # In one process DCP warns that it "assumes the intent is to save in a single process".
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def prepare_blocks(model: Transformer, p) -> None:
    """Activation checkpointing, then torch.compile, applied to each block in place (before
    any sharding; parameter names stay the same, so checkpoints interchange)."""
    apply_activation_checkpointing(
        model, p.activation_checkpointing, p.activation_checkpointing_every
    )
    if p.compile:
        for block in model.layers:
            block.compile()


def apply_activation_checkpointing(model: Transformer, mode: str, every: int) -> None:
    """Recompute the activations of checkpointed blocks in backward instead of storing them.

    `full` wraps every block, `every` each `every`-th one (trading less memory for less
    recomputation). Done before any sharding; DCP state dicts drop the wrapper's name, so
    checkpoints load with or without it.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return
    step = 1 if mode == "full" else every
    for i, block in enumerate(model.layers):
        if i % step == step - 1 or step == 1:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def new_transformer(cfg, device: torch.device) -> Transformer:
    """Build on the meta device, then materialise and initialise on `device`.

    No full-size fp32 copy is made on the CPU first; the sharded strategies reuse this
    with `fully_shard` between the two steps.
    """
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    model.init_weights()
    prepare_blocks(model, cfg.parallel)
    return model
