"""One training step of a config, run for one rank of a cluster that is not here.

The real model of the config is built on the meta device and given to the real strategy
(`fully_shard` for fsdp, DeepSpeed's engine for zero; for ddp the plain model with DDP's
gradient buckets added, since DDP's C++ reducer cannot run on fake tensors; activation
checkpointing as configured, compile off) over a *fake* process group of the cluster's
world size: collectives return at once and move nothing. Its tensors are then
made as fake tensors (shapes, dtypes and storages, no memory) and one optimizer step runs
as the trainer runs it (`train_step`): micro-batches of (micro_batch_size, seq_len) tokens,
backward of each, then clip and step. Everything a rank allocates is seen by torch's memory
tracker (`MemTracker`, `FSDPMemTracker`, which also tell gathered parameters and
reduce-scatter buffers apart), and every op by `StepCounter` (FLOPs, bytes, collectives).

Optimizer state is created before the traced step (AdamW makes it at the first step), so
the step traced is a steady one: with weights, gradients and both moments alive. Of a step
of A micro-batches, the first and the last are traced (the last is where DDP and ZeRO
reduce gradients), the ones between are like the first. Rank 0 is traced; the other ranks
differ only by padding of uneven shards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed.tensor._sharding_prop import ShardingPropagator

from pretrain.planner import zero_trace
from pretrain.planner.build import add_ddp_buckets, build_for_plan, make_state, plan_model
from pretrain.planner.counters import OpCounts, StepCounter

LOSS = "Logits/Loss"  # the tracker category we add: output projection + cross-entropy

# The planner's categories, from the trackers' own (by enum name).
CATEGORIES = {
    "params": ("PARAM", "SHARDED_PARAM", "BUFFER"),
    "grads": ("GRAD", "SHARDED_GRAD", "UNSHARDED_GRAD"),
    "optimizer": ("OPT",),
    "activations": ("ACT", "TEMP", "INP"),
    "logits_loss": (LOSS,),
    "comm_buffers": ("UNSHARDED_PARAM", "ALL_GATHER", "REDUCE_SCATTER"),
    "other": ("OTH",),
}


@dataclass
class Trace:
    """What rank 0 of the cluster holds and does in one optimizer step."""

    memory: dict[str, int]  # planner category -> bytes at the step's peak
    model_state: dict[str, int]  # the categories where params + grads + optimizer peak
    high_water: dict[str, int]  # each category's own largest value in the step
    micro: OpCounts  # a micro-batch that does not end the step (the last one if accum = 1)
    last: OpCounts  # the step's last micro-batch (DDP and ZeRO reduce gradients in it)
    optimizer: OpCounts  # clip and optimizer step
    accum: int

    @property
    def peak_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def counts(self) -> OpCounts:
        """The whole step: every micro-batch, and the optimizer."""
        return self.last.combined(self.optimizer, 1).combined(self.micro, self.accum - 1)


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake process group of `world_size` ranks in this process, as rank 0."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("planning needs its own process group; one is already set up")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Propagation:
    """Entered around DTensor's sharding propagation, which runs the op on global-shape
    fake tensors to learn the output's shape: those are not a rank's memory."""

    depth = 0

    def __enter__(self):
        _Propagation.depth += 1

    def __exit__(self, *exc):
        _Propagation.depth -= 1


class _PlanTracking:
    """What the planner adds to torch's trackers: the loss region as its own category,
    DTensor's propagation left out, and only the global peak kept (per-module peaks cost
    a walk over every module at every op)."""

    in_loss = False
    step_makes_grads = False  # set by zero_trace around DeepSpeed's step

    def _plan_init(self) -> None:
        self._ref_class = [*self._ref_class, LOSS]
        self.highs: dict = {}  # each tracker category's own high-water mark

    def _track(self, reftype, t):
        if getattr(reftype, "name", "") in ("ACT", "TEMP"):
            if self.in_loss:
                reftype = LOSS
            elif self.step_makes_grads and not self._in_opt:
                reftype = _MemRefType.GRAD
        super()._track(reftype, t)

    model_state_peak: dict | None = None  # the snapshot where params+grads+optimizer peak
    model_state_peak_bytes = 0

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)
            state = _model_state(snap)
            if state > self.model_state_peak_bytes:
                self.model_state_peak, self.model_state_peak_bytes = dict(snap), state
            for k, v in snap.items():
                if v > self.highs.get(k, 0):
                    self.highs[k] = v

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _Propagation.depth:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def by_category(self, snap: dict | None = None) -> dict[str, int]:
        """Bytes per planner category at the peak (or in `snap`)."""
        if snap is None:
            snap = next(iter(self._peak_mem_snap.values()), {})
        out = _categories(snap)
        out["comm_buffers"] += getattr(self, "ddp_bucket_bytes", 0)
        return out


MODEL_STATE = ("params", "grads", "optimizer")


def _categories(snap: dict) -> dict[str, int]:
    names = {getattr(k, "name", k): v for k, v in snap.items() if k != "Total"}
    return {cat: sum(names.get(n, 0) for n in keys) for cat, keys in CATEGORIES.items()}


def _model_state(snap: dict) -> int:
    by = _categories(snap)
    return sum(by[c] for c in MODEL_STATE)


class PlanMemTracker(_PlanTracking, MemTracker):
    def __init__(self) -> None:
        super().__init__()
        self._plan_init()


class PlanFSDPMemTracker(_PlanTracking, FSDPMemTracker):
    def __init__(self, model, optimizer) -> None:
        super().__init__(model, optimizer)
        self._plan_init()


def mark_loss_region(model: nn.Module, tracker: _PlanTracking) -> list:
    """Hooks that set `tracker.in_loss` from the output projection's first call to the end
    of the model's forward, and in backward until the gradient reaches the final norm."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine wrap the Transformer

    def enter(*_):
        tracker.in_loss = True

    def leave(*_):
        tracker.in_loss = False

    return [
        inner.lm_head.register_forward_pre_hook(enter),
        model.register_forward_hook(leave),
        inner.norm.register_full_backward_pre_hook(leave),
    ]


def train_step(strategy, batches: list[torch.Tensor], cfg, on_micro_batch=None) -> None:
    """One optimizer step as the trainer takes it (forward with the chunked loss, backward
    of loss / accumulation, the last micro-batch reducing gradients, then clip and step)."""
    n = len(batches)
    for i, tokens in enumerate(batches):
        if on_micro_batch is not None:
            on_micro_batch(i)
        loss = strategy.forward(
            tokens[:, :-1], tokens[:, 1:], loss_chunk_tokens=cfg.parallel.loss_chunk_tokens
        )
        strategy.backward(loss / n, last=i == n - 1)
    if on_micro_batch is not None:
        on_micro_batch(n)
    strategy.step(cfg.optim.grad_clip)


def trace_step(cfg, world_size: int) -> Trace:
    """Trace one steady optimizer step of `cfg` on rank 0 of `world_size` ranks (inside
    `fake_world(world_size)`)."""
    strategy, meta, build_optimizer = build_for_plan(cfg, world_size)
    accum = strategy.accum_steps
    zero = cfg.parallel.strategy == "zero"
    saved_lock = ShardingPropagator._fake_mode_lock
    ShardingPropagator._fake_mode_lock = _Propagation()
    try:
        with (
            zero_trace.deepspeed_on_fake_tensors() if zero else contextlib.nullcontext(),
            FakeTensorMode(allow_non_fake_inputs=True),  # FSDP's meta shards become fake
        ):
            tracker = set_up(strategy, meta, build_optimizer)
            parts = traced_step(strategy, tracker, min(accum, 2), world_size)
    finally:
        ShardingPropagator._fake_mode_lock = saved_lock
    if cfg.parallel.strategy == "ddp":
        add_ddp_buckets(strategy.model, world_size, tracker, parts[-2])
    model_state = tracker.by_category(tracker.model_state_peak or {})
    highs = tracker.by_category(tracker.highs)
    return Trace(tracker.by_category(), model_state, highs, parts[0], parts[-2], parts[-1], accum)


def set_up(strategy, meta, build_optimizer) -> _PlanTracking:
    """Model, optimizer and its state on fake tensors; the tracker that will watch them."""
    cfg = strategy.cfg
    if cfg.parallel.strategy == "zero":
        zero_trace.build_zero_for_plan(strategy, build_optimizer)
        zero_trace.make_zero_state(strategy)
        tracker = PlanMemTracker()
        zero_trace.track_zero(tracker, strategy)
        return tracker
    model = plan_model(strategy, meta)
    strategy.model, strategy.optimizer = strategy.wrap(model, build_optimizer(model, cfg.optim))
    if cfg.parallel.strategy == "ddp":
        # DDP's reducer cannot run on fake tensors: the plain model backs it, with its
        # gradient buckets and their all-reduce added after the trace (`add_ddp_buckets`).
        strategy.backward = lambda loss, last=True: loss.backward()
    make_state(strategy)
    if meta is not None:
        return PlanFSDPMemTracker(strategy.model, strategy.optimizer)
    tracker = PlanMemTracker()
    tracker.track_external(strategy.model, strategy.optimizer)
    return tracker


def traced_step(strategy, tracker, micro_batches: int, world_size: int) -> list[OpCounts]:
    """Run the step under the tracker and counter: the counts of each micro-batch, then of
    the optimizer step."""
    cfg, t = strategy.cfg, strategy.cfg.train
    hooks = mark_loss_region(strategy.model, tracker)
    counter = StepCounter(world_size)
    parts: list[OpCounts] = []

    def next_part(i: int) -> None:
        if i:
            parts.append(counter.counts)
            tracker.reset_mod_stats()  # per-module stats are per forward
        counter.counts = OpCounts()

    shape = (t.micro_batch_size, cfg.data.seq_len + 1)
    try:
        with tracker, counter:
            batches = [torch.randint(cfg.model.vocab_size, shape) for _ in range(micro_batches)]
            train_step(strategy, batches, cfg, on_micro_batch=next_part)
            parts.append(counter.counts)  # the optimizer step
    finally:
        for h in hooks:
            h.remove()
    return parts
