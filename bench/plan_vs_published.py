"""Our planner's per-GPU tokens/s and memory next to figures peers published for real runs.

We cannot run 8B/70B models here, so the honest check of `pretrain plan` at scale is the
runs others measured: bench/published.py holds their rows (torchtitan, fms-fsdp, llm-foundry,
OLMo-core, Megatron-Bridge), each with its source. For every row this builds our config with
the row's settings (model shape, sequence length, micro- and global batch, activation
checkpointing, bf16, fsdp, tensor parallelism) and plans it on the row's GPU count and card,
then prints
published, planned and the ratio ours / published, and the median ratio per column.

Like is compared with like: a "reserved" figure (torch's allocator pool) against our peak
plus allocator headroom (`total_bytes`), an "active" one against our tracked peak
(`peak_bytes`). Rows with settings our framework cannot express (pipeline or context
parallelism, float8 matmuls, torch's per-op selective checkpointing) are listed as "not
comparable" with the reason, not dropped; where the only difference is per-op selective
checkpointing, our plans with none and with full checkpointing are printed as the bracket
the published figure should fall into. HSDP rows (FSDP inside a node, replicated across
nodes) are planned as fsdp on one node, which holds and computes per GPU what they do;
torch.compile rows are planned eagerly (the planner models compile off); both are flagged.

    python bench/plan_vs_published.py [--match SUBSTRING] [--no-bracket] [--sources]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from published import PUBLISHED, SHAPES, Published

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config.load import load_config
from pretrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
GPUS_PER_NODE = 8
AC = {
    "none": ["parallel.activation_checkpointing=none"],
    "full": ["parallel.activation_checkpointing=full"],
    "every-2": ["parallel.activation_checkpointing=every", "parallel.activation_checkpointing_every=2"],
}  # fmt: skip


def base_config(model: str) -> Path:
    """The shipped config for the shape if there is one, else the 7B one (shape overridden)."""
    shipped = REPO / "configs" / f"{model}.yaml"
    return shipped if shipped.is_file() else REPO / "configs" / "7b.yaml"


def obstacles(row: Published) -> list[str]:
    """Why our config cannot express this row's run; empty when it can."""
    why = []
    if max(row.pp, row.cp) > 1:
        why.append(f"PP {row.pp} / CP {row.cp} (we have FSDP/HSDP x TP)")
    if row.precision == "float8":
        why.append("float8 matmuls")
    if row.ac == "selective-op":
        why.append("per-op selective AC")
    elif row.ac == "selective":
        why.append("selective AC, share of blocks not published")
    elif row.ac not in AC:
        why.append(f"activation checkpointing {row.ac}")
    return why


def layout(row: Published) -> tuple[int, list[str]]:
    """GPUs to plan on, and the caveats of that choice and of the row's other settings."""
    caveats = [row.note] if row.note else []
    if row.compile:
        caveats.append("published with torch.compile, planned eager")
    if row.precision == "bf16-pure":
        caveats.append("published with bf16 parameters, planned with fp32 master")
    if row.shard_group:
        return row.shard_group, [
            *caveats,
            f"HSDP: planned as fsdp on one {row.shard_group}-GPU node",
        ]
    if row.gpus is None:
        return GPUS_PER_NODE, [*caveats, f"GPU count not published: planned on {GPUS_PER_NODE}"]
    return row.gpus, caveats


def overrides(row: Published, gpus: int, ac: str) -> list[str]:
    """Dotted overrides that give our config the row's settings on `gpus` ranks."""
    accum = row.grad_accum
    dp = gpus // row.tp  # micro_batch is per data-parallel rank (a TP group shares it)
    if accum is None:  # the published per-rank accumulation, where the global batch gives it
        per_step = row.micro_batch * ((row.gpus or gpus) // row.tp)
        ok = row.global_batch is not None and row.global_batch % per_step == 0
        accum = row.global_batch // per_step if ok else 1
    return [
        *SHAPES[row.model],
        f"model.max_seq_len={row.seq_len}",
        f"data.seq_len={row.seq_len}",
        "parallel.strategy=fsdp",
        "parallel.mixed_precision=bf16",
        f"parallel.tp={row.tp}",
        f"train.micro_batch_size={row.micro_batch}",
        f"train.global_batch_size={row.micro_batch * dp * accum}",
        *AC[ac],
    ]


def plan_row(plan: Callable, cluster_of: Callable, row: Published, gpus: int, ac: str) -> Any:
    """Our plan of the row's run; on the row's network where its source states one (as one
    NIC of the node's bandwidth: the planner uses their product), else the card's node's."""
    from pretrain.planner.estimate import Assumptions

    cfg = load_config(base_config(row.model), overrides(row, gpus, ac))
    nodes = max(1, gpus // GPUS_PER_NODE)
    cluster = cluster_of(nodes=nodes, gpus_per_node=gpus // nodes, gpu_type=row.gpu)
    net = {"nics_per_node": 1, "nic_gbit_s": row.node_gbit_s} if row.node_gbit_s else {}
    return plan(cfg, cluster, Assumptions(**net))


def planned_gib(p: Any, kind: str | None) -> tuple[float, str]:
    """Our figure to set against a published one of `kind`, and its label."""
    if kind == "active":
        return p.peak_bytes / GIB, "peak"
    return p.total_bytes / GIB, "peak+headroom"


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or not theirs else ours / theirs


def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def median_line(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name}: no comparable rows"
    lo, hi = min(values), max(values)
    return f"  {name}: median {statistics.median(values):.2f} (n={len(values)}, {lo:.2f}-{hi:.2f})"


def bracket(plan: Callable, cluster_of: Callable, row: Published, gpus: int) -> tuple[str, int]:
    """Our plans with full and with no checkpointing around a per-op selective figure, and
    how many of the published figures (tokens/s, memory) fall between the two."""
    parts, tok, mem = [], [], []
    for ac in ("full", "none"):
        p = plan_row(plan, cluster_of, row, gpus, ac)
        gib, label = planned_gib(p, row.memory_kind)
        tok.append(p.tokens_per_s / gpus)
        mem.append(gib)
        fits = "" if p.fits else ", does not fit"
        parts.append(f"{ac} AC {tok[-1]:,.0f} tok/s, {gib:.1f} GiB {label}{fits}")
    inside = sum(
        min(ours) <= theirs <= max(ours)
        for ours, theirs in ((tok, row.tokens_per_s), (mem, row.memory_gib))
        if theirs is not None
    )
    return "ours: " + "; ".join(parts), inside


def compare(plan: Callable, cluster_of: Callable, row: Published, gpus: int) -> tuple:
    """Table cells of a comparable row, and its two ratios (None where nothing published)."""
    p = plan_row(plan, cluster_of, row, gpus, row.ac)
    ours_tok = p.tokens_per_s / gpus
    tr = ratio(ours_tok, row.tokens_per_s)
    gib, _ = planned_gib(p, row.memory_kind)
    mr = ratio(gib, row.memory_gib)
    plan_gib = f"{gib:.1f}" + ("" if p.fits else "!")
    return f"{ours_tok:>10,.0f} {fmt(tr, '.2f'):>5}", plan_gib, fmt(mr, ".2f"), tr, mr


HEAD = (
    f"{'row':34} {'GPU':>13} {'n':>4} {'pub tok/s':>9} {'plan tok/s':>10} {'ratio':>5}"
    f" {'pub GiB':>13} {'plan GiB':>8} {'ratio':>5}"
)
FOOT = """\
plan GiB: peak + allocator headroom (set against 'reserved' and unlabelled figures), the
tracked peak only against 'active'; '!': the plan does not fit the card."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--match", default="", help="only rows whose key contains this")
    ap.add_argument(
        "--no-bracket", action="store_true", help="skip none/full plans of per-op AC rows"
    )
    ap.add_argument("--sources", action="store_true", help="print each row's source")
    args = ap.parse_args()
    rows = [r for r in PUBLISHED if args.match in r.key]
    try:
        from pretrain.planner import Cluster, plan
    except ImportError as e:
        plan = None
        print(f"planner not available ({e}): published figures only\n")
    print(HEAD)
    tok_ratios: dict[str, list[float]] = {}
    mem_ratios: list[float] = []
    notes: list[str] = []
    inside = checked = 0
    for row in rows:
        n = "?" if row.gpus is None else str(row.gpus)
        pub_gib = fmt(row.memory_gib, ".1f") + (f" {row.memory_kind}" if row.memory_kind else "")
        lead = f"{row.key:34} {row.gpu:>13} {n:>4} {fmt(row.tokens_per_s):>9}"
        why = obstacles(row)
        gpus, caveats = layout(row)
        if plan is None or why:
            reason = "not comparable: " + ", ".join(why) if why else "planner missing"
            print(f"{lead} {reason}  (published {pub_gib} GiB)", flush=True)
            if plan is not None and why == ["per-op selective AC"] and not args.no_bracket:
                text, k = bracket(plan, Cluster.of, row, gpus)
                inside += k
                checked += (row.tokens_per_s is not None) + (row.memory_gib is not None)
                print(f"{'':34} {text}", flush=True)
                notes += [f"{row.key}: {c}" for c in caveats]
            continue
        start = time.perf_counter()
        try:
            tok_cells, plan_gib, mem_ratio, tr, mr = compare(plan, Cluster.of, row, gpus)
        except ConfigError as e:
            print(f"{lead} plan failed: {e}", flush=True)
            continue
        took = time.perf_counter() - start
        print(f"{lead} {tok_cells} {pub_gib:>13} {plan_gib:>8} {mem_ratio:>5}  [{took:.0f}s]")
        if tr is not None:
            tok_ratios.setdefault(row.gpu, []).append(tr)
        if mr is not None:
            mem_ratios.append(mr)
        notes += [f"{row.key}: {c}" for c in caveats]
    print(FOOT)
    print("\nours / published (comparable rows):")
    for gpu, values in sorted(tok_ratios.items()):
        print(median_line(f"tokens/s per GPU, {gpu}", values))
    print(median_line("tokens/s per GPU, all", [v for vs in tok_ratios.values() for v in vs]))
    print(median_line("memory per GPU", mem_ratios))
    if checked:
        print(f"  per-op selective AC rows: {inside} of {checked} published figures lie between")
        print("  our plans with full and with no checkpointing")
    if notes:
        print("\ncaveats:\n  " + "\n  ".join(notes))
    if args.sources:
        print("\nsources:\n  " + "\n  ".join(f"{r.key}: {r.source}" for r in rows))


if __name__ == "__main__":
    main()
