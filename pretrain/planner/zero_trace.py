"""The DeepSpeed ZeRO strategy (stages 1, 2, 3) traced as the planner traces the others.

The real `deepspeed.initialize` builds the real engine over the fake process group on fake
tensors. Where DeepSpeed 0.19.8 or torch would read a value or refuse a fake tensor, it is
patched, only while planning (`deepspeed_on_fake_tensors`):

1. `nn.Module.to_empty` (torch/nn/modules/module.py `_apply`) swaps each parameter in place
   with `torch.utils.swap_tensors`, which refuses a fake tensor (its mode holds a weak
   reference to it); ZeRO-3's `build_partitioned` uses it: new parameters are made instead.
2. The engine's `self.module.to(self.device)` (deepspeed/runtime/engine.py:2094) changes
   nothing but still swaps fake parameters: a swap of two alike fake tensors is skipped.
3. `is_invalid_grad_norm` (runtime/utils.py:231; zero/stage_1_and_2.py:3043, :3203,
   zero/stage3.py:2888, bf16_optimizer.py:402) reads the norm: a fake one is valid.
4. ZeRO-3's `assert_ints_same_as_other_ranks` (zero/utils.py:114; partition_parameters.py
   :1593, partitioned_param_coordinator.py:260, stage3.py:1671) compares ranks' values
   with `.item()`; one process has nothing to compare.
5. `clip_tensors_by_global_norm` (runtime/utils.py:974; bf16_optimizer.py:409, bf16 stage
   1) tests `clip_coef < 1`: with a fake norm it scales the gradients without the test.
6. Stage 1/2's `has_overflow` (stage_1_and_2.py:3238, bf16) reads the all-reduced flag
   with `.item()`: replaced on the planning engine by the same ops, reporting no overflow.

Likewise the strategy's own `any_rank`, which reads its all-reduced flag, is replaced on the
planning instance by the same collective, its result unread. The strategy's backward and
step run as they are (neither reads a value); only DeepSpeed's accumulation boundary is set
by hand, since the trace runs 2 of a step's micro-batches (`_backward`). `track_zero` says which of DeepSpeed's flat buffers are weights,
gradients, optimizer state or communication buckets.
"""

from __future__ import annotations

import contextlib
import os
import types

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
from torch.distributed._tools.mem_tracker import _MemRefType

from pretrain.planner.build import fake_tensors, plan_model

_REDUCE = _FSDPRefType.REDUCE_SCATTER  # the planner's comm_buffers (FSDP's categories)
_GATHERED = _FSDPRefType.UNSHARDED_PARAM
# Set while planning, then restored: the engine asserts a launcher set LOCAL_RANK
# (`_do_args_sanity_check`), and the plan runs on DeepSpeed's CPU accelerator whatever the
# machine has. Restored, because `pretrain launch` plans in the process whose environment
# its training ranks inherit: DS_ACCELERATOR=cpu left behind would put them on the CPU.
_ENV = {"LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}


def _to_empty(self: nn.Module, *, device, recurse: bool = True) -> nn.Module:
    return fake_tensors(self, device, recurse)


@contextlib.contextmanager
def deepspeed_on_fake_tensors():
    """Patches 1-5 of the module docstring, all undone on exit, with ZeRO-3's own global
    change of F.linear and the environment (`_ENV`); DeepSpeed's cached process groups are
    released too (they belong to the fake world)."""
    saved_env = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)  # before DeepSpeed is imported: it picks its accelerator then
    try:
        with _patched():
            yield
    finally:
        for k, v in saved_env.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})


@contextlib.contextmanager
def _patched():
    import deepspeed.runtime.bf16_optimizer as bf16
    import deepspeed.runtime.utils as ds_utils
    import deepspeed.runtime.zero.partition_parameters as pp
    import deepspeed.runtime.zero.partitioned_param_coordinator as ppc
    import deepspeed.runtime.zero.stage3 as s3
    import deepspeed.runtime.zero.stage_1_and_2 as s12
    from deepspeed.utils import groups

    swap, invalid = torch.utils.swap_tensors, ds_utils.is_invalid_grad_norm
    clip = ds_utils.clip_tensors_by_global_norm

    def swap_unless_same(t1, t2):
        alike = len({(t.dtype, t.device, t.shape, t.stride()) for t in (t1, t2)}) == 1
        if alike and all(isinstance(t, FakeTensor) for t in (t1, t2)):
            return None
        return swap(t1, t2)

    def bad_norm(norm):
        return False if isinstance(norm, FakeTensor) else invalid(norm)

    def clip_norm(input_tensors, max_norm=1.0, global_norm=None, **kwargs):
        if not isinstance(global_norm, FakeTensor):
            return clip(input_tensors, max_norm, global_norm, **kwargs)
        coef = max_norm / (global_norm + kwargs.get("eps", 1e-6))
        for tensor in input_tensors:
            tensor.detach().mul_(coef)
        return global_norm

    patches = [(nn.Module, "to_empty", _to_empty), (torch.utils, "swap_tensors", swap_unless_same)]
    patches += [(m, "is_invalid_grad_norm", bad_norm) for m in (ds_utils, s12, s3, bf16)]
    patches += [(m, "clip_tensors_by_global_norm", clip_norm) for m in (ds_utils, bf16)]
    patches += [(m, "assert_ints_same_as_other_ranks", lambda ints: None) for m in (pp, ppc, s3)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    saved[0] = (nn.Module, "to_empty", nn.Module.__dict__["to_empty"])
    # ZeRO-3's Init swaps in its memory-efficient F.linear "until manually reset"
    # (partition_parameters.py `_enable_mem_efficient_linear`): reset, so a later plan in
    # this process (a sweep's, a test's) runs torch's own.
    saved.append((torch.nn.functional, "linear", torch.nn.functional.linear))
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        yield
    finally:
        for obj, name, original in saved:
            setattr(obj, name, original)
        groups._release_process_group_references()


def build_zero_for_plan(strategy, optimizer_factory) -> None:
    """The engine of `strategy` (a ZeroStrategy made by `build.build_for_plan`) built as
    `ZeroStrategy.setup` builds it, on fake tensors (inside FakeTensorMode, the fake world
    and `deepspeed_on_fake_tensors`); sets strategy.model and strategy.optimizer."""
    import deepspeed

    from pretrain.parallel.zero import build_partitioned

    cfg = strategy.cfg
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the fake process group
    if cfg.parallel.zero_stage == 3:
        dtype = strategy.mixed_dtype or torch.float32
        model = build_partitioned(cfg, strategy.device, strategy.ds_config(), dtype)
    else:
        model = plan_model(strategy, None)
    strategy.model, strategy.optimizer = strategy.wrap(model, optimizer_factory(model, cfg.optim))
    for name, method in (("any_rank", _any_rank), ("backward", _backward)):
        setattr(strategy, name, types.MethodType(method, strategy))
    zero = strategy.model.optimizer
    if hasattr(zero, "has_overflow_partitioned_grads_serial"):  # patch 6
        zero.has_overflow = types.MethodType(_has_overflow, zero)


def _any_rank(self, flag) -> bool:
    if self.world_size > 1:  # the all-reduce `any_rank` makes, its result not read
        dist.all_reduce(torch.tensor([int(bool(flag))], device=self.device), op=dist.ReduceOp.MAX)
    return bool(flag)


def _backward(self, loss: torch.Tensor, last: bool = True) -> None:
    # The trace runs 2 micro-batches of a step of `accum_steps`; DeepSpeed, counting
    # micro-steps against its gradient_accumulation_steps, would never reach the boundary
    # (stage 1's reduction, every stage's optimizer step) when accum > 2. The boundary is
    # set as the trainer's `last` says instead, DeepSpeed's own manual mode.
    self.model.set_gradient_accumulation_boundary(last)
    type(self).backward(self, loss, last)  # the strategy's own


def _has_overflow(self, partition_gradients=True) -> bool:
    flag = self.has_overflow_partitioned_grads_serial().byte()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dp_process_group)
    return False


def make_zero_state(strategy) -> None:
    """The optimizer state (AdamW's moments, DeepSpeed's gradient buffers) made before the
    traced step, as `build.make_state` does for the others. The engine takes gradients
    from its own backward hooks, not from `p.grad`, so this is one forward, backward and
    step of a one-token batch at a forced accumulation boundary, then the engine's
    micro-step count back at 0 so the traced step's boundaries fall as the trainer's do."""
    engine, cfg = strategy.model, strategy.cfg
    tokens = torch.randint(cfg.model.vocab_size, (cfg.train.micro_batch_size, 2))
    engine.set_gradient_accumulation_boundary(True)
    loss = engine(tokens[:, :1], tokens[:, 1:], loss_chunk_tokens=cfg.parallel.loss_chunk_tokens)
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()
    engine._is_gradient_accumulation_boundary = None  # the micro-step count decides again
    engine.micro_steps = 0


# DeepSpeed's buffers by category, registered before the module and optimizer (whose
# parameters are views of these flats; the tracker counts a storage once, in its last type).
# params: the flat weights the model computes with (bf16 or fp32): stage 1/2's
#   `bit16_groups_flat`, BF16_Optimizer's `bf16_groups_flat`, stage 3's partitions. In fp32
#   stage 3 the master partition is that same tensor (`_device_names_equal_devices`).
# optimizer: the fp32 master partitions, the inner AdamW's parameters: its master weights
#   in bf16, a second copy of this rank's slice in fp32 stage 1/2; AdamW's moments.
# grads: gradients kept across micro-batches: stage 1's `averaged_gradients`, stage 2's
#   `grads_in_partition`, BF16_Optimizer's full-size fp32 `fp32_groups_gradients_flat`,
#   stage 3's `grad_partitions_flat_buffer`.
# comm_buffers: the reduce buckets, and at stage 3 the weights gathered for a module's turn
#   (as FSDP's unsharded parameters).
_BUFFERS = {
    _MemRefType.OPT: "single_partition_of_fp32_groups fp32_groups_flat_partition "
    "fp32_partitioned_groups_flat",
    _MemRefType.PARAM: "bit16_groups_flat bf16_groups_flat fp16_partitioned_groups_flat "
    "lp_param_buffer",
    _MemRefType.GRAD: "averaged_gradients grads_in_partition fp32_groups_gradients_flat "
    "grad_partitions_flat_buffer",
}
# Stage 1/2 make gradient buffers and buckets during backward in these: after each call
# they are registered, else the tracker would count them as temporaries.
_MAKERS = (
    "copy_grads_in_partition reduce_independent_p_g_buckets_and_remove_grads "
    "independent_gradient_partition_epilogue"
)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return [value] if torch.is_tensor(value) and value.numel() else []


def track_zero(tracker, strategy) -> None:
    """Register the engine's buffers, module and inner optimizer with `tracker` (before it
    is entered), each in its category (see `_BUFFERS`), and those made in the traced step
    as they are made."""
    tracker._ref_class = [*tracker._ref_class, _REDUCE, _GATHERED]
    engine, zero = strategy.model, strategy.model.optimizer  # zero: DeepSpeed's, over AdamW

    def register(*_) -> None:
        for reftype, names in _BUFFERS.items():
            for t in (t for name in names.split() for t in _tensors(getattr(zero, name, None))):
                tracker._update_and_maybe_create_winfos(t, reftype)
        for bucket in getattr(zero, "ipg_buckets", {}).values():
            for t in _tensors(bucket.buffer):
                tracker._update_and_maybe_create_winfos(t, _REDUCE)

    def gathered(*_) -> None:  # the tracker's module hooks call them parameters
        for p in (p for p in params if p.numel()):
            tracker._update_and_maybe_create_winfos(p, _GATHERED)

    register()
    tracker.track_external(engine.module, zero.optimizer)
    zero.step = _during(zero.step, tracker)
    for name in (n for n in _MAKERS.split() if hasattr(zero, n)):
        setattr(zero, name, _then(getattr(zero, name), register))
    if hasattr(zero, "parameter_offload"):  # stage 3: after each module's weights arrive
        params = [p for p in engine.module.parameters() if not p.ds_persist]
        coordinator = zero.parameter_offload.get_param_coordinator()
        coordinator.fetch_sub_module = _then(coordinator.fetch_sub_module, gathered)


def _during(step, tracker):
    """DeepSpeed's step around AdamW's: what it makes outside AdamW (the partitions'
    gradients, cast to fp32 for the update) is gradient memory, not temporaries."""

    def wrapper(*args, **kwargs):
        tracker.step_makes_grads = True
        try:
            return step(*args, **kwargs)
        finally:
            tracker.step_makes_grads = False

    return wrapper


def _then(method, after):
    def wrapper(*args, **kwargs):
        out = method(*args, **kwargs)
        after()
        return out

    return wrapper
