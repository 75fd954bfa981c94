"""What one traced training step does, op by op: FLOPs, bytes and collectives.

`StepCounter` is a dispatch mode that sees every local op of the step (under DTensor, the
per-rank op on the shard, as a rank runs it) and keeps, per op: its FLOPs, by torch's own
formulas (`torch.utils.flop_counter`, plus the CPU flash-attention kernel, which that
registry lacks, by the same SDPA formulas), the bytes it reads and writes, and, for the
collectives, the bytes each rank puts on the wire. Ops run while a checkpointed block is
recomputed in backward (grad mode on inside the backward pass) are counted apart, so the
step's model FLOPs can be told from its hardware FLOPs.

The time of a step is then a roofline over the same ops (`roofline_seconds`): each op
takes the longer of its FLOPs at the achievable tensor rate and its bytes at the
achievable memory rate, or a kernel launch if longer. Eager execution (compile off) runs one
kernel per op, which is what is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def grouped_mm_flop(mat_a, mat_b, *args, out_val=None, **kwargs) -> int:
    """FLOPs of `torch._grouped_mm(mat_a, mat_b, offs)`: 2 x M x K x N over the groups,
    whichever dimension the offsets split (they cover it whole, as MoE's cumulative counts
    do). Forward (M, K) x (G, K, N) -> (M, N); backward's input gradient the same shape;
    its weight gradient (K, M) x (M, N) -> (G, K, N), the groups splitting M."""
    a, b = mat_a.shape, mat_b.shape
    if len(a) == 2 and len(b) == 3:  # rows split into groups, one (K, N) weight each
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 3 and len(b) == 2:  # (G, M, K) x (K, N split into groups)
        return 2 * a[1] * a[2] * b[1]
    if len(a) == 2 and len(b) == 2:  # (M, K split) x (K split, N) -> (G, M, N)
        return 2 * a[0] * a[1] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]  # batched: (G, M, K) x (G, K, N)


# torch's registry knows the CUDA SDPA kernels; the CPU one (what runs here, and what a
# fake CPU trace dispatches to) gets the same formula. It has no grouped matmul (MoE's
# experts): 2 x M x K x N over the groups.
FLOP_FORMULAS = {
    **flop_registry,
    aten._grouped_mm: grouped_mm_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}

# Bytes a rank sends per byte of the collective's buffer, ring algorithms on n ranks:
# all-gather and reduce-scatter move (n-1)/n of the full buffer, all-reduce twice that.
_c10d = torch.ops.c10d
_functional = torch.ops._c10d_functional
COLLECTIVES = {
    _c10d._allgather_base_.default: ("all_gather", 0, 2),  # (kind, output arg, factor x 1/2)
    _c10d.allgather_.default: ("all_gather", 0, 2),
    _c10d._reduce_scatter_base_.default: ("reduce_scatter", 1, 2),
    _c10d.reduce_scatter_.default: ("reduce_scatter", 1, 2),
    _c10d.allreduce_.default: ("all_reduce", 0, 4),
    _c10d.broadcast_.default: ("broadcast", 0, 2),
    _c10d.reduce_.default: ("reduce", 0, 2),
    _functional.all_gather_into_tensor.default: ("all_gather", -1, 2),
    _functional.reduce_scatter_tensor.default: ("reduce_scatter", 0, 2),
    _functional.all_reduce.default: ("all_reduce", 0, 4),
}


# All-to-alls (expert parallelism's token exchange, uneven splits): (input arg, input split
# sizes arg); this rank sends its input but for its own split.
ALL_TO_ALLS = {
    _functional.all_to_all_single.default: (0, 2),
    _c10d.alltoall_base_.default: (1, 3),
}


def _nbytes(tensors) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


@dataclass
class OpCounts:
    """Sums over a traced step (all per rank)."""

    flops: int = 0  # every op with a FLOP formula
    recompute_flops: int = 0  # of those, recomputing checkpointed blocks in backward
    ops: int = 0  # kernels launched (ops with tensor outputs)
    # (flops, bytes) of every compute op, for the roofline
    op_costs: list[tuple[int, int]] = field(default_factory=list)
    comm_bytes: Counter = field(default_factory=Counter)  # kind -> bytes sent by this rank
    comm_calls: Counter = field(default_factory=Counter)
    # The same per group: (kind, group size, stride between its ranks) -> bytes, calls. A
    # group of consecutive ranks (stride 1) stays inside a node while it fits in one; HSDP's
    # replicas are dp_shard ranks apart (estimate.Fabric.over).
    group_bytes: Counter = field(default_factory=Counter)
    group_calls: Counter = field(default_factory=Counter)

    @property
    def model_flops(self) -> int:
        return self.flops - self.recompute_flops

    def combined(self, other: OpCounts, times: int) -> OpCounts:
        """These counts plus `times` x `other`'s (micro-batches not traced one by one): the
        totals only; per-op costs stay with each traced part (estimate.step_time times
        them), not copied `times` over (a 70B step of 64 micro-batches: ~750k entries)."""
        return OpCounts(
            self.flops + times * other.flops,
            self.recompute_flops + times * other.recompute_flops,
            self.ops + times * other.ops,
            [],
            *(
                getattr(self, name)
                + Counter({k: v * times for k, v in getattr(other, name).items()})
                for name in ("comm_bytes", "comm_calls", "group_bytes", "group_calls")
            ),
        )

    def add_comm(
        self, kind: str, buffer_bytes: int, half_factor: int, n: int, stride: int, calls: int = 1
    ) -> None:
        """`calls` collectives of `kind`, `buffer_bytes` in all, over a group of `n` ranks
        `stride` apart: this rank sends half_factor / 2 x (n-1)/n of the buffer (ring busbw,
        estimate.py's doc: 1 x for an all-gather or reduce-scatter, 2 x for an all-reduce)."""
        sent = buffer_bytes * half_factor * (n - 1) // (2 * n) if n > 1 else 0
        self.add_sent(kind, sent, n, stride, calls)

    def add_sent(self, kind: str, sent: int, n: int, stride: int, calls: int = 1) -> None:
        """`calls` collectives of `kind` in which this rank sends `sent` bytes in all."""
        for counter, key in ((self.comm_bytes, kind), (self.group_bytes, (kind, n, stride))):
            counter[key] += sent
        for counter, key in ((self.comm_calls, kind), (self.group_calls, (kind, n, stride))):
            counter[key] += calls


def group_of(args, kwargs, world: int) -> tuple[int, int]:
    """(size, stride) of the process group a c10d op runs on: its ProcessGroup argument, or
    the functional ops' group name; the whole world if neither is found."""
    ranks = group_ranks(args, kwargs)
    if ranks is None:
        return world, 1
    return len(ranks), (ranks[1] - ranks[0]) if len(ranks) > 1 else 1


def all_to_all_sent(func, args, kwargs) -> int:
    """Bytes this rank sends in an all-to-all: its input but its own split (the group
    rank of this process; an even split when the sizes are not given)."""
    import torch.distributed as dist

    index, splits_at = ALL_TO_ALLS[func]
    data = args[index]
    total = data.numel() * data.element_size()
    ranks = group_ranks(args, kwargs) or list(range(dist.get_world_size()))
    me = ranks.index(dist.get_rank()) if dist.get_rank() in ranks else 0
    splits = args[splits_at] if len(args) > splits_at else None
    if not splits:
        return total * (len(ranks) - 1) // len(ranks)
    rows = sum(splits)
    return total * (rows - splits[me]) // rows if rows else 0


def group_ranks(args, kwargs) -> list[int] | None:
    """The global ranks of the process group a c10d op runs on (None: none found)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in (*args, *kwargs.values()):
        group = None
        if isinstance(a, dist.ProcessGroup):
            group = a
        elif isinstance(a, torch.ScriptObject):  # how the c10d ops receive their group
            try:
                group = dist.ProcessGroup.unbox(a)
            except RuntimeError:  # another kind of object (a ReduceOp, say)
                continue
        elif isinstance(a, str):
            try:
                group = _resolve_process_group(a)
            except (RuntimeError, ValueError, KeyError):
                continue
        if group is not None:
            return dist.get_process_group_ranks(group)
    return None


class Propagation:
    """Entered around DTensor's sharding propagation (trace.py puts it in place of
    `ShardingPropagator._fake_mode_lock`), which runs an op once on global-shape fake tensors
    to learn its output's shape: no rank runs that op, so neither its memory (the trackers)
    nor its FLOPs and bytes (`StepCounter`) are a rank's. It runs the first time an op meets
    a sharding, so counting it would charge the traced first micro-batch, and with it every
    untraced one, the global op's FLOPs (a tensor-parallel 8B plan: +8% FLOPs)."""

    depth = 0

    def __enter__(self):
        Propagation.depth += 1

    def __exit__(self, *exc):
        Propagation.depth -= 1


class StepCounter(TorchDispatchMode):
    """Counts FLOPs, bytes and collective traffic of the ops run under it (see module doc)."""

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world = world_size
        self.counts = OpCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar to the local ops counted below
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if Propagation.depth:  # DTensor learning a global shape: not run by any rank
            return out
        packet = func._overloadpacket
        c = self.counts
        if func in COLLECTIVES:
            kind, index, half_factor = COLLECTIVES[func]
            buffer = out if index < 0 else args[index]
            n, stride = group_of(args, kwargs, self.world)
            c.add_comm(kind, _nbytes(tree_flatten(buffer)[0]), half_factor, n, stride)
            return out
        if func in ALL_TO_ALLS:
            n, stride = group_of(args, kwargs, self.world)
            c.add_sent("all_to_all", all_to_all_sent(func, args, kwargs), n, stride)
            return out
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return out
        flops = 0
        formula = FLOP_FORMULAS.get(packet)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            c.flops += flops
            in_backward = torch._C._current_graph_task_id() != -1
            if in_backward and torch.is_grad_enabled():
                c.recompute_flops += flops
        if func in _VIEWS or packet in _VIEWS:
            return out
        if packet in _MAYBE_ALIASES and _aliases(outs, args):  # nothing to convert: no kernel
            return out
        moved = _nbytes(tree_flatten((args, kwargs))[0]) + _nbytes(outs)
        c.ops += 1
        c.op_costs.append((flops, moved))
        return out


# Ops that make no kernel and move no bytes.
_VIEWS = {
    aten.view, aten._unsafe_view, aten.reshape, aten.expand, aten.t, aten.transpose,
    aten.permute, aten.slice, aten.select, aten.split, aten.split_with_sizes, aten.chunk,
    aten.unsqueeze, aten.squeeze, aten.as_strided, aten.alias, aten.detach, aten.unbind,
    aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided,
    aten.lift_fresh, aten._reshape_alias, aten.unflatten, aten.flatten, aten.narrow,
    # waiting for a functional collective (DTensor's): a stream dependency, no kernel
    _functional.wait_tensor,
}  # fmt: skip
# Composite ops that return their input itself when it already is what they ask for. A
# dispatch mode sees them only when called below autograd, as DTensor's handlers do
# (loss_parallel's `x.to(float32)` on float32 logits, a chunk x V/tp copy otherwise counted).
_MAYBE_ALIASES = {aten.to, aten.view_as, aten.type_as, aten.contiguous}


def _aliases(outs: list[torch.Tensor], args) -> bool:
    inputs = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
    return all(any(torch._C._is_alias_of(o, a) for a in inputs) for o in outs)


@dataclass(frozen=True)
class Rates:
    """What one device achieves: the stated assumptions of the time estimate."""

    peak_flops: float  # dense tensor FLOP/s in the training precision
    memory_bytes_s: float  # HBM bytes/s
    matmul_efficiency: float  # achievable fraction of peak_flops for matmuls/attention
    memory_efficiency: float  # achievable fraction of memory_bytes_s
    launch_s: float  # per kernel


def roofline_seconds(counts: OpCounts, rates: Rates) -> float:
    """Each op at the slower of its FLOPs and its bytes, plus a launch, summed."""
    flop_rate = rates.peak_flops * rates.matmul_efficiency
    byte_rate = rates.memory_bytes_s * rates.memory_efficiency
    total = 0.0
    for flops, moved in counts.op_costs:
        total += max(flops / flop_rate, moved / byte_rate, rates.launch_s)
    return total
