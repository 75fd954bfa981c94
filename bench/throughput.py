"""Trainer throughput and MFU against this machine's own measured matmul peak.

Everything is measured in one process, one after the other:
  1. peak: the best fp32 FLOP/s of square matmuls (the MFU denominator);
  2. plain: a bare PyTorch loop (forward, backward, AdamW step) on the same model with
     batches already in memory: what the hardware gives this model;
  3. trainer: `Trainer.fit()` on real MDS shards of the Shakespeare demo data, with logging
     to metrics.jsonl; its final checkpoint and evaluation are timed and taken out.
The trainer's overhead is 1 - plain step time / trainer step time; the bare loop runs
before and after the trainer, and the spread of the two shows the machine's noise.

Model (from the issue): 6 layers, d_model 384, 6 heads, seq 256, batch 8, GELU MLP,
learned positions, vocabulary 16384 (the 4096-piece demo tokenizer, padded), ~17M params.

    python bench/throughput.py [--steps 12] [--warmup 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.config import load_config  # noqa: E402
from pretrain.metrics import measure_matmul_flops, read_metrics  # noqa: E402
from pretrain.model import Transformer, count_params, flops_per_token  # noqa: E402
from pretrain.optim import build_optimizer  # noqa: E402

DATA = REPO / "data" / "shakespeare"
MODEL = [
    "model.vocab_size=16384", "model.d_model=384", "model.n_layers=6", "model.n_heads=6",
    "model.n_kv_heads=null", "model.mlp=gelu", "model.position=learned", "model.max_seq_len=256",
    "data.seq_len=256", "data.allow_vocab_padding=true",
    "train.global_batch_size=8", "train.micro_batch_size=8",
]  # fmt: skip


def ensure_demo_data() -> None:
    if not (DATA / "mds" / "meta.json").exists():
        subprocess.run(["make", "-C", str(REPO), "data/shakespeare/mds/meta.json"], check=True)


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    ensure_demo_data()
    from pretrain.trainer import Trainer

    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [
            *MODEL, f"run.dir={run_dir}", f"train.max_steps={total}", f"train.eval_every={total}",
            "train.eval_batches=1", "checkpoint.every=0", "train.log_every=1000",
            "schedule.warmup_steps=2",
        ]  # fmt: skip
        cfg = load_config(REPO / "configs/tiny.yaml", overrides)
        trainer = Trainer(cfg)
        # The bare loop trains on real batches of the same data, copied out before the run.
        batches = [trainer.train_data.next() for _ in range(4)]
        peak_flops = peak()
        # The bare loop runs before and after the trainer: their spread is this machine's noise.
        before = plain_loop(cfg, batches, args.steps, args.warmup)
        start = time.perf_counter()
        trainer.fit()
        elapsed = time.perf_counter() - start
        trainer.close()
        after = plain_loop(cfg, batches, args.steps, args.warmup)
        records = read_metrics(run_dir)

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
    print(f"measured fp32 matmul peak: {peak_flops / 1e9:.1f} GFLOP/s")
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


if __name__ == "__main__":
    main()
