"""Downstream evaluation's cost against training, on this machine, at configs/tiny.yaml's
own settings (its model, batch, eval.every, eval.batch_size and tasks).

In one process, one after the other:
  1. train: `Trainer.fit()` of tiny.yaml for --steps steps on the demo's MDS shards (task
     scoring off); tokens/s from the logged step times after --warmup steps;
  2. eval: that trainer's `evaluate_tasks()`, --repeats passes over tiny.yaml's tasks (the
     `make demo` files), the same code the training loop runs every eval.every steps;
     the median pass in seconds, examples/s, sequences/s (one per choice) and tokens/s;
  3. share: a full run (train.max_steps steps, a pass every eval.every steps and at the
     last) spends passes x pass time out of that plus max_steps x step time on scoring.
The issue's bar is under 5% at tiny.yaml's defaults. Both sides run on the same rank with
the same threads, so other load on the machine moves both.

    python bench/eval.py [--steps 20] [--warmup 3] [--repeats 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from multirank import REPO, ensure_demo_data


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="extra config overrides (e.g. eval.batch_size=32)")
    args = p.parse_args()
    ensure_demo_data()
    if not (REPO / "data/shakespeare/tasks/word_order.jsonl").exists():
        subprocess.run(["make", "-C", str(REPO), "data/shakespeare/tasks/word_order.jsonl"], check=True)  # fmt: skip

    from pretrain.checkpoint.ranks import Ranks
    from pretrain.config.load import load_config
    from pretrain.evals.evaluator import Evaluator
    from pretrain.train.metrics import read_metrics
    from pretrain.train.trainer import Trainer

    base = load_config(REPO / "configs/tiny.yaml", args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        total = args.warmup + args.steps
        cfg = load_config(REPO / "configs/tiny.yaml", [*args.overrides, f"run.dir={tmp}/run",
                          f"train.max_steps={total}", f"train.eval_every={10**9}",
                          "checkpoint.every=0", "eval.every=0", "logging.wandb=false"])  # fmt: skip
        trainer = Trainer(cfg)
        trainer.save = lambda: None  # only steps are timed: no final checkpoint
        trainer.fit()
        steps = [r for r in read_metrics(Path(tmp) / "run") if "loss" in r][args.warmup :]
        step_s = statistics.mean(r["step_s"] for r in steps)
        tokens_per_s = trainer.tokens_per_step / step_s

        trainer.evaluator = Evaluator(base.eval, trainer.tokenizer, cfg.model.max_seq_len, Ranks.current(), trainer.device)  # fmt: skip
        ev = trainer.evaluator
        examples = sum(t.scored for t in ev.tasks)
        passes = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            trainer.evaluate_tasks()
            passes.append(time.perf_counter() - start)
        trainer.close()

    pass_s = statistics.median(passes)
    t, e = base.train, base.eval
    n_passes = t.max_steps // e.every + (t.max_steps % e.every != 0) if e.every else 0
    train_s = t.max_steps * step_s
    share = n_passes * pass_s / (train_s + n_passes * pass_s)
    print(f"training : {tokens_per_s:,.0f} tokens/s ({step_s * 1e3:.0f} ms a step of {trainer.tokens_per_step:,} tokens, mean of {len(steps)} steps)")  # fmt: skip
    print(f"scoring  : {examples / pass_s:,.1f} examples/s, {ev.sequences / pass_s:,.1f} sequences/s, {ev.tokens / pass_s:,.0f} tokens/s")  # fmt: skip
    print(f"           a pass: {examples} examples, {ev.sequences} sequences, {ev.tokens:,} tokens in {pass_s:.2f} s (median of {', '.join(f'{s:.2f}' for s in passes)})")  # fmt: skip
    print(f"           scoring tokens/s over training tokens/s: {ev.tokens / pass_s / tokens_per_s:.2f}x (forward only against forward + backward)")  # fmt: skip
    print(f"run      : {t.max_steps} steps = {train_s:.0f} s of training; {n_passes} passes (eval.every={e.every}) = {n_passes * pass_s:.1f} s")  # fmt: skip
    verdict = "under" if share < 0.05 else "OVER"
    print(f"share    : {100 * share:.1f}% of the run's time is scoring ({verdict} the 5% bar)")
    return 0 if math.isfinite(share) else 1


if __name__ == "__main__":
    sys.exit(main())
