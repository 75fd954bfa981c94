"""Mixture of experts on the CPU demo: does the expert bias balance the load, and is the MoE
twin better than the dense model at equal steps and equal active parameters?

Three runs of `pretrain train`, one after the other, on the demo's MDS shards with the same
seed, data order, batch and schedule (--steps steps, 300: the demo's length):
  (a) configs/tiny-moe.yaml as it is (balance: bias, its bias_update_rate);
  (b) configs/tiny-moe.yaml with model.moe.balance=none (routing left to the router alone);
  (c) configs/tiny.yaml, the dense model: the same active parameters as (a) and (b), since
      each token goes through 2 of 8 experts of half the dense MLP's width.
Printed from each run's metrics.jsonl: the load imbalance (max over the MoE layers of the
most loaded expert's token copies over the mean) at steps 50, 100, 200 and the last, for
(a) and (b); the validation loss at the last step (train.eval_every, eval_batches as in
the configs); and tokens/s, the mean of the logged step times after --warmup steps. The
acceptance: with the bias, the imbalance falls below 1.3 by the last step and stays
higher without it. Downstream tasks and checkpoints are off (they cost all runs alike).
The runs take turns on the same cores, so other load on the machine moves every figure
of tokens/s; the losses and imbalances do not depend on it. With --together they run at
once, one thread each (parallel.threads=1), so on a machine shared with other jobs all
three see the same load over the same minutes (and the whole takes about a third as long).

    python bench/moe.py [--steps 300] [--warmup 10] [--runs a,b,c] [--together] [key=value ...]

key=value overrides go to the MoE runs only, e.g. model.moe.bias_update_rate=0.01.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multirank import REPO, ensure_demo_data

sys.path.insert(0, str(REPO))

from pretrain.train.metrics import read_metrics

RUNS = {
    "a": ("tiny-moe, bias", "configs/tiny-moe.yaml", []),
    "b": ("tiny-moe, none", "configs/tiny-moe.yaml", ["model.moe.balance=none"]),
    "c": ("tiny (dense)", "configs/tiny.yaml", []),
}
AT = (50, 100, 200)


def start(config: str, overrides: list[str], run: Path, threads: int | None) -> subprocess.Popen:
    """Start `pretrain train`, its output to RUN.log."""
    cmd = [sys.executable, "-m", "pretrain", "train", config, f"run.dir={run}", *overrides]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    log = open(f"{run}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait(job: subprocess.Popen, run: Path) -> None:
    if job.wait():
        sys.exit(
            f"bench run failed: {' '.join(job.args)}\n{Path(f'{run}.log').read_text()[-4000:]}"
        )


def summary(run: Path, warmup: int) -> dict:
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r and "loss" not in r]
    timed = steps[warmup:]
    tokens = steps[1]["tokens"] - steps[0]["tokens"]
    return {
        "last": steps[-1]["step"],
        "loss": steps[-1]["loss"],
        "val": vals[-1]["val_loss"] if vals else None,
        "val_step": vals[-1]["step"] if vals else None,
        "tokens_per_s": tokens / statistics.mean(r["step_s"] for r in timed),
        "imbalance": {r["step"]: r["moe_imbalance"] for r in steps if "moe_imbalance" in r},
        "layers": steps[-1].get("moe_layers", {}),
        "bias_range": steps[-1].get("moe_bias_range"),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", default="a,b,c", help="which of a, b, c to run")
    p.add_argument("--together", action="store_true", help="at once, one thread each")
    p.add_argument("overrides", nargs="*", help="config overrides for the MoE runs")
    args = p.parse_args()
    ensure_demo_data()
    common = [
        f"train.max_steps={args.steps}", "checkpoint.every=0", "eval.every=0",
        "logging.wandb=false", "train.log_every=10",
    ]  # fmt: skip
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        threads = ["parallel.threads=1"] if args.together else []
        jobs, walls = {}, {}
        for key in args.runs.split(","):
            _, config, extra = RUNS[key]
            moe = args.overrides if "moe" in config else []
            jobs[key] = (time.perf_counter(), start(config, [*common, *threads, *extra, *moe], Path(tmp) / key, 1 if threads else None))  # fmt: skip
            if not args.together:
                wait(jobs[key][1], Path(tmp) / key)
                walls[key] = time.perf_counter() - jobs[key][0]
        while len(walls) < len(jobs):  # --together: each run's own wall time
            for key, (began, job) in jobs.items():
                if key not in walls and job.poll() is not None:
                    wait(job, Path(tmp) / key)
                    walls[key] = time.perf_counter() - began
            time.sleep(0.5)
        for key in jobs:
            out[key] = {**summary(Path(tmp) / key, args.warmup), "wall": walls[key]}
            print(
                f"# ran ({key}) {RUNS[key][0]} in {walls[key]:.0f} s", file=sys.stderr, flush=True
            )

    last = args.steps
    at = [s for s in AT if s < last] + [last]
    how = "at once, 1 thread each" if args.together else "one after the other"
    print(f"{args.steps} steps of the demo (same seed, data, schedule), runs {how}; MoE overrides: {' '.join(args.overrides) or 'none'}")  # fmt: skip
    moes = [k for k in ("a", "b") if k in out]
    if moes:
        print("\nload imbalance (max over MoE layers of max/mean token copies per expert)")
        print(f"{'run':<16}" + "".join(f"{'step ' + str(s):>10}" for s in at) + "  worst layer at end")  # fmt: skip
        for k in moes:
            imb, layers = out[k]["imbalance"], out[k]["layers"]
            worst = max(layers, key=lambda i: layers[i]["imbalance"]) if layers else "-"
            row = "".join(f"{imb[s]:>10.3f}" if s in imb else f"{'-':>10}" for s in at)
            print(f"{RUNS[k][0]:<16}{row}  block {worst}, bias range {out[k]['bias_range']:.4f}")
        if "a" in out:
            ok = out["a"]["imbalance"].get(last, 9e9) < 1.3
            higher = "b" not in out or out["b"]["imbalance"].get(last, 0) > out["a"]["imbalance"].get(last, 9e9)  # fmt: skip
            print(f"bias below 1.3 at step {last}: {'yes' if ok else 'NO'}; higher without it: {'yes' if higher else 'NO'}")  # fmt: skip
    print(f"\n{'run':<16}{'train loss':>11}{'val loss':>10}{'tokens/s':>10}{'wall s':>8}")
    for k, r in out.items():
        val = f"{r['val']:>10.4f}" if r["val"] is not None else f"{'-':>10}"
        print(f"{RUNS[k][0]:<16}{r['loss']:>11.4f}{val}{r['tokens_per_s']:>10,.0f}{r['wall']:>8.0f}")  # fmt: skip
    if "a" in out and "c" in out and out["a"]["val"] is not None and out["c"]["val"] is not None:
        a, c = out["a"], out["c"]
        lower = "MoE (a)" if a["val"] < c["val"] else "dense (c)"
        print(f"\nval loss at step {a['val_step']}, equal active parameters: MoE {a['val']:.4f} vs dense {c['val']:.4f}, {lower} lower by {abs(a['val'] - c['val']):.4f}")  # fmt: skip
        print(f"tokens/s MoE over dense: {a['tokens_per_s'] / c['tokens_per_s']:.2f}x (measured in this run, same cores)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
