"""`pretrain plan CONFIG [key=value ...] --nodes N --gpus-per-node G --gpu-type T`: the
per-rank memory, FLOPs and step time of a config on a cluster, before anything launches."""

from __future__ import annotations

import argparse
import json
import time

from pretrain import hardware
from pretrain.config.load import load_config
from pretrain.errors import ConfigError
from pretrain.planner.estimate import Assumptions, add_network_flags, network_flags
from pretrain.planner.fit import MAX_NODE_DOUBLINGS, find_fix
from pretrain.planner.moe import report_lines as moe_report
from pretrain.planner.plan import GIB, Cluster, Plan, plan

LABELS = {
    "params": "parameters (this rank's)",
    "grads": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations",
    "logits_loss": "logits / loss",
    "comm_buffers": "communication buffers",
    "other": "other",
}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain plan",
        description="Per-rank memory, FLOPs and step time of CONFIG on a cluster: the real "
        "model and strategy traced for one step on fake tensors (no GPU needed).",
    )
    p.add_argument("config", help="the run's YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-type", default="H100", help=f"one of {', '.join(hardware.known_names())}")
    a = Assumptions()
    p.add_argument(
        "--matmul-efficiency", type=float, default=a.matmul_efficiency,
        help=f"achievable fraction of the dense peak for matmuls (default {a.matmul_efficiency})",
    )  # fmt: skip
    add_network_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--no-fix", action="store_true", help="do not search for a fix")
    p.add_argument(
        "--search", action="store_true",
        help="the fastest layouts that fit (tp x FSDP/HSDP mesh, micro-batch, activation "
        "checkpointing; the global batch kept) as overrides, and the config's rank among them",
    )  # fmt: skip
    p.add_argument(
        "--jobs", type=int, default=None,
        help="--search: planning processes (default: the CPUs, at most 4)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=5, help="--search: layouts to print (default 5)")
    args = p.parse_intermixed_args(argv)
    for flag, value in (("--jobs", args.jobs), ("--top", args.top)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.search and args.json:
        raise ConfigError("--search prints a table; it has no --json form")
    if not 0 < args.matmul_efficiency <= 1:
        raise ConfigError(f"--matmul-efficiency must be in (0, 1], got {args.matmul_efficiency}")
    args.network = network_flags(args)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value")
    return args


def gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def report(p: Plan) -> list[str]:
    cfg, c = p.cfg, p.cluster
    t, par = cfg.train, cfg.parallel
    strategy = par.strategy + (f" stage {par.zero_stage}" if par.strategy == "zero" else "")
    if par.strategy == "fsdp":
        from pretrain.parallel.dims import ParallelDims

        dims = ParallelDims.resolve(par, c.world)
        if dims.spans_nodes(c.gpus_per_node):  # Fabric.over prices groups as whole nodes
            strategy += f" ({dims.describe()}; shard groups span nodes, planned as if they did not)"
        elif dims.hsdp or dims.tp > 1:
            strategy += f" ({dims.describe()})"
    lines = [
        f"plan: {cfg.run.name} on {c.describe()}, {strategy}, {par.mixed_precision}, "
        f"activation checkpointing {par.activation_checkpointing}"
        + (
            f" {par.activation_checkpointing_every}"
            if par.activation_checkpointing == "every"
            else ""
        ),
        f"  micro-batch {t.micro_batch_size} x {cfg.data.seq_len} tokens, "
        f"{p.trace.accum} per step per rank, global batch {t.global_batch_size} "
        f"({p.tokens_per_step:,} tokens)",
        "",
        "memory per rank at the training step's peak (tracked on fake tensors):",
    ]
    for key, label in LABELS.items():
        if p.memory.get(key):
            lines.append(f"  {label:28} {gib(p.memory[key]):>12}")
    if p.trace.eval_memory is not None:
        lines += eval_lines(p)
    lines += [
        f"  {'tracked peak' + (' (the larger)' if p.trace.eval_memory else ''):28} "
        f"{gib(p.peak_bytes):>12}",
        f"  {'allocator headroom':28} {gib(p.headroom_bytes):>12}",
        f"  {'total':28} {gib(p.total_bytes):>12}  of {gib(p.capacity_bytes)} "
        f"({c.card.name}): {'fits' if p.fits else 'DOES NOT FIT'}",
        "",
    ]
    lines += moe_report(p)
    counts = p.trace.counts
    recompute = counts.recompute_flops
    expected = p.analytic_flops_per_step + p.attention_recompute_flops
    lines += [
        f"FLOPs per step per rank: traced {counts.flops:.3e} (recomputation {recompute:.3e}), "
        f"analytic 6N + attention {p.analytic_flops_per_step:.3e}",
        f"  check: traced without recomputation {counts.model_flops:.3e} = analytic + "
        f"SDPA backward's QK^T recompute {expected:.3e} {counts.model_flops / expected - 1:+.2%}",
        f"communication per step per rank: {fmt_comm(counts)}",
        f"step time {p.step_time_s:.3f} s (compute {p.time.compute_s:.3f} s, "
        f"communication {p.time.comm_s:.3f} s of which exposed {p.time.exposed_comm_s:.3f} s)",
        f"throughput {p.tokens_per_s:,.0f} tokens/s ({p.tokens_per_s / c.world:,.0f} per GPU), "
        f"MFU {p.mfu:.1%}",
        "assumptions: " + "; ".join(p.assumptions.lines()),
    ]
    return lines


def eval_lines(p: Plan) -> list[str]:
    """The step's peak beside the eval forward's (eval.tasks scored between steps)."""
    cfg, t = p.cfg, p.trace
    held = ", ".join(f"{LABELS[k]} {gib(v)}" for k, v in t.eval_memory.items() if v)
    return [
        f"  {'training step peak':28} {gib(t.step_peak_bytes):>12}",
        f"  {'eval forward peak':28} {gib(t.eval_peak_bytes):>12}  (eval.batch_size "
        f"{cfg.eval.batch_size} x max_seq_len {cfg.model.max_seq_len}, every token scored)",
        f"    held at the eval's peak: {held}",
    ]


def fmt_comm(counts) -> str:
    if not counts.comm_bytes:
        return "none"
    parts = [
        f"{kind} {gib(n)} in {counts.comm_calls[kind]} calls"
        for kind, n in sorted(counts.comm_bytes.items())
    ]
    return ", ".join(parts)


def as_json(p: Plan, fix_line: str | None) -> dict:
    return {
        "cluster": {"nodes": p.cluster.nodes, "gpus_per_node": p.cluster.gpus_per_node,
                    "gpu_type": p.cluster.card.name},
        "memory_bytes": p.memory,
        "step_peak_bytes": p.trace.step_peak_bytes,
        "eval_memory_bytes": p.trace.eval_memory,  # null: training scores no tasks
        "eval_peak_bytes": p.trace.eval_peak_bytes,
        "peak_bytes": p.peak_bytes,
        "headroom_bytes": p.headroom_bytes,
        "total_bytes": p.total_bytes,
        "capacity_bytes": p.capacity_bytes,
        "fits": p.fits,
        "flops_per_step": p.flops_per_step,
        "recompute_flops_per_step": p.trace.counts.recompute_flops,
        "analytic_flops_per_step": p.analytic_flops_per_step,
        "comm_bytes_per_step": dict(p.trace.counts.comm_bytes),
        "step_time_s": p.step_time_s,
        "tokens_per_s": p.tokens_per_s,
        "mfu": p.mfu,
        "fix": fix_line,
    }  # fmt: skip


def main(argv: list[str]) -> int:
    """Print the plan; exit 0 if it fits, 1 if not (with the smallest fix found)."""
    args = parse(argv)
    cluster = Cluster.of(args.nodes, args.gpus_per_node, args.gpu_type)
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    a = Assumptions(matmul_efficiency=args.matmul_efficiency, **args.network)
    a = a.for_node(cluster.card, cluster.gpus_per_node)  # printed: the NICs it plans with
    if args.search:
        from pretrain.planner.search import search

        found = search(cfg, cluster, a, jobs=args.jobs)
        print("\n".join(search_report(found, cfg, args.top)))
        return 0 if found.kept else 1
    p = plan(cfg, cluster, a)
    fix = None if p.fits or args.no_fix else find_fix(cfg, cluster, a, planned=p)
    if args.json:
        print(json.dumps(as_json(p, fix.describe(cluster) if fix else None), indent=1))
        return 0 if p.fits else 1
    print("\n".join(report(p)))
    if fix is not None:
        fp = fix.plan
        print(
            f"\nsmallest change that fits ({gib(fp.total_bytes)} of {gib(fp.capacity_bytes)}, "
            f"{fp.tokens_per_s / fp.cluster.world:,.0f} tokens/s per GPU):\n"
            f"  {fix.describe(cluster)}"
        )
    elif not p.fits and not args.no_fix:
        print(
            "\nnothing tried fits (activation checkpointing, micro-batch 1, full sharding, "
            f"up to {cluster.nodes * 2**MAX_NODE_DOUBLINGS} nodes): the model is too big for "
            f"{cluster.card.name}s without tensor or pipeline parallelism"
        )
    print(f"(planned in {time.perf_counter() - started:.1f} s)")
    return 0 if p.fits else 1


def search_report(s, cfg, top: int = 5) -> list[str]:
    """`--search`'s table: the fastest layouts that fit, each with its overrides to paste,
    what was skipped and why, and where the config itself stands."""
    from pretrain.planner.search import depths

    c, g, seq = s.cluster, cfg.train.global_batch_size, cfg.data.seq_len
    too_big = sum(not r.fits for r in s.probed)
    lo, hi = depths(cfg)
    lines = [
        f"search: {cfg.run.name} on {c.describe()}, global batch {g} x {seq} tokens "
        f"({g * seq:,}) as configured; fsdp meshes (tp x FSDP/HSDP"
        + (" x ep" if cfg.model.moe.enabled else "")
        + ") x micro-batch x activation checkpointing (none, every 2, full)",
        *(f"  skipped {n} mesh{'es' if n > 1 else ''}: {why}" for why, n in sorted(s.skipped.items())),
        *(f"  refused {n} layout{'s' if n > 1 else ''}: {why}" for why, n in sorted(s.invalid.items())),
        f"  planned {len(s.probed)} layout{'s' if len(s.probed) != 1 else ''} ("
        + (f"{lo}- and {hi}-block copies traced, extrapolated per block" if cfg.model.n_layers > hi else "in full")
        + f"), {too_big} do not fit; kept, per mesh and micro-batch, the least checkpointing "
        f"that fits: {len(s.kept)}",
        "",
    ]  # fmt: skip
    if not s.kept:
        lines.append("no layout fits: more nodes, or a card with more memory")
    else:
        lines.append(f"{'#':>2} {'tokens/s':>11} {'per GPU':>8} {'MFU':>6} {'memory':>12} {'step':>8}  layout")  # fmt: skip
        for i, r in enumerate(s.kept[:top], 1):
            lines += [
                f"{i:>2} {r.tokens_per_s:>11,.0f} {r.tokens_per_s / c.world:>8,.0f} "
                f"{r.mfu:>6.1%} {memory(r):>12} {seconds(r.step_time_s):>7}s  "
                f"{r.layout.describe()}",
                "   " + (" ".join(r.layout.overrides(cfg)) or "(the config as it is)"),
            ]
    lines += ["", current_line(s)]
    lines.append(f"(searched in {s.seconds:.1f} s, {s.jobs} process{'es' if s.jobs > 1 else ''})")
    return lines


def current_line(s) -> str:
    """Where the config as it is stands among the layouts kept."""
    layout = s.current_layout.describe() if s.current_layout else "not the fsdp strategy"
    head = f"the config as it is ({layout}): "
    if s.current_error is not None:
        return head + f"invalid on this cluster: {s.current_error}"
    r = s.current
    if not r.fits:
        return head + f"does not fit ({memory(r)} of {gib(r.capacity_bytes)})"
    rank, n = s.rank(), len(s.kept)
    text = f"{r.tokens_per_s:,.0f} tokens/s, MFU {r.mfu:.1%}, {memory(r)}: "
    same = [k for k in s.kept if r.layout is not None and k.layout.key[:4] == r.layout.key[:4]]
    if any(k.layout.key == r.layout.key for k in same):
        text += f"#{rank} of the {n} layouts kept"
    else:
        text += f"{rank - 1} of the {n} layouts kept plan faster " + (
            f"(its mesh and micro-batch fit with checkpointing {same[0].layout.ac})"
            if same
            else "(not a layout the search tries)"
        )
    if rank > 1:
        text += f"; #1 plans {s.kept[0].tokens_per_s / r.tokens_per_s:.2f}x its tokens/s"
    return head + text


def memory(r) -> str:
    """A layout's planned memory; `<=` where it is an upper bound (search.upper_total)."""
    return ("<= " if r.upper else "") + gib(r.total_bytes)


def seconds(t: float) -> str:
    return f"{t:.2f}" if t >= 1 else f"{t:.3g}"
