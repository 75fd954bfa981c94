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

Last, host syncs: `Trainer.fit()` with the per-step syncs of earlier versions (the gradient
norm read before every update, loss and norm read every step, the preemption flag
all-reduced and read every step) against the deferred ones (a fused AdamW skips non-finite
steps on the device, numbers are read every train.log_every steps, the preemption flag is
agreed one step late), in this one invocation, rounds alternating which goes first: the
bench model and a small one (2 layers, d_model 128, 4,096-piece vocabulary, 1,024 tokens
a step: short steps, where per-step host work weighs more) in one process, and the small
one on 2 ranks (ddp: there the per-step version also all-reduces the preemption flag).
Tokens/s there come from the wall-clock stamps of the step records after the warm-up steps
(each stamped when its step was queued), so they include what the loop does between steps,
which step_s does not. On CPU an op has finished when its call returns, so a read costs
little; the gain this measures is on GPUs, where each read stalls the device's queue.

Model (from the issue): 6 layers, d_model 384, 6 heads, seq 256, batch 8, GELU MLP,
learned positions, vocabulary 16384 (the 4096-piece demo tokenizer, padded), ~17M params.

    python bench/throughput.py [--steps 12] [--warmup 3] [--dist-steps 4] [--dist-warmup 1]
                               [--strategies ddp fsdp zero-1 zero-2 zero-3]
                               [--sync-rounds 2] [--sync-steps 6] [--small-steps 40]
                               [--sync-strategy ddp] [--sync-only]
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

from pretrain.config.load import load_config
from pretrain.model import Transformer, count_params, flops_per_token
from pretrain.train.metrics import read_metrics
from pretrain.train.optim import build_optimizer
from pretrain.train.peak import measure_matmul_flops

MODEL = [
    "model.vocab_size=16384", "model.d_model=384", "model.n_layers=6", "model.n_heads=6",
    "model.n_kv_heads=null", "model.mlp=gelu", "model.position=learned", "model.max_seq_len=256",
    "data.seq_len=256", "data.allow_vocab_padding=true",
    "train.global_batch_size=8", "train.micro_batch_size=8",
]  # fmt: skip


# The sync comparison's small model and batch: steps short enough that per-step host work
# shows (the demo tokenizer's own 4,096-piece vocabulary, 1,024 tokens a step).
SMALL = [
    "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=4096",
    "train.global_batch_size=4", "train.micro_batch_size=4",
]  # fmt: skip
SYNC_MODES = ("per-step", "deferred")
# Numbers read every 10 steps (the default); one thread, whose speed a loaded machine
# disturbs less than that of threads waiting for each other at every op.
SYNC_RUN = ["train.log_every=10", "parallel.threads=1"]


def set_sync_mode(trainer, mode: str) -> None:
    """`per-step`: read and agree on everything at every step, as before deferred syncs
    (including the host-checked skip of a non-finite step); `deferred`: the default."""
    trainer.sync_every_step = trainer.strategy.host_sync_skip = mode == "per-step"


def peak() -> float:
    return measure_matmul_flops(torch.float32, budget_s=4.5)


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


def wall_tokens_per_s(run_dir: Path, warmup: int) -> float:
    """Tokens/s after the first `warmup` (>= 1) steps, from the step records' wall-clock
    stamps: everything the loop does between steps included."""
    stamps = sorted(
        (r["step"], r["tokens"], r["time"]) for r in read_metrics(run_dir) if "loss" in r
    )
    (_, first, start), (_, last, end) = stamps[warmup - 1], stamps[-1]
    return (last - first) / (end - start)


def worker(strategy: str, steps: int, out: Path, name: str, sync: str, small: bool) -> None:
    """One rank of a 2-rank trainer run into `out/name`; rank 0 writes its metrics.jsonl."""
    from pretrain.train.trainer import Trainer

    overrides = [*run_overrides(out / name, steps), "train.micro_batch_size=4"]
    if small:  # 2 sequences per rank
        overrides += [*SMALL, *SYNC_RUN, "train.micro_batch_size=2"]
    cfg = load_config(REPO / "configs/tiny.yaml", [*overrides, *STRATEGIES[strategy]])
    trainer = Trainer(cfg)
    set_sync_mode(trainer, sync)
    trainer.fit()
    rank = trainer.strategy.rank
    trainer.close()
    (out / f"{name}-rank{rank}.json").write_text(json.dumps({"threads": torch.get_num_threads()}))


def two_rank_run(
    strategy: str, steps: int, warmup: int, out: Path, name: str, sync="deferred", small=False
) -> Path:
    """A 2-rank trainer run of `warmup + steps` steps; returns its run directory."""
    threads = max(1, (os.cpu_count() or 2) // 2)
    worker_args = [
        "--worker", strategy, "--dist-steps", str(steps), "--dist-warmup", str(warmup),
        "--out", str(out), "--name", name, "--sync", sync, *(["--small"] if small else []),
    ]  # fmt: skip
    torchrun(__file__, worker_args, nproc=2, threads=threads)
    return out / name


def two_rank_runs(strategies: list[str], steps: int, warmup: int, out: Path) -> dict[str, dict]:
    """Per strategy, run in `out`: mean step seconds after warmup, each rank's threads."""
    results = {}
    for strategy in strategies:
        run_dir = two_rank_run(strategy, steps, warmup, out, strategy)
        ranks = [json.loads((out / f"{strategy}-rank{r}.json").read_text()) for r in (0, 1)]
        results[strategy] = {
            "step_s": steady_step_s(run_dir, warmup),
            "threads": [r["threads"] for r in ranks],
        }
    return results


def sync_comparison(args, out: Path) -> dict[str, dict[str, list[float]]]:
    """Per setup, per sync mode: tokens/s (wall clock) of each round."""
    from pretrain.train.trainer import Trainer

    def one_process(run_dir: Path, model: list[str], steps: int, mode: str) -> float:
        total = args.warmup + steps
        overrides = [*run_overrides(run_dir, total), *model, *SYNC_RUN]
        cfg = load_config(REPO / "configs/tiny.yaml", overrides)
        trainer = Trainer(cfg)
        set_sync_mode(trainer, mode)
        trainer.fit()
        trainer.close()
        return wall_tokens_per_s(run_dir, args.warmup)

    def two_ranks(run_dir: Path, model: list[str], steps: int, mode: str) -> float:
        strategy, warmup = args.sync_strategy, args.dist_warmup
        two_rank_run(strategy, steps, warmup, run_dir.parent, run_dir.name, mode, bool(model))
        return wall_tokens_per_s(run_dir, warmup)

    setups = []
    if args.sync_steps:
        setups.append(("bench model, 1 process", one_process, [], args.sync_steps))
    if args.small_steps:
        setups.append(("small model, 1 process", one_process, SMALL, args.small_steps))
        if args.sync_strategy:
            name = f"small model, 2 ranks ({args.sync_strategy})"
            setups.append((name, two_ranks, SMALL, args.small_steps))
    results: dict[str, dict[str, list[float]]] = {}
    for r in range(args.sync_rounds):
        for i, (setup, run, model, steps) in enumerate(setups):
            for mode in SYNC_MODES if r % 2 == 0 else SYNC_MODES[::-1]:
                rate = run(out / f"sync{i}-{mode}-{r}", model, steps, mode)
                results.setdefault(setup, {}).setdefault(mode, []).append(rate)
    return results


def print_sync_comparison(results: dict[str, dict[str, list[float]]]) -> None:
    print(
        "host syncs: per-step (as before) vs deferred; tokens/s from wall-clock step stamps "
        "after warmup, mean over rounds (each round's in brackets)"
    )
    print(f"{'setup':>28} {'per-step tok/s':>34} {'deferred tok/s':>34} {'ratio':>7}")
    for setup, modes in results.items():
        mean = {mode: sum(rates) / len(rates) for mode, rates in modes.items()}
        cells = {
            mode: f"{mean[mode]:.0f} [{' '.join(f'{x:.0f}' for x in rates)}]"
            for mode, rates in modes.items()
        }
        ratio = mean["deferred"] / mean["per-step"]
        print(f"{setup:>28} {cells['per-step']:>34} {cells['deferred']:>34} {ratio:6.3f}x")


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
    parser.add_argument(
        "--sync-rounds", type=int, default=2,
        help="rounds of the per-step vs deferred syncs comparison (0: skip it)",
    )  # fmt: skip
    parser.add_argument(
        "--sync-steps", type=int, default=6, help="timed steps, bench model (0: not this one)"
    )
    parser.add_argument(
        "--small-steps", type=int, default=40, help="timed steps, small model (0: not this one)"
    )
    parser.add_argument(
        "--sync-only", action="store_true", help="only the per-step vs deferred syncs comparison"
    )
    parser.add_argument(
        "--sync-strategy", default="ddp", choices=[*STRATEGIES, ""],
        help="2-rank strategy of the sync comparison ('': one process only)",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sync", default="deferred", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        steps = args.dist_warmup + args.dist_steps
        worker(args.worker, steps, args.out, args.name, args.sync, args.small)
        return
    ensure_demo_data()
    load_start = os.getloadavg()[0]  # anything else running skews every figure below
    if args.sync_only:
        with tempfile.TemporaryDirectory() as tmp:
            syncs = sync_comparison(args, Path(tmp))
        print(
            f"1-min load average at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} "
            f"on {os.cpu_count()} cores"
        )
        print_sync_comparison(syncs)
        return
    from pretrain.train.trainer import Trainer

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
        syncs = sync_comparison(args, Path(tmp)) if args.sync_rounds else {}
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
    if syncs:
        print_sync_comparison(syncs)
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
