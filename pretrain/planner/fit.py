"""When a config does not fit: the smallest change that does, as overrides to paste.

Changes are tried from the one that costs least throughput to the one that costs most:
when the eval forward between steps is the larger peak, an eval batch no larger than a
training micro-batch (alone first, then with each change below); activation checkpointing (recomputes one forward), smaller loss chunks, the largest
smaller micro-batch that fits (same global batch, more accumulation), more sharding
(ddp/single -> fsdp, ZeRO stage + 1), then all of them together; only when even that does
not fit, more nodes (doubling: alone, then with all the changes). A candidate is first
judged on two shallow copies of the model (`shallow_total`), and only one that fits there
is traced in full; the first whose full plan fits is the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config.load import with_overrides
from pretrain.errors import ConfigError
from pretrain.planner.estimate import Assumptions
from pretrain.planner.plan import GIB, Cluster, Plan, plan

MAX_NODE_DOUBLINGS = 7


@dataclass(frozen=True)
class Fix:
    overrides: tuple[str, ...]
    nodes: int  # the node count it needs (the cluster's own when unchanged)
    plan: Plan

    def describe(self, cluster: Cluster) -> str:
        parts = list(self.overrides)
        if self.nodes != cluster.nodes:
            parts.append(f"--nodes {self.nodes}")
        return " ".join(parts)


def eval_bound(cfg) -> tuple[str, ...]:
    """The eval batch of at most a training micro-batch's tokens (in rows of max_seq_len),
    when training scores tasks in larger ones: it costs training nothing."""
    if not cfg.eval.in_training:
        return ()
    rows = max(1, cfg.train.micro_batch_size * cfg.data.seq_len // cfg.model.max_seq_len)
    return (f"eval.batch_size={rows}",) if rows < cfg.eval.batch_size else ()


def single_changes(cfg) -> list[tuple[str, ...]]:
    """The one-key changes that cost least: activation checkpointing, smaller loss chunks."""
    p = cfg.parallel
    out: list[tuple[str, ...]] = []
    if p.activation_checkpointing != "full":
        out.append(("parallel.activation_checkpointing=full",))
    if p.loss_chunk_tokens == 0 or p.loss_chunk_tokens > 1024:
        out.append(("parallel.loss_chunk_tokens=1024",))
    return out


def smaller_micro_batches(cfg, world: int) -> list[int]:
    """Micro-batch sizes below the config's that divide the global batch on `world` ranks
    (on their data-parallel ranks: a tensor-parallel group shares its micro-batch)."""
    t = cfg.train
    dp = world // cfg.parallel.tp if world % cfg.parallel.tp == 0 else world
    sizes = range(t.micro_batch_size - 1, 0, -1)
    return [m for m in sizes if t.global_batch_size % (m * dp) == 0]


def more_sharding(cfg, world: int) -> list[tuple[str, ...]]:
    p = cfg.parallel
    if world == 1:
        return []
    if p.strategy in ("single", "ddp"):
        return [("parallel.strategy=fsdp",)]
    if p.strategy == "zero" and p.zero_stage < 3:
        return [(f"parallel.zero_stage={p.zero_stage + 1}",), ("parallel.strategy=fsdp",)]
    if p.strategy == "fsdp":
        changes = []
        if p.fsdp_defer_grad_sync or not p.reshard_after_forward:
            changes.append(("parallel.fsdp_defer_grad_sync=false", "parallel.reshard_after_forward=true"))  # fmt: skip
        if p.dp_replicate != 1:  # HSDP: shard over every rank instead
            changes.append(("parallel.dp_replicate=1", "parallel.dp_shard=-1"))
        if len(changes) == 2:
            changes.append(changes[0] + changes[1])
        return changes
    return []


def everything(cfg, world: int) -> tuple[str, ...]:
    """Every memory-saving change at once, for `world` ranks."""
    p = cfg.parallel
    out = ["parallel.activation_checkpointing=full"]
    if p.loss_chunk_tokens == 0 or p.loss_chunk_tokens > 1024:
        out.append("parallel.loss_chunk_tokens=1024")
    if smaller := smaller_micro_batches(cfg, world):
        out.append(f"train.micro_batch_size={smaller[-1]}")
    for change in more_sharding(cfg, world)[-1:]:
        out.extend(change)
    return tuple(out)


def find_fix(
    cfg, cluster: Cluster, assumptions: Assumptions | None = None, planned: Plan | None = None
) -> Fix | None:
    """The first candidate (see module doc) whose plan fits, or None; `planned`: the plan of
    cfg on cluster, when the caller has it."""
    planned = planned or plan(cfg, cluster, assumptions)
    trace = planned.trace
    bound = eval_bound(cfg) if trace.eval_peak_bytes > trace.step_peak_bytes else ()

    def attempt(overrides: tuple[str, ...], nodes: int) -> Fix | None:
        overrides = tuple(o for o in (*bound, *overrides) if not _already(cfg, o))
        target = Cluster(nodes, cluster.gpus_per_node, cluster.card)
        try:
            candidate = with_overrides(cfg, list(overrides))
            if not overrides and nodes == cluster.nodes:
                return None  # the config itself, already planned
            capacity = target.card.capacity_bytes
            if not shallow(candidate) and shallow_total(candidate, target) > capacity:
                return None
            p = plan(candidate, target, assumptions)
        except ConfigError:  # a candidate the config rejects is not a fix
            return None
        return Fix(overrides, nodes, p) if p.fits else None

    for change in [(), *single_changes(cfg)] if bound else single_changes(cfg):
        if fix := attempt(change, cluster.nodes):
            return fix
    if fix := largest_micro_batch(cfg, cluster, attempt):
        return fix
    for change in more_sharding(cfg, cluster.world):
        if fix := attempt(change, cluster.nodes):
            return fix
    for doubling in range(MAX_NODE_DOUBLINGS + 1):
        nodes = cluster.nodes * 2**doubling
        alone = ((),) if doubling else ()
        for overrides in (*alone, everything(cfg, nodes * cluster.gpus_per_node)):
            if fix := attempt(overrides, nodes):
                return fix
    return None


def _already(cfg, override: str) -> bool:
    """Whether `key=value` is what cfg already has (a no-op change is not shown)."""
    key, value = override.split("=", 1)
    section, name = key.split(".")
    current = getattr(getattr(cfg, section), name)
    return str(current).lower() == value.lower()


def _depths(cfg) -> tuple[int, int]:
    """The two shallow depths of `shallow_total`: below 4 blocks (of checkpointing's unit),
    prefetching is not yet steady."""
    p = cfg.parallel
    unit = p.activation_checkpointing_every if p.activation_checkpointing == "every" else 1
    return 4 * unit, 8 * unit


def shallow(cfg) -> bool:
    """A model no deeper than `shallow_total`'s copies: planned in full at once."""
    return cfg.model.n_layers <= _depths(cfg)[1]


def shallow_total(cfg, cluster: Cluster) -> float:
    """Peak + headroom of `cfg` extrapolated from two shallow copies of it (the same blocks,
    fewer of them): every category grows by the same amount from one block to the next,
    so the search rules candidates out for a fraction of a full trace. Only candidates this
    says fit are planned in full; a `shallow` model is planned in full at once instead."""
    low, high = _depths(cfg)
    totals = []
    for depth in (low, high):
        totals.append(plan(with_overrides(cfg, [f"model.n_layers={depth}"]), cluster).total_bytes)
    per_block = (totals[1] - totals[0]) / (high - low)
    return totals[0] + per_block * (cfg.model.n_layers - low)


def largest_micro_batch(cfg, cluster: Cluster, attempt) -> Fix | None:
    """The largest smaller micro-batch that fits, by bisection (memory grows with it)."""
    sizes = smaller_micro_batches(cfg, cluster.world)  # descending
    best, lo, hi = None, 0, len(sizes) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        fix = attempt((f"train.micro_batch_size={sizes[mid]}",), cluster.nodes)
        if fix:
            best, hi = fix, mid - 1
        else:
            lo = mid + 1
    return best


def require_fit(cfg, cluster: Cluster, log=print) -> Plan | None:
    """The launch-time check: the plan when `cfg` fits on `cluster`, else a one-line
    ConfigError naming the figure and the smallest fix. A config the planner cannot trace
    (a planner limitation, not the config's fault) is let through with a warning."""
    try:
        p = plan(cfg, cluster)
    except ConfigError:
        raise
    except Exception as e:  # never block a launch on the planner's own failure
        log(f"fit check skipped: could not plan this config ({type(e).__name__}: {e})")
        return None
    need = f"{p.total_bytes / GIB:.1f} GiB per GPU"
    if p.fits:
        log(f"fit check: {need} of {p.capacity_bytes / GIB:.1f} GiB on {cluster.describe()}")
        return p
    fix = find_fix(cfg, cluster, planned=p)
    hint = (
        f"smallest fix: {fix.describe(cluster)} ({fix.plan.total_bytes / GIB:.1f} GiB)"
        if fix
        else "nothing tried fits (checkpointing, micro-batch 1, full sharding, more nodes)"
    )
    raise ConfigError(
        f"config does not fit: {need} planned ({p.peak_bytes / GIB:.1f} tracked + "
        f"{p.headroom_bytes / GIB:.1f} headroom) > {p.capacity_bytes / GIB:.1f} GiB of a "
        f"{cluster.card.name}; {hint}; or pass --no-fit-check"
    )
