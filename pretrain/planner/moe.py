"""Mixture-of-experts models in the planner: routing forced balanced, the grouped matmuls'
FLOPs, and the figures a MoE plan prints (total and active parameters, the experts'
memory per rank, the token exchange of expert parallelism).

Routing. Fake tensors have no values, so a router's top-k cannot be traced: every Router
of the traced model routes round-robin instead (`Router.balanced`: copy c of a token to
expert c % E), a perfectly balanced load whose counts the host knows and hands to the
experts (no `bincount` of values a fake tensor does not have). A real run's routing is never quite balanced:
the busiest expert's rows set its grouped matmul's time and, with expert parallelism, the
largest all-to-all share, so the plan is the balanced best case.

Experts' matmuls. `model.moe.grouped_mm=auto` probes `torch._grouped_mm` on the device at
the first forward; the planner plans for the cluster's GPUs, not the CPU it runs on, so
auto is taken as grouped in bf16 where the rows are 16-byte aligned (H100-class GPUs run
it; torch's grouped_mm takes no fp32), as `GroupedExperts.use_grouped` would find there. torch's FLOP registry has no formula for
`aten._grouped_mm`; `counters.grouped_mm_flop` is 2 x M x K x N summed over the groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def routers(model: nn.Module) -> list:
    from pretrain.model.moe import Router

    return [m for m in model.modules() if isinstance(m, Router)]


def force_balanced(model: nn.Module, dtype_bytes: int) -> None:
    """Every Router of `model` routes round-robin (module doc), and experts in `auto` mode
    run as the GPU would run them: grouped in bf16 (`dtype_bytes` 2; torch's grouped_mm
    takes no fp32) with 16-byte aligned rows, else one matmul per expert."""
    from pretrain.model.moe import GroupedExperts

    for r in routers(model):
        r.balanced = True
    align = max(1, 16 // dtype_bytes)
    for m in model.modules():
        if isinstance(m, GroupedExperts) and m.mode == "auto":
            d, h = m.w1.shape[-2], m.w1.shape[-1]
            aligned = dtype_bytes == 2 and d % align == 0 and h % align == 0
            m.mode = "grouped" if aligned else "loop"  # torch's grouped_mm: bf16 only


@dataclass(frozen=True)
class Experts:
    """The routed experts of a traced model, on the traced rank (bytes from its tensors)."""

    layers: int  # MoE blocks
    experts: int  # routed experts per block
    ep: int  # expert-parallel ranks splitting them
    shard_ranks: int  # ranks each of this rank's experts is further sharded over (FSDP)
    params: int  # this rank's shards of the experts' weights, every block
    grads: int  # their gradients (the shards' size and dtype, as FSDP keeps them)
    optimizer: int  # AdamW's state of them
    gathered: int  # one block's experts of this rank unsharded for compute (FSDP's gather)
    model_params: int  # parameters of the whole traced model (global shapes, ties once)

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def experts_of(strategy) -> Experts | None:
    """What the traced rank holds of the routed experts (None: a dense model, or a
    strategy whose optimizer does not keep its state by the model's parameters: ZeRO)."""
    from pretrain.model.moe import GroupedExperts

    model, cfg = strategy.model, strategy.cfg
    blocks = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    state = getattr(strategy.optimizer, "state", None)
    if not blocks or cfg.parallel.strategy == "zero" or state is None:
        return None
    ep = getattr(getattr(strategy, "dims", None), "ep", 1) if cfg.parallel.strategy == "fsdp" else 1
    compute = 2 if cfg.parallel.mixed_precision == "bf16" else 4
    params = grads = optimizer = 0
    for p in (p for b in blocks for p in b.parameters()):
        params += _nbytes(p)
        grads += _nbytes(p.grad) if p.grad is not None else _nbytes(p)
        optimizer += sum(_nbytes(v) for v in state.get(p, {}).values() if v.dim() > 0)
    w = blocks[0].w1
    seen = {id(p): p.numel() for p in model.parameters()}
    return Experts(
        layers=len(blocks),
        experts=w.shape[0],
        ep=ep,
        shard_ranks=w.numel() // ep // _local(w).numel(),
        params=params,
        grads=grads,
        optimizer=optimizer,
        gathered=sum(p.numel() for p in blocks[0].parameters()) // ep * compute,
        model_params=sum(seen.values()),
    )


def report_lines(p) -> list[str]:
    """`pretrain plan`'s lines on a MoE model (none for a dense one): parameters in all and
    active a token, the experts' memory on the traced rank, the token exchange."""
    from pretrain.model.flops import count_params
    from pretrain.planner.estimate import fabric

    m = p.cfg.model
    if not m.moe.enabled:
        return []
    e, gib = p.trace.experts, 2**30
    total, active = count_params(m), count_params(m, active=True)
    traced = f"; the traced model's {e.model_params / 1e9:.3f} B" if e else ""
    lines = [
        f"mixture of experts: {m.moe.experts} routed experts, top {m.moe.top_k}, in "
        f"{len(m.moe_layers())} of {m.n_layers} blocks; parameters {total / 1e9:.3f} B in all, "
        f"{active / 1e9:.3f} B active a token (model.flops.count_params{traced}); FLOPs and "
        "MFU count the active ones",
    ]
    if e is not None:
        lines.append(
            f"  experts on this rank: {e.experts // e.ep} of each block's {e.experts} (ep "
            f"{e.ep}), each sharded over {e.shard_ranks} rank{'s' if e.shard_ranks > 1 else ''}:"
            f" weights {e.params / gib:.2f} + gradients {e.grads / gib:.2f} + optimizer "
            f"{e.optimizer / gib:.2f} = {e.state / gib:.2f} GiB; one block's gathered for "
            f"compute {e.gathered / gib:.2f} GiB"
        )
    counts = p.trace.counts
    sent = counts.comm_bytes.get("all_to_all", 0)
    if sent:
        c = p.cluster
        net = fabric(c.card, c.world, c.gpus_per_node, p.assumptions)
        secs = net.seconds(counts, lambda kind, n, stride: kind == "all_to_all")
        lines.append(
            f"  token all-to-all over ep {p.cfg.parallel.ep} ranks: {sent / gib:.2f} GiB sent per "
            f"step per rank in {counts.comm_calls['all_to_all']} calls, {secs:.3f} s, exposed"
        )
    lines.append(
        "  routing planned balanced (round-robin: every expert gets as many tokens); a real "
        "router's busiest expert sets each layer's pace"
    )
    return lines


def ep_degrees(cfg, dp_shard: int, gpus_per_node: int) -> list[int]:
    """The expert-parallel degrees `pretrain plan --search` tries on a shard group of
    `dp_shard` ranks: 1, and for a MoE model each divisor of both dp_shard and the experts
    up to a node's GPUs (the all-to-all on NVLink), largest first."""
    experts = cfg.model.moe.experts
    if not experts:
        return [1]
    top = min(dp_shard, gpus_per_node)
    return [e for e in range(top, 0, -1) if dp_shard % e == 0 and experts % e == 0]
