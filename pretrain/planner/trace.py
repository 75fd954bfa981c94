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

When the trainer scores eval.tasks between steps, one scoring forward is traced after the
step as `Trainer.evaluate_tasks` runs it (no grad, the model's `scores=True` path), with
what outlives the step still held: its batch is eval.batch_size x max_seq_len tokens, far
more than a training micro-batch can be, and its peak is kept apart from the step's.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import (
    FSDPMemTracker,
    _FSDPRefType,
    _SavedFSDPMethods,
)
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_state import _register_group_forward_hooks
from torch.distributed.tensor._sharding_prop import ShardingPropagator
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.planner import zero_trace
from pretrain.planner.build import add_ddp_buckets, build_for_plan, make_state, plan_model
from pretrain.planner.counters import OpCounts, Propagation, StepCounter
from pretrain.planner.moe import Experts, experts_of, force_balanced

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
    # planner category -> bytes at the peak of an eval forward between steps (None: the
    # trainer scores no tasks)
    eval_memory: dict[str, int] | None = None
    experts: Experts | None = None  # a MoE model's routed experts on this rank (moe.py)

    @property
    def step_peak_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def eval_peak_bytes(self) -> int:
        return sum(self.eval_memory.values()) if self.eval_memory else 0

    @property
    def peak_bytes(self) -> int:
        """What the rank must hold: the training step's peak or the eval forward's."""
        return max(self.step_peak_bytes, self.eval_peak_bytes)

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
    fresh_dtensor_caches()  # a plan before this one, in this process, left its meshes there
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def fresh_dtensor_caches() -> None:
    """Forget DTensor's cached sharding propagation and redistribution plans. Their keys hold
    device meshes, which compare by shape and names, not by process group: after a plan's
    fake world is torn down, the next plan's equal-looking mesh would get the old one's
    entries (and their process groups, gone: "Could not resolve the process group", or a
    sequence-parallel shard gathered over the wrong group)."""
    import torch
    from torch.distributed.tensor import DTensor, _collective_utils, _redistribute

    clear_native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_native is not None:  # the C++ dispatch fast path's own cache
        clear_native()
    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.propagate_op_sharding.cache_clear()
    propagator._propagate_tensor_meta_cached.cache_clear()
    _redistribute.clear_redistribute_planner_cache()
    for fn in (_redistribute._gen_transform_infos, _collective_utils.MeshTopoInfo.build_from_mesh):
        getattr(fn, "cache_clear", lambda: None)()


class _PlanTracking:
    """What the planner adds to torch's trackers: the loss region as its own category,
    DTensor's propagation left out, and only the global peak kept (per-module peaks cost
    a walk over every module at every op)."""

    in_loss = False
    step_makes_grads = False  # set by zero_trace around DeepSpeed's step
    eval_peak_snap: dict | None = None  # the tracker's categories at the eval forward's peak

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
        if Propagation.depth:
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
    """FSDPMemTracker, whose hooks keep FSDP's own behaviour for a group of several modules.

    torch's tracker swaps each FSDP state's forward hooks for its own, registered on every
    module of the state as if each were a group alone. `fully_shard([norm, lm_head])` (the
    untied head's group, parallelize.py) hooks its modules together instead, so that the
    group's pre/post-forward run once per pass, as on real ranks. (Hooked one by one when
    the head was called once per loss chunk, every call ran a whole post-forward: the
    group was gathered once more per micro-batch and its gradient reduced in two pieces.) Here such a group's hooks are wrapped as a group
    (`_register_group_forward_hooks`, as `FSDPState.init` registers them), on entry and again
    when the tracker gives them back."""

    def __init__(self, model, optimizer) -> None:
        super().__init__(model, optimizer)
        self._plan_init()

    def _fsdp_states(self) -> dict:
        """Each FSDP state with parameters -> the first of its modules (the tracker's key)."""
        states: dict = {}
        for module in self._root_mod.modules():
            if isinstance(module, FSDPModule):
                state = module._get_fsdp_state()
                if state._fsdp_param_group is not None:
                    states.setdefault(state, module)
        return states

    @staticmethod
    def _hook(state, module, pre, post) -> None:
        """Register `pre`/`post` as the state's forward hooks, as torch's FSDPState.init does."""
        if len(state._modules) > 1:
            handle = _register_group_forward_hooks(
                state._modules, pre, post, state._modules_to_run_forward, state._cast_output_dtype
            )
            state._pre_forward_hook_handle = state._post_forward_hook_handle = handle
            return
        state._pre_forward_hook_handle = module.register_forward_pre_hook(
            pre, prepend=True, with_kwargs=True
        )
        state._post_forward_hook_handle = module.register_forward_hook(
            post, prepend=False, always_call=True
        )

    def _instrument_fsdp_module(self) -> None:
        for state, module in self._fsdp_states().items():
            state._pre_forward_hook_handle.remove()
            state._post_forward_hook_handle.remove()
            group = state._fsdp_param_group
            self._instrument_fsdp_sharded_params_grads(group)
            self._hook(
                state,
                module,
                self._fsdp_state_pre_forward(module, state._pre_forward),
                self._fsdp_state_post_forward(module, state._post_forward),
            )
            self._fsdp_mod_to_saved_methods[module] = _SavedFSDPMethods(
                group.pre_backward, group.post_backward
            )
            group.pre_backward = self._fsdp_param_group_pre_backward(module, group.pre_backward)
            group.post_backward = self._fsdp_param_group_post_backward(module, group.post_backward)
        for buffer in self._root_mod.buffers():
            self._update_and_maybe_create_winfos(buffer, _FSDPRefType.BUFFER)

    def _deregister_module_and_optimizer_hooks(self) -> None:
        for module, saved in self._fsdp_mod_to_saved_methods.items():
            state = module._get_fsdp_state()
            state._pre_forward_hook_handle.remove()
            state._post_forward_hook_handle.remove()
            self._hook(state, module, state._pre_forward, state._post_forward)
            state._fsdp_param_group.pre_backward = saved.pre_backward
            state._fsdp_param_group.post_backward = saved.post_backward
        self._fsdp_mod_to_saved_methods.clear()
        super()._deregister_module_and_optimizer_hooks()  # the optimizer's hooks


def mark_loss_region(model: nn.Module, tracker: _PlanTracking) -> list:
    """Hooks that set `tracker.in_loss` from the output head's call to the end of the
    model's forward, and in backward from the head's first projection (a loss chunk
    recomputed: `OutputHead.logits`, which the head calls directly, no module hook sees
    it) until the gradient reaches the final norm. Each has a `remove()`."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine wrap the Transformer
    head = inner.lm_head

    def enter(*_):
        tracker.in_loss = True

    def leave(*_):
        tracker.in_loss = False

    project = head.logits

    def logits(h: torch.Tensor) -> torch.Tensor:
        enter()
        return project(h)

    head.logits = logits  # this instance's, until removed
    return [
        head.register_forward_pre_hook(enter),
        model.register_forward_hook(leave),
        inner.norm.register_full_backward_pre_hook(leave),
        _Unpatch(head, "logits"),
    ]


class _Unpatch:
    """Removes an instance attribute set over its class's method."""

    def __init__(self, obj, name: str) -> None:
        self.obj, self.name = obj, name

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


def train_step(strategy, batches: list[torch.Tensor], cfg, on_micro_batch=None) -> None:
    """One optimizer step as the trainer takes it, through the same calls: the strategy's
    `forward_backward` of the micro-batches, then `step`. `on_micro_batch(i)` is called as
    micro-batch i starts, and with len(batches) as the optimizer step starts."""
    mark = on_micro_batch or (lambda _: None)

    def next_batch(i: int) -> torch.Tensor:
        mark(i)
        return batches[i]

    strategy.forward_backward(next_batch, len(batches))
    mark(len(batches))
    strategy.step(cfg.optim.grad_clip)


def eval_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the largest scoring forward the trainer can run: eval.batch_size
    rows padded to max_seq_len (the longest prompt), every position scored, since a task's
    continuation may be as long as max_seq_len (`evals.scoring.encode`)."""
    shape = (cfg.eval.batch_size, cfg.model.max_seq_len)
    return torch.randint(cfg.model.vocab_size, shape), torch.randint(cfg.model.vocab_size, shape)


@torch.no_grad()
def eval_forward(strategy, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One scoring forward as `Trainer.evaluate_tasks` runs it between steps."""
    strategy.model.eval()
    try:
        chunk = strategy.cfg.parallel.loss_chunk_tokens
        return strategy.forward(inputs, targets, loss_chunk_tokens=chunk, scores=True)
    finally:
        strategy.model.train()


class _EveryTargetScored(TorchDispatchMode):
    """Fake tensors hold no values, so a boolean mask's selection has no shape; the model's
    `token_scores` selects the scored rows with `h[targets >= 0]`. Every target of
    `eval_batch` is scored, so a 1-D mask selects every row: it is indexed as such."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index.Tensor:
            source, indices = args[0], list(args[1])
            for i, index in enumerate(indices):
                if index is not None and index.dtype == torch.bool and index.dim() == 1:
                    indices[i] = torch.arange(index.shape[0], device=index.device)
            args = (source, indices, *args[2:])
        return func(*args, **(kwargs or {}))


def trace_eval(strategy, tracker: _PlanTracking) -> None:
    """`eval_forward` on `eval_batch` under the (entered) tracker; its peak goes to
    `tracker.eval_peak_snap`, and the step's peak and high-water marks stay the step's."""
    saved = dict(tracker._peak_mem), dict(tracker._peak_mem_snap), dict(tracker.highs)
    state_peak = tracker.model_state_peak, tracker.model_state_peak_bytes
    tracker._peak_mem.clear()
    tracker._peak_mem_snap.clear()
    try:
        with _EveryTargetScored():
            eval_forward(strategy, *eval_batch(strategy.cfg))
        tracker.eval_peak_snap = next(iter(tracker._peak_mem_snap.values()), {})
    finally:
        tracker._peak_mem, tracker._peak_mem_snap, tracker.highs = saved
        tracker.model_state_peak, tracker.model_state_peak_bytes = state_peak


class _NotSequentialReductions(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "sequential" not in record.getMessage()


@contextlib.contextmanager
def quiet_torch():
    """Two warnings torch gives about a tensor-parallel step, kept out of the plan's output:
    both are about the training step, not the plan, and neither changes what is traced.

    - DTensor's "2 sequential all_reduce operations" (`_redistribute`): clipping reduces the
      gradient norm over the dp_shard and the tp dimensions of the mesh one after the other,
      two calls on a vector of one float per parameter. The trace counts both, at their
      groups' latency, as the ranks will run them (a mesh with those two dimensions
      flattened, as the warning suggests, would make it one call).
    - FSDP2's "returned a view tensor" (the tensor-parallel embedding's output is a view of
      its DTensor's local shard): a warning against an in-place op on that output, which the
      model never makes (`x = x + ...` throughout).
    """
    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    quiet = _NotSequentialReductions()
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
            yield
    finally:
        logger.removeFilter(quiet)


def trace_step(cfg, world_size: int) -> Trace:
    """Trace one steady optimizer step of `cfg` on rank 0 of `world_size` ranks (inside
    `fake_world(world_size)`)."""
    zero = cfg.parallel.strategy == "zero"
    saved_lock = ShardingPropagator._fake_mode_lock
    ShardingPropagator._fake_mode_lock = Propagation()
    try:
        with (
            zero_trace.deepspeed_on_fake_tensors() if zero else contextlib.nullcontext(),
            quiet_torch(),
        ):
            strategy, meta, build_optimizer = build_for_plan(cfg, world_size)
            accum = strategy.accum_steps
            with FakeTensorMode(allow_non_fake_inputs=True):  # FSDP's meta shards become fake
                tracker = set_up(strategy, meta, build_optimizer)
                parts = traced_step(strategy, tracker, min(accum, 2), world_size)
    finally:
        ShardingPropagator._fake_mode_lock = saved_lock
    if cfg.parallel.strategy == "ddp":
        add_ddp_buckets(strategy.model, world_size, tracker, parts[-2])
    model_state = tracker.by_category(tracker.model_state_peak or {})
    highs = tracker.by_category(tracker.highs)
    evals = tracker.eval_peak_snap
    return Trace(
        tracker.by_category(), model_state, highs, parts[0], parts[-2], parts[-1], accum,
        None if evals is None else tracker.by_category(evals), experts_of(strategy),
    )  # fmt: skip


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
    # DDP's reducer cannot run on fake tensors: the plain model backs it, with its gradient
    # buckets and their all-reduce added after the trace (`add_ddp_buckets`).
    strategy.model, strategy.optimizer = strategy.wrap(model, build_optimizer(model, cfg.optim))
    make_state(strategy)
    if meta is not None:
        return PlanFSDPMemTracker(strategy.model, strategy.optimizer)
    tracker = PlanMemTracker()
    tracker.track_external(strategy.model, strategy.optimizer)
    return tracker


def traced_step(strategy, tracker, micro_batches: int, world_size: int) -> list[OpCounts]:
    """Run the step under the tracker and counter: the counts of each micro-batch, then of
    the optimizer step; then, when training scores tasks, an eval forward (`trace_eval`)."""
    cfg, t = strategy.cfg, strategy.cfg.train
    force_balanced(strategy.model, 2 if cfg.parallel.mixed_precision == "bf16" else 4)
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
        with tracker:
            with counter:
                batches = [torch.randint(cfg.model.vocab_size, shape) for _ in range(micro_batches)]
                train_step(strategy, batches, cfg, on_micro_batch=next_part)
                parts.append(counter.counts)  # the optimizer step
            if cfg.eval.in_training:
                trace_eval(strategy, tracker)
    finally:
        for h in hooks:
            h.remove()
    return parts
