"""Trainer throughput and MFU against this machine's own measured matmul peak.

First, in this one process, one after the other:
  1. peak: the best fp32 FLOP/s of square matmuls (the MFU denominator), measured first
     and again at the very end; other load on the machine only lowers it, so the higher
     of the two is used;
  2. plain: a bare PyTorch loop (forward, backward, AdamW step) on the same model with
     batches already in memory: what the hardware gives this model;
  3. trainer: `Trainer.fit()` on real MDS shards of the Shakespeare demo data, with logging
     to metrics.jsonl; its final checkpoint and evaluation are timed and taken out.
The trainer's overhead is 1 - plain step time / trainer step time; the bare loop runs
before and after the trainer, and the spread of the two shows the machine's noise.

Then, per strategy (ddp, fsdp, DeepSpeed ZeRO stages 1-3), `Trainer.fit()` again under
real torchrun: 2 ranks, gloo, fp32, the same model and global batch (micro-batch 4 per
rank), each rank with half the cores as threads (1 on a 2-core machine: the whole machine
is shared by the ranks, so total tokens/s is the honest comparison). Each strategy's
tokens/s is the global batch over the mean logged step time after `--dist-warmup` steps,
and is compared with the single-process trainer's, measured the same way (its logged steps
after `--warmup`) in the same invocation. MFU for every row is against the same measured
peak of the whole machine (all cores, 1. above), so MFU ratios equal tokens/s ratios.
The 1-min load average printed at start and end includes this bench's own processes
(about one per core); more than that means something else shared the machine.

Model (from the issue): 6 layers, d_model 384, 6 heads, seq 256, batch 8, GELU MLP,
learned positions, vocabulary 16384 (the 4096-piece demo tokenizer, padded), ~17M params.

    python bench/throughput.py [--steps 12] [--warmup 3] [--dist-steps 4] [--dist-warmup 1]
                               [--strategies ddp fsdp zero-1 zero-2 zero-3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from multirank import REPO, STRATEGIES, ensure_demo_data, torchrun

sys.path.insert(0, str(REPO))

from pretrain.config import load_config
from pretrain.metrics import measure_matmul_flops, read_metrics
from pretrain.model import Transformer, count_params, flops_per_token
from pretrain.optim import build_optimizer

MODEL = [
    "model.vocab_size=16384", "model.d_model=384", "model.n_layers=6", "model.n_heads=6",
    "model.n_kv_heads=null", "model.mlp=gelu", "model.position=learned", "model.max_seq_len=256",
    "data.seq_len=256", "data.allow_vocab_padding=true",
    "train.global_batch_size=8", "train.micro_batch_size=8",
]  # fmt: skip


def peak() -> float:
    cpu = torch.device("cpu")
    return max(measure_matmul_flops(cpu, n=n, seconds=1.5) for n in (512, 1024, 2048))


def plain_loop(cfg, batches: list[torch.Tensor], steps: int, warmup: int) -> float:
    """Seconds per step of a bare loop on in-memory batches: what the hardware gives."""
    torch.manual_seed(cfg.run.seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    times = []
    for i in range(warmup + steps):
        tokens = batches[i % len(batches)]
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return sum(times[warmup:]) / steps


def run_overrides(run_dir: Path, steps: int) -> list[str]:
    """The bench model, trained `steps` steps into `run_dir`: one evaluation of one batch
    and one checkpoint, both at the end (timed in the metrics, and taken out)."""
    return [
        *MODEL, f"run.dir={run_dir}", f"train.max_steps={steps}", f"train.eval_every={steps}",
        "train.eval_batches=1", "checkpoint.every=0", "train.log_every=1000",
        "schedule.warmup_steps=2", "parallel.mixed_precision=fp32",
    ]  # fmt: skip


def steady_step_s(run_dir: Path, warmup: int) -> float:
    """Mean logged step time after the first `warmup` steps."""
    steps = [r["step_s"] for r in read_metrics(run_dir) if "loss" in r and r["step"] > warmup]
    return sum(steps) / len(steps)


def worker(strategy: str, steps: int, out: Path) -> None:
    """One rank of a 2-rank trainer run; rank 0 writes the run's metrics.jsonl."""
    from pretrain.trainer import Trainer

    overrides = run_overrides(out / strategy, steps)
    cfg = load_config(
        REPO / "configs/tiny.yaml", [*overrides, "train.micro_batch_size=4", *STRATEGIES[strategy]]
    )
    trainer = Trainer(cfg)
    trainer.fit()
    rank = trainer.strategy.rank
    trainer.close()
    (out / f"{strategy}-rank{rank}.json").write_text(
        json.dumps({"threads": torch.get_num_threads()})
    )


def two_rank_runs(strategies: list[str], steps: int, warmup: int, out: Path) -> dict[str, dict]:
    """Per strategy, run in `out`: mean step seconds after warmup, each rank's threads."""
    threads = max(1, (os.cpu_count() or 2) // 2)
    results = {}
    for strategy in strategies:
        worker_args = [
            "--worker", strategy, "--dist-steps", str(steps), "--dist-warmup", str(warmup),
            "--out", str(out),
        ]  # fmt: skip
        torchrun(__file__, worker_args, nproc=2, threads=threads)
        ranks = [json.loads((out / f"{strategy}-rank{r}.json").read_text()) for r in (0, 1)]
        results[strategy] = {
            "step_s": steady_step_s(out / strategy, warmup),
            "threads": [r["threads"] for r in ranks],
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--strategies", nargs="*", default=list(STRATEGIES), choices=STRATEGIES,
        help="2-rank runs after the single-process ones (none: single process only)",
    )  # fmt: skip
    parser.add_argument("--dist-steps", type=int, default=4, help="timed steps per 2-rank run")
    parser.add_argument("--dist-warmup", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.dist_warmup + args.dist_steps, args.out)
        return
    ensure_demo_data()
    load_start = os.getloadavg()[0]  # anything else running skews every figure below
    from pretrain.trainer import Trainer

    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cfg = load_config(REPO / "configs/tiny.yaml", run_overrides(run_dir, total))
        trainer = Trainer(cfg)
        # The bare loop trains on real batches of the same data, copied out before the run.
        batches = [trainer.train_data.next() for _ in range(4)]
        peak_first = peak()
        # The bare loop runs before and after the trainer: their spread is this machine's noise.
        before = plain_loop(cfg, batches, args.steps, args.warmup)
        start = time.perf_counter()
        trainer.fit()
        elapsed = time.perf_counter() - start
        trainer.close()
        after = plain_loop(cfg, batches, args.steps, args.warmup)
        records = read_metrics(run_dir)
        single_s = steady_step_s(run_dir, args.warmup)
        # In `tmp`: the trainer pointed this process's TMPDIR into its run directory.
        two_rank = two_rank_runs(args.strategies, args.dist_steps, args.dist_warmup, Path(tmp))
    peak_last = peak()
    peak_flops = max(peak_first, peak_last)

    # fit() also ran the final evaluation and checkpoint: take their timed share out.
    steps = [r for r in records if "loss" in r]
    side = sum(r.get("save_s", 0) + r.get("eval_s", 0) for r in records)
    trainer_s = (elapsed - side) / len(steps)
    data_frac = sum(r["data_s"] for r in steps) / sum(r["step_s"] for r in steps)
    plain_s = (before + after) / 2
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)

    print(
        f"model: {count_params(cfg.model) / 1e6:.1f}M params, {fpt / 1e6:.1f} MFLOP/token, "
        f"{tokens} tokens/step, {torch.get_num_threads()} threads"
    )
    print(
        f"measured fp32 matmul peak: {peak_flops / 1e9:.1f} GFLOP/s (first / last: "
        f"{peak_first / 1e9:.1f} / {peak_last / 1e9:.1f}); 1-min load average at start / end: "
        f"{load_start:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for name, sec in (("plain PyTorch loop", plain_s), ("pretrain trainer", trainer_s)):
        mfu = fpt * tokens / sec / peak_flops
        print(f"{name:>20}: {sec * 1e3:8.1f} ms/step {tokens / sec:8.0f} tok/s  MFU {mfu:6.1%}")
    print(
        f"plain loop before / after the trainer: {before * 1e3:.1f} / {after * 1e3:.1f} ms/step "
        f"(spread {abs(before - after) / plain_s:.1%}: the machine's noise)"
    )
    print(
        f"trainer overhead vs plain loop: {1 - plain_s / trainer_s:+.2%} of step time (target < 3%)"
    )
    print(f"time waiting for data: {data_frac:.2%} of step time (target < 1%)")
    if not two_rank:
        return
    print(
        f"trainer, 1 process vs 2 ranks (torchrun, gloo, fp32, {os.cpu_count()} cores); "
        f"steps after warmup: {args.steps} (1 process), {args.dist_steps} (2 ranks)"
    )
    print(f"{'run':>10} {'threads':>9} {'ms/step':>9} {'tok/s':>7} {'MFU':>6} {'vs 1 process':>13}")
    rows = [("1 process", str(torch.get_num_threads()), single_s)]
    rows += [(s, " + ".join(map(str, r["threads"])), r["step_s"]) for s, r in two_rank.items()]
    for name, threads, sec in rows:
        mfu = fpt * tokens / sec / peak_flops
        print(
            f"{name:>10} {threads:>9} {sec * 1e3:9.1f} {tokens / sec:7.0f} {mfu:6.1%} "
            f"{single_s / sec:12.2f}x"
        )


if __name__ == "__main__":
    main()
