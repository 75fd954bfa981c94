"""The strategy of a config, built for rank 0 of a cluster on fake tensors.

The strategy object is the real class of `parallel.strategy`, made by its constructor in
the fake process group the caller set up. FSDP shards the meta model before any fake
tensor exists (sharding meta tensors is free; sharding fake ones costs a tensor per rank
per parameter), the others get the meta model's tensors made fake. Weights are never read, so none is initialised. ZeRO is built by zero_trace.py.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pretrain.planner.counters import OpCounts


def make_state(strategy) -> None:
    """AdamW's moments, made as the first step makes them (from zero gradients), so the
    traced step holds them from its start."""
    for p in strategy.model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    strategy.step(0.0)


def build_for_plan(cfg, world_size: int):
    """(strategy for rank 0 of `world_size`, the FSDP-sharded meta model or None, the
    optimizer factory); to be called inside the fake process group, outside fake mode.

    The strategy is made by its own constructor, which finds the (fake) process group up
    and takes its rank and size, as a training rank takes torchrun's, with every check the
    constructor makes; only its device is the CPU (parallel.device=cpu), where fake
    tensors live whatever GPUs the machine has. ZeRO's is made inside
    `zero_trace.deepspeed_on_fake_tensors`."""
    from pretrain.parallel import STRATEGIES
    from pretrain.train.optim import build_optimizer

    # parallel.device=cpu: a config for GPUs is planned on a machine without one too.
    on_cpu = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, device="cpu"))
    strategy = STRATEGIES[cfg.parallel.strategy](on_cpu)
    if (strategy.rank, strategy.world_size) != (0, world_size):
        raise RuntimeError(
            f"planning {world_size} ranks, but the strategy found rank {strategy.rank} of "
            f"{strategy.world_size}: build it inside fake_world({world_size})"
        )
    meta = None
    if cfg.parallel.strategy == "fsdp":
        strategy.device_mesh()  # outside the fake mode: the mesh holds real rank lists
        meta = strategy.sharded_meta_model()  # sharding meta tensors costs nothing
    return strategy, meta, build_optimizer


def plan_model(strategy, meta) -> nn.Module:
    """The strategy's model on fake tensors (inside FakeTensorMode); weights are never read,
    so none is initialised."""
    from pretrain.model import Transformer
    from pretrain.parallel.parallelize import parallelize

    if meta is not None:
        return meta.to_empty(device=strategy.device)
    with torch.device("meta"):
        model = Transformer(strategy.cfg.model)
    fake_tensors(model, strategy.device)
    return parallelize(model, strategy.cfg.parallel)


def fake_tensors(model: nn.Module, device: torch.device, recurse: bool = True) -> nn.Module:
    """What `model.to_empty(device=device)` does, inside a FakeTensorMode: meta parameters
    and buffers replaced by fake ones, ties kept (within the call).

    (`Module.to_empty` would swap each tensor in place, which torch refuses for a fake
    tensor that its mode holds a weak reference to.)"""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules() if recurse else [model]:
        for table, wrap in ((module._parameters, True), (module._buffers, False)):
            for name, t in ((n, t) for n, t in table.items() if t is not None):
                if id(t) not in made:
                    new = torch.empty_like(t, device=device)
                    made[id(t)] = nn.Parameter(new, t.requires_grad) if wrap else new
                table[name] = made[id(t)]
    return model


# torch's DDP defaults: gradients are copied into flat buckets of 25 MiB (the first 1 MiB),
# which are allocated at wrapping and live as long as the model (gradient_as_bucket_view
# is off), and each bucket is all-reduced once the step's last backward fills it.
DDP_BUCKET_BYTES = 25 * 2**20


def add_ddp_buckets(model: nn.Module, world_size: int, tracker, last: OpCounts) -> None:
    """DDP's buckets, a copy of every gradient, in the peak and in the last micro-batch's
    traffic (ring all-reduce: 2 (n-1)/n of the bytes)."""
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    tracker.ddp_bucket_bytes = size
    if world_size > 1:  # one all-reduce per bucket
        calls = max(1, -(-size // DDP_BUCKET_BYTES))
        last.add_comm("all_reduce", size, 4, world_size, 1, calls)
