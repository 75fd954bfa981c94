"""`pretrain plot`: the loss curves of one or several runs, drawn to a PNG (or PDF/SVG).

    pretrain plot RUN_DIR [RUN_DIR ...] --out FILE.png [--x step|tokens] [--label NAME ...]

Each run is read from RUN_DIR/metrics.jsonl: a line cut short by a kill is skipped, and a
step logged more than once (a resumed run re-logs the steps after its last checkpoint) keeps
its last record, the one that counts. The label is `run.name` from RUN_DIR/config.yaml
(else the folder name), made unique with the folder name where two runs share a name.

The figure is a 2x2 grid, one color per run, the legend in the first panel:
  1. training loss (solid) and validation loss (dashed, with markers), log y;
  2. learning rate;  3. throughput (tokens/s);
  4. training loss against the other x: tokens when --x step (the default), so runs with
     different batch sizes compare; steps when --x tokens, which puts all of 1-3 on tokens;
  5. with downstream task scores in any run (eval.tasks): a third column with eval/core
     and each task's score;
  6. with a mixture-of-experts run (step records with `moe_layers`): a third row with the
     load imbalance of each MoE layer (max / mean token copies per expert; 1 is balanced)
     and, where any is nonzero, the unweighted aux loss (solid) and z loss (dashed), the
     means over the layers. A dense run adds nothing there.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pretrain.errors import ConfigError
from pretrain.evals.records import is_eval_record, task_scores
from pretrain.files import atomic_open
from pretrain.rundir import RunDir
from pretrain.train.metrics import read_metrics

FORMATS = (".png", ".pdf", ".svg")
X_AXES = ("step", "tokens")


def load_run(run_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(training, validation, task-score records) of a run, one per step (the last), by step."""
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    scored: dict[int, dict] = {}
    for r in read_metrics(run_dir):
        if not isinstance(r, dict) or "event" in r or not isinstance(r.get("step"), int):
            continue
        if "loss" in r:
            train[r["step"]] = r
        elif "val_loss" in r:
            val[r["step"]] = r
        elif is_eval_record(r):
            scored[r["step"]] = r
    if not train:
        raise ConfigError(f"{run_dir}: no training metrics (metrics.jsonl) to plot")
    return tuple([d[s] for s in sorted(d)] for d in (train, val, scored))


def run_label(run_dir: Path) -> str:
    """`run.name` from the run's config.yaml, else the folder name."""
    try:
        name = RunDir(run_dir).read_config()["run"]["name"]
        if isinstance(name, str) and name:
            return name
    except Exception:  # no, or an unreadable, config: the folder is the name
        pass
    return Path(run_dir).resolve().name


def unique_labels(run_dirs: list[Path]) -> list[str]:
    labels = [run_label(d) for d in run_dirs]
    dup = {lab for lab in labels if labels.count(lab) > 1}
    labels = [
        f"{lab} ({Path(d).resolve().name})" if lab in dup else lab
        for lab, d in zip(labels, run_dirs, strict=True)
    ]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:  # same name and same folder name (different parents): number them
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 and labels.count(lab) == 1 else f"{lab} #{seen[lab]}")
    return out


def _series(records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """(xs, ys) over the records carrying both keys; a non-finite y becomes a gap (NaN)."""
    xs, ys = [], []
    for r in records:
        if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float)):
            xs.append(r[x])
            ys.append(r[y] if math.isfinite(r[y]) else math.nan)
    return xs, ys


def plot_runs(
    run_dirs: list[Path], out: Path, x: str = "step", labels: list[str] | None = None
) -> dict:
    """Draw the runs to `out` (written atomically); return {label: summary} in run order.

    A summary holds the run's "train" and "val" point counts (distinct steps), its "color",
    and the data drawn in the loss panel: "x"/"loss" (training) and "val_x"/"val_loss".
    """
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out {out}: must end in {', '.join(FORMATS)}")
    if x not in X_AXES:
        raise ConfigError(f"--x {x}: must be one of {', '.join(X_AXES)}")
    if not run_dirs:
        raise ConfigError("no run directories to plot")
    runs = [(Path(d), *load_run(Path(d))) for d in run_dirs]
    if labels is None:
        labels = unique_labels([d for d, *_ in runs])
    elif len(labels) != len(runs) or len(set(labels)) != len(labels):
        raise ConfigError(f"--label: {len(runs)} unique labels needed, got {labels}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex
    from matplotlib.ticker import EngFormatter, LogFormatter

    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    other = "tokens" if x == "step" else "step"
    with_tasks = any(scored for *_, scored in runs)
    with_moe = any("moe_layers" in r for _, train, *_ in runs for r in train)
    cols, rows = 3 if with_tasks else 2, 3 if with_moe else 2
    fig, axes = plt.subplots(
        rows, cols, figsize=(6.5 * cols, 4.25 * rows), dpi=110, constrained_layout=True
    )
    (ax_loss, ax_lr, *ax_tasks), (ax_tps, ax_other, *spare) = axes[:2]
    ax_moe, ax_moe_loss, *more = axes[2] if with_moe else (None, None)
    for ax in spare + more:
        ax.set_visible(False)
    summary: dict[str, dict] = {}
    for i, ((_, train, val, scored), label) in enumerate(zip(runs, labels, strict=True)):
        color = to_hex(cmap(i % cmap.N))
        (line,) = ax_loss.plot(*_series(train, x, "loss"), color=color, lw=1.5, label=label)
        # validation lines carry no token count: take it from the training record of the step
        tokens = {r["step"]: r.get("tokens") for r in train}
        val = [{**r, "tokens": tokens.get(r["step"])} for r in val]
        vx, vy = _series(val, x, "val_loss")
        (vline,) = ax_loss.plot(vx, vy, color=color, ls="--", marker="o", ms=4, lw=1.2)
        ax_lr.plot(*_series(train, x, "lr"), color=color, lw=1.5)
        ax_tps.plot(*_series(train, x, "tokens_per_s"), color=color, lw=1.5)
        ax_other.plot(*_series(train, other, "loss"), color=color, lw=1.5)
        tokens = {r["step"]: r.get("tokens") for r in train}
        scored = [{**r, "tokens": tokens.get(r["step"])} for r in scored]
        if ax_tasks:
            tasks = _draw_tasks(ax_tasks[0], scored, x, color)
        summary[label] = {
            "train": len(train),
            "val": len(val),
            "color": color,
            "x": [float(v) for v in line.get_xdata()],
            "loss": [float(v) for v in line.get_ydata()],
            "val_x": [float(v) for v in vline.get_xdata()],
            "val_loss": [float(v) for v in vline.get_ydata()],
        }
        if ax_tasks:
            summary[label]["tasks"] = tasks
        if with_moe and any("moe_layers" in r for r in train):
            summary[label]["moe"] = _draw_moe(ax_moe, ax_moe_loss, train, x, color)
    panels = [
        (ax_loss, "Loss (train solid, validation dashed)", x, "loss"),
        (ax_lr, "Learning rate", x, "lr"),
        (ax_tps, "Throughput", x, "tokens/s"),
        (ax_other, f"Training loss against {other}", other, "loss"),
    ]
    if ax_tasks:
        title = "Downstream tasks (core solid, each task's score dashed)"
        panels.append((ax_tasks[0], title, x, "score"))
    if with_moe:
        panels.append((ax_moe, "MoE load imbalance per layer (max / mean)", x, "imbalance"))
        if any("aux_loss" in s.get("moe", {}) or "z_loss" in s.get("moe", {}) for s in summary.values()):  # fmt: skip
            panels.append((ax_moe_loss, "MoE aux loss (solid), z loss (dashed)", x, "loss"))
        else:
            ax_moe_loss.set_visible(False)
    for ax, title, xl, yl in panels:
        ax.set_title(title)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
        if xl == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    for ax in (ax_loss, ax_other):
        if all(v > 0 for s in summary.values() for v in s["loss"] + s["val_loss"] if v == v):
            ax.set_yscale("log")  # plain numbers on the ticks, not 8x10^0
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_tps.yaxis.set_major_formatter(EngFormatter(sep=""))
    ax_loss.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"{len(runs)} run{'s' * (len(runs) != 1)}: {', '.join(labels)}")

    try:
        with atomic_open(out) as f:
            fig.savefig(f, format=out.suffix[1:].lower())
    finally:
        plt.close(fig)
    return summary


def _draw_tasks(ax, scored: list[dict], x: str, color: str) -> dict[str, list[float]]:
    """Core (solid) and each task's score (dashed, labelled at its last point) of one run;
    returns {"x", "core", TASK: scores} as drawn."""
    names = list(dict.fromkeys(n for r in scored for n in task_scores(r)))
    xs, core = _series(scored, x, "eval/core")
    ax.plot(xs, core, color=color, lw=1.8, marker="o", ms=3)
    drawn = {"x": [float(v) for v in xs], "core": [float(v) for v in core]}
    for name in names:
        tx, ty = _series(scored, x, f"eval/{name}")
        ax.plot(tx, ty, color=color, lw=1, ls="--", alpha=0.8)
        if tx:
            ax.annotate(name, (tx[-1], ty[-1]), fontsize="x-small", color=color)
        drawn[name] = [float(v) for v in ty]
    return drawn


def _draw_moe(ax, ax_loss, train: list[dict], x: str, color: str) -> dict:
    """Each MoE layer's load imbalance (a line style per layer, labelled at its last point),
    and the mean aux and z losses where any is nonzero, of one run; returns {"x",
    "imbalance": {block: values}, "aux_loss", "z_loss" (those drawn)} as drawn."""
    moe = [r for r in train if isinstance(r.get("moe_layers"), dict)]
    layers = sorted({i for r in moe for i in r["moe_layers"]}, key=int)
    styles = ("-", "--", ":", "-.")
    drawn: dict = {"x": [], "imbalance": {}}
    for n, layer in enumerate(layers):
        rows = [{**r, "imbalance": r["moe_layers"].get(layer, {}).get("imbalance")} for r in moe]
        lx, ly = _series(rows, x, "imbalance")
        ax.plot(lx, ly, color=color, lw=1.2, ls=styles[n % len(styles)])
        if lx:
            ax.annotate(f"L{layer}", (lx[-1], ly[-1]), fontsize="x-small", color=color)
        drawn["imbalance"][layer] = [float(v) for v in ly]
        drawn["x"] = [float(v) for v in lx] if len(lx) > len(drawn["x"]) else drawn["x"]
    for key, ls in (("moe_aux_loss", "-"), ("moe_z_loss", "--")):
        lx, ly = _series(moe, x, key)
        if any(v != 0 for v in ly):
            ax_loss.plot(lx, ly, color=color, lw=1.2, ls=ls)
            drawn[key.removeprefix("moe_")] = [float(v) for v in ly]
    return drawn


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pretrain plot", description="Loss curves of one or several runs to an image."
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, required=True, help="FILE.png (or .pdf, .svg)")
    parser.add_argument(
        "--x", choices=X_AXES, default="step", help="x axis of the panels (default: step)"
    )
    parser.add_argument("--label", action="append", help="a run's label, once per RUN_DIR in order")
    args = parser.parse_args(argv)
    summary = plot_runs(args.run_dirs, args.out, x=args.x, labels=args.label)
    n = len(summary)
    print(f"{args.out}: {n} run{'s' * (n != 1)} ({', '.join(summary)})")
    return 0
