"""`pretrain plan CONFIG --search`: the fastest layouts of a config that fit the cluster.

The global batch stays the config's (a training decision, not a layout one). Searched:

- meshes of the fsdp strategy: tp in the divisors of the GPUs per node that the model
  allows (`check_tp`), over plain FSDP and HSDP with shard groups of one node, or of the
  fewest whole nodes that hold the model state in half a card when one node cannot;
- micro-batches that divide the global batch over the data-parallel ranks (world / tp);
- activation checkpointing none, every 2nd block, full;
- for a MoE model (tp 1), expert parallelism: ep in the divisors of both dp_shard and the
  experts, up to a node's GPUs (`moe.ep_degrees`).

A mesh is skipped, its reason counted, without a trace when the global batch cannot be
split over its data-parallel ranks (at least one sequence each), or when the model state
alone (fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter over the
dp_shard x tp ranks holding a copy) with the fixed headroom exceeds the card.

Memory grows with the micro-batch (among those of several a step; one a step holds no
gradients through its forward), with less checkpointing, and as tp or the shard group
shrink. So a mesh is searched once the meshes needing less memory are, skipping what they
showed not to fit, and within it (`search_mesh`) each micro-batch gets the least
checkpointing that fits (more only adds recomputation), from the last one's level on. The
step time is not monotone in the micro-batch (a loss in several chunks gathers the head
again), so every micro-batch that fits is kept.

Each layout is traced on two shallow copies of the model (2 and 4 blocks, of
checkpointing's unit) and extrapolated per block (`deeper`): a block's memory, FLOPs, bytes
and collectives repeat, so the copies' difference is one block's worth, and the step time,
tokens/s and MFU come from the planner's own estimate on that trace (`plan_traced`). Where
the copies' peak holds no block's activations, a deeper model may peak elsewhere: the fit
is then judged on an upper bound (`upper_total`). tests/test_planner_search.py checks both
against full traces. Meshes are searched `jobs` at a time in worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from unittest import mock

from pretrain.config.load import with_overrides
from pretrain.errors import ConfigError
from pretrain.model.flops import count_params
from pretrain.planner.counters import OpCounts
from pretrain.planner.estimate import Assumptions, headroom_bytes
from pretrain.planner.moe import ep_degrees
from pretrain.planner.plan import GIB, Cluster, Plan
from pretrain.planner.trace import Trace, fake_world, trace_step

AC_LEVELS = ("none", "every", "full")
AC_EVERY = 2  # the `every` level checkpoints each 2nd block
STATE_BYTES = 16  # per parameter: fp32 weights, fp32 gradients, AdamW's two fp32 moments
# plan.py by name, not the package attribute (which is its plan function): plan_traced
# gives it a trace, and its check_layout and plan are looked up at the call
plan_module = importlib.import_module("pretrain.planner.plan")


@dataclass(frozen=True)
class Layout:
    """One point of the search: a mesh of the fsdp strategy, a micro-batch, checkpointing."""

    tp: int
    dp_replicate: int  # 1: FSDP over every data-parallel rank; > 1: HSDP
    dp_shard: int
    micro_batch: int
    ac: str  # none | every | full
    every: int = AC_EVERY
    ep: int = 1  # expert-parallel degree (a MoE model's: moe.ep_degrees)

    @classmethod
    def of(cls, cfg, world: int) -> Layout | None:
        """The layout of `cfg` on `world` ranks (None: not the fsdp strategy)."""
        from pretrain.parallel.dims import ParallelDims

        p = cfg.parallel
        if p.strategy != "fsdp":
            return None
        dims = ParallelDims.resolve(p, world)
        return cls(
            dims.tp, dims.dp_replicate, dims.dp_shard, cfg.train.micro_batch_size,
            p.activation_checkpointing, p.activation_checkpointing_every, dims.ep,
        )  # fmt: skip

    @property
    def key(self) -> tuple:
        """What makes two layouts the same run (`every` only counts for ac=every)."""
        every = self.every if self.ac == "every" else 0
        return self.tp, self.dp_replicate, self.dp_shard, self.micro_batch, self.ac, every, self.ep

    def settings(self) -> list[str]:
        """Every key of the layout as overrides (HSDP: dp_shard fixed, dp_replicate the
        rest, as an elastic job wants it)."""
        mesh = ["parallel.dp_replicate=1", "parallel.dp_shard=-1"]
        if self.dp_replicate > 1:
            mesh = ["parallel.dp_replicate=-1", f"parallel.dp_shard={self.dp_shard}"]
        out = ["parallel.strategy=fsdp", f"parallel.tp={self.tp}", *mesh, f"parallel.ep={self.ep}"]
        out += [f"train.micro_batch_size={self.micro_batch}"]
        out += [f"parallel.activation_checkpointing={self.ac}"]
        if self.ac == "every":
            out.append(f"parallel.activation_checkpointing_every={self.every}")
        return out

    def overrides(self, cfg) -> list[str]:
        """The settings that differ from `cfg`: pasted after it, they make this layout."""
        return [o for o in self.settings() if not _already(cfg, o)]

    def describe(self) -> str:
        mesh = f"HSDP {self.dp_replicate} x " if self.dp_replicate > 1 else "FSDP "
        mesh += str(self.dp_shard) + (f" (experts: ep {self.ep})" if self.ep > 1 else "")
        ac = f"every {self.every}" if self.ac == "every" else self.ac
        return f"tp {self.tp}, {mesh}, micro-batch {self.micro_batch}, checkpointing {ac}"


def _already(cfg, override: str) -> bool:
    key, value = override.split("=", 1)
    section, name = key.split(".")
    return str(getattr(getattr(cfg, section), name)).lower() == value.lower()


@dataclass(frozen=True)
class Result:
    """What the search keeps of a plan (small enough to come back from a worker)."""

    layout: Layout | None
    total_bytes: int
    capacity_bytes: int
    step_time_s: float
    tokens_per_s: float
    mfu: float
    upper: bool = False  # total_bytes is an upper bound (`upper_total`)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes

    @classmethod
    def of(cls, layout: Layout | None, planned: tuple[Plan, int | None]) -> Result:
        p, upper = planned
        total = p.total_bytes if upper is None else max(upper, p.total_bytes)
        return cls(
            layout, total, p.capacity_bytes, p.step_time_s, p.tokens_per_s, p.mfu, upper is not None
        )


@dataclass
class Search:
    cluster: Cluster
    kept: list[Result] = field(default_factory=list)  # fitting, fastest first
    skipped: Counter = field(default_factory=Counter)  # reason -> meshes
    probed: list[Result] = field(default_factory=list)  # every layout planned
    invalid: Counter = field(default_factory=Counter)  # reason -> layouts refused
    current: Result | None = None
    current_layout: Layout | None = None
    current_error: str | None = None
    seconds: float = 0.0
    jobs: int = 1

    def rank(self) -> int | None:
        """The current config's place among the kept layouts (1: none is faster)."""
        if self.current is None or not self.current.fits:
            return None
        return 1 + sum(r.tokens_per_s > self.current.tokens_per_s for r in self.kept)


# ---- planning on shallow copies -------------------------------------------------------


def depths(cfg) -> tuple[int, int]:
    """The shallow copies' depths: 2 and 4 of checkpointing's unit, plus the blocks of a last
    unit left partial (unchecked: every N-th block is checkpointed). For the fsdp strategy
    the step time extrapolated from them is the full trace's (to rounding), and so is the
    memory where the peak holds every block's activations (`upper_total`; tests: from 1
    block, whose gradients are the last reduced, the peak often lies elsewhere). DDP's and
    ZeRO's buckets do not repeat per block: those are planned in full. A MoE model: 4 and 8
    (FSDP's gathers of large experts are not steady at 2: OLMoE's 16 blocks came out 29.0
    GiB from 2 and 4, 25.1 from 4 and 8, as the full trace)."""
    p, base = cfg.parallel, 4 if cfg.model.moe.enabled else 2
    unit = p.activation_checkpointing_every if p.activation_checkpointing == "every" else 1
    rest = cfg.model.n_layers % unit
    return base * unit + rest, 2 * base * unit + rest


def _affine(lo, hi, k: float):
    return hi + (hi - lo) * k


def deeper_ops(lo: list, hi: list, k: float) -> list:
    """The (flops, bytes) of every op of a model k x (hi - lo) blocks deeper than hi's: the
    ops hi adds to lo, k times more; an op of lo that hi has grown (one op over all
    parameters: paired with hi's, largest with largest) grown k times more."""
    a, b = Counter(lo), Counter(hi)
    added, removed = (sorted((x - y).elements(), reverse=True) for x, y in ((b, a), (a, b)))
    grown: dict[tuple, list] = {}  # an op of hi -> the ops of lo it grew from
    for now, was in zip(added, removed, strict=False):
        grown.setdefault(now, []).append(was)
    out = []
    for op in hi:
        was = grown[op].pop() if grown.get(op) else op
        out.append(tuple(round(_affine(w, h, k)) for w, h in zip(was, op, strict=True)))
    for op, n in Counter(added[len(removed) :]).items():
        out += [op] * round(n * k)
    return out


def deeper_counts(lo: OpCounts, hi: OpCounts, k: float) -> OpCounts:
    values = {}
    for f in dataclasses.fields(OpCounts):
        x, y = getattr(lo, f.name), getattr(hi, f.name)
        if isinstance(y, Counter):
            keys = set(x) | set(y)
            values[f.name] = Counter({q: round(_affine(x[q], y[q], k)) for q in keys})
        elif isinstance(y, list):
            values[f.name] = deeper_ops(x, y, k)
        else:
            values[f.name] = round(_affine(x, y, k))
    return OpCounts(**values)


def deeper(lo: Trace, hi: Trace, d_lo: int, d_hi: int, depth: int) -> Trace:
    """The trace of the model at `depth` blocks from its copies at d_lo and d_hi blocks."""
    k = (depth - d_hi) / (d_hi - d_lo)
    values = {}
    for f in dataclasses.fields(Trace):
        x, y = getattr(lo, f.name), getattr(hi, f.name)
        if isinstance(y, OpCounts):
            values[f.name] = deeper_counts(x, y, k)
        elif isinstance(y, dict):
            values[f.name] = {q: round(_affine(x.get(q, 0), v, k)) for q, v in y.items()}
        else:  # the number of micro-batches, eval_memory None: the same at any depth
            values[f.name] = y
    return Trace(**values)


def plan_traced(cfg, cluster: Cluster, a: Assumptions, trace: Trace) -> Plan:
    """`plan(cfg, cluster, a)` with `trace` taken as cfg's traced step: the same checks,
    step time, tokens/s and MFU as a plan traced in full."""
    with mock.patch.object(plan_module, "trace_step", lambda *_: trace):
        return plan_module.plan(cfg, cluster, a)


def block_activation_bound(cfg) -> int:
    """An upper bound of the bytes a block keeps for backward on a rank, on average over the
    blocks (fp32 throughout): a checkpointed block its input; another every tensor its
    matmuls, norms and attention save, the sequence-parallel gathers whole, the rest split
    over tp."""
    m, p, tp = cfg.model, cfg.parallel, cfg.parallel.tp
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    checkpointed = 4 * tokens * m.d_model // tp
    kv = m.kv_heads * m.head_dim
    whole = 4 * tokens * (2 * m.d_model + (10 * m.d_model + 2 * kv + 5 * m.hidden_dim) // tp)
    if p.activation_checkpointing == "full":
        return checkpointed
    if p.activation_checkpointing == "every":
        k = p.activation_checkpointing_every
        return (checkpointed + (k - 1) * whole) // k
    return whole


def upper_total(cfg, lo: Trace, hi: Trace, d_lo: int, d_hi: int, a: Assumptions) -> int | None:
    """None when the copies' peak holds every block's activations (it grows by them from one
    depth to the other): then no other moment of the step grows faster, and `deeper` is
    exact. Else (its peak is where no block's activations are held: the optimizer step, a
    gradient's reduction) the moment that holds them all may overtake it further down: an
    upper bound of the full model's peak + headroom, that moment growing by the model
    state's growth and `block_activation_bound` a block."""
    per_block = block_activation_bound(cfg)
    act = (hi.memory["activations"] - lo.memory["activations"]) / (d_hi - d_lo)
    if act >= per_block / 4:
        return None
    state = sum(hi.model_state[c] - lo.model_state[c] for c in ("params", "grads", "optimizer"))
    slope = max((hi.peak_bytes - lo.peak_bytes) / (d_hi - d_lo), state / (d_hi - d_lo) + per_block)
    peak = int(hi.peak_bytes + slope * (cfg.model.n_layers - d_hi))
    return peak + headroom_bytes(peak, a)


def plan_shallow(cfg, cluster: Cluster, a: Assumptions) -> tuple[Plan, int | None]:
    """(the plan of cfg from two shallow copies of it (`deeper`), an upper bound of its
    peak + headroom where that peak may be too low (`upper_total`), else None). In full, and
    None, when cfg is no deeper than the copies, not the fsdp strategy (`depths`), or when
    it would fit by the plan but not by the bound."""
    d_lo, d_hi = depths(cfg)
    if cfg.model.n_layers <= d_hi or cfg.parallel.strategy != "fsdp":
        return plan_module.plan(cfg, cluster, a), None
    plan_module.check_layout(cfg, cluster)
    copies = [with_overrides(cfg, [f"model.n_layers={d}"]) for d in (d_lo, d_hi)]
    with fake_world(cluster.world):  # one world: DTensor's caches serve both copies
        traces = [trace_step(copy, cluster.world) for copy in copies]
    p = plan_traced(cfg, cluster, a, deeper(*traces, d_lo, d_hi, cfg.model.n_layers))
    upper = upper_total(cfg, *traces, d_lo, d_hi, a)
    if upper is not None and p.fits and upper > p.capacity_bytes:
        return plan_module.plan(cfg, cluster, a), None
    return p, upper


# ---- the search -----------------------------------------------------------------------


def micro_batches(cfg, dp: int) -> list[int]:
    """Micro-batch sizes that split the global batch evenly over `dp` data-parallel ranks."""
    g = cfg.train.global_batch_size
    return [m for m in range(1, g // dp + 1) if g % (m * dp) == 0]


def state_bytes(cfg, ranks: int, a: Assumptions) -> int:
    """A lower bound of a rank's memory: the model state over the `ranks` holding one copy,
    with the fixed headroom (norm weights, replicated over tp, left out)."""
    m = cfg.model
    n = count_params(m) - (2 * m.n_layers + 1) * m.d_model
    state = STATE_BYTES * n // ranks
    return state + headroom_bytes(state, a)


def shard_groups(cfg, cluster: Cluster, a: Assumptions) -> list[int]:
    """The ranks holding one copy of the model (dp_shard x tp), most first: all of them
    (FSDP); one node (HSDP); and when one node cannot hold the model state in half a card,
    the fewest whole nodes that can (HSDP)."""
    g, half = cluster.gpus_per_node, cluster.card.capacity_bytes // 2
    out = [cluster.world]
    if cluster.nodes > 1:
        out.append(g)
        nodes = 2
        while state_bytes(cfg, g, a) > half and nodes < cluster.nodes:
            if cluster.nodes % nodes == 0 and state_bytes(cfg, nodes * g, a) <= half:
                out.insert(1, nodes * g)
                break
            nodes *= 2
    return out


def grid(cfg, cluster: Cluster, a: Assumptions) -> tuple[list[tuple[Layout, list[int]]], Counter]:
    """(the meshes to search, largest tp and shard group first, each as a layout at
    micro-batch 0 with its micro-batch sizes; reason -> meshes skipped without a trace)."""
    from pretrain.config.checks import check_tp

    out, skipped = [], Counter()
    capacity, g = cluster.card.capacity_bytes, cfg.train.global_batch_size
    groups = shard_groups(cfg, cluster, a)
    for tp in [t for t in range(cluster.gpus_per_node, 0, -1) if cluster.gpus_per_node % t == 0]:
        try:
            if tp > 1:
                check_tp(tp, cfg)
        except ConfigError as e:
            skipped[f"tp={tp}: {e}"] += len(groups)
            continue
        dp = cluster.world // tp
        if not (mbs := micro_batches(cfg, dp)):
            skipped[
                f"tp={tp}: global batch {g} cannot be split evenly over its {dp} data-parallel "
                "ranks (at least one sequence each)"
            ] += len(groups)
            continue
        for ranks in groups:
            if (need := state_bytes(cfg, ranks, a)) > capacity:
                skipped[
                    f"model state alone {need / GIB:,.1f} GiB > {capacity / GIB:.1f} GiB (a "
                    f"copy over {ranks} ranks, {STATE_BYTES} bytes a parameter + headroom)"
                ] += 1
                continue
            for ep in ep_degrees(cfg, ranks // tp, cluster.gpus_per_node) if tp == 1 else [1]:
                out.append((Layout(tp, cluster.world // ranks, ranks // tp, 0, "none", ep=ep), mbs))
    return out, skipped


@dataclass
class MeshSearch:
    probed: list[Result] = field(default_factory=list)  # every layout planned
    kept: list[Result] = field(default_factory=list)
    invalid: Counter = field(default_factory=Counter)  # reason -> layouts
    # (several micro-batches a step?, checkpointing) -> the least micro-batch known not to fit
    nofit: dict = field(default_factory=dict)


def search_mesh(
    cfg, cluster: Cluster, a: Assumptions, mesh: Layout, mbs: list[int], nofit: dict
) -> MeshSearch:
    """For each micro-batch, smallest first, the least checkpointing that fits, until none
    fits; then the micro-batch of a whole step (one a step: no gradients held through the
    forward, so it may fit where smaller ones do not). Memory grows with the micro-batch
    and with less checkpointing, so each micro-batch starts from the last one's level.
    `nofit`: what meshes needing less memory (larger tp or shard group) showed not to fit."""
    out = MeshSearch(nofit=dict(nofit))
    inf = float("inf")

    def known_not_to_fit(m: int, ac: str, single: bool) -> bool:
        bound = out.nofit.get((True, ac), inf)  # one a step: the least memory at a size
        return m >= (bound if single else min(bound, out.nofit.get((False, ac), inf)))

    def fits(m: int, ac: str) -> bool:
        single = m == mbs[-1]
        if known_not_to_fit(m, ac, single):
            return False
        layout = dataclasses.replace(mesh, micro_batch=m, ac=ac)
        try:
            r = Result.of(layout, plan_shallow(with_overrides(cfg, layout.settings()), cluster, a))
        except ConfigError as e:
            out.invalid[str(e)] += 1
            return False
        except Exception as e:  # the planner's own failure: said, and the search goes on
            out.invalid[f"could not be planned ({type(e).__name__}: {str(e)[:200]})"] += 1
            return False
        out.probed.append(r)
        if r.fits:
            out.kept.append(r)
        else:  # nor with less checkpointing, nor a larger micro-batch of its kind
            for less in AC_LEVELS[: AC_LEVELS.index(ac) + 1]:
                out.nofit[single, less] = min(out.nofit.get((single, less), m), m)
        return r.fits

    level = 0
    for m in mbs[:-1]:
        while level < len(AC_LEVELS) and not fits(m, AC_LEVELS[level]):
            level += 1
        if level == len(AC_LEVELS):
            break
    for ac in AC_LEVELS:
        if fits(mbs[-1], ac):
            break
    return out


def _plan_current(cfg, cluster: Cluster, a: Assumptions) -> Result:
    return Result.of(Layout.of(cfg, cluster.world), plan_shallow(cfg, cluster, a))


def _lighter(u: Layout, v: Layout) -> bool:
    """Whether mesh v needs no more memory than u at any micro-batch and checkpointing: tp,
    the ranks holding a copy and ep no smaller (the same state or less, smaller activations,
    fewer experts gathered)."""
    return v != u and v.tp >= u.tp and v.dp_shard * v.tp >= u.dp_shard * u.tp and v.ep >= u.ep


def search(cfg, cluster: Cluster, a: Assumptions, jobs: int | None = None) -> Search:
    """Every mesh of `grid` searched (`search_mesh`) once the meshes lighter than it are,
    with what they showed not to fit, `jobs` at a time in worker processes (default: the
    CPUs, at most 4; 1: in this process); the config itself planned alike."""
    started = time.perf_counter()
    units, skipped = grid(cfg, cluster, a)
    jobs = max(1, min(jobs or min(4, os.cpu_count() or 1), len(units) + 1))
    s = Search(cluster, skipped=skipped, jobs=jobs)
    try:
        s.current_layout = Layout.of(cfg, cluster.world)
        plan_module.check_layout(cfg, cluster)
    except ConfigError as e:
        s.current_error = str(e)
    pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) if jobs > 1 else _InProcess()
    done: dict[Layout, MeshSearch] = {}
    with pool:
        current = None
        if jobs > 1 and s.current_error is None:  # while the first mesh keeps one busy
            current = pool.submit(_plan_current, cfg, cluster, a)
        pending, running = list(units), {}
        while pending or running:
            for mesh, mbs in list(pending):
                lighter = [done.get(v) for v, _ in units if _lighter(mesh, v)]
                if len(running) < jobs and all(m is not None for m in lighter):
                    keys = {k for m in lighter for k in m.nofit}
                    nofit = {k: min(m.nofit.get(k, float("inf")) for m in lighter) for k in keys}
                    running[pool.submit(search_mesh, cfg, cluster, a, mesh, mbs, nofit)] = mesh
                    pending.remove((mesh, mbs))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                done[running.pop(f)] = f.result()
        for m in done.values():
            s.kept += m.kept
            s.probed += m.probed
            s.invalid += m.invalid
        if s.current_error is None:
            key = s.current_layout.key if s.current_layout else None
            same = [r for r in s.probed if key and r.layout.key == key]
            try:
                if same and current is None:
                    s.current = same[0]
                else:
                    s.current = (current or pool.submit(_plan_current, cfg, cluster, a)).result()
                    s.probed += [] if same else [s.current]
            except Exception as e:  # the planner's own failure: said
                s.current_error = f"could not be planned ({type(e).__name__}: {e})"
    s.kept.sort(key=lambda r: -r.tokens_per_s)
    s.seconds = time.perf_counter() - started
    return s


class _InProcess(contextlib.nullcontext):
    """The executor of jobs=1: runs each call at once, here."""

    def submit(self, fn, *args) -> Future:
        f = Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:
            f.set_exception(e)
        return f
