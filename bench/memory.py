"""Per-rank memory of parameters + gradients + optimizer state, per parallel strategy.

For each strategy, 2 ranks under torchrun build a ~100M-parameter model through the
trainer's own strategy code, take one real training step on the demo data, and count the
bytes each rank holds: its (local shards of) parameters and gradients right after
backward, and its AdamW state after the step. These are exact byte counts, not process
RSS (which is also printed, for reference). The ratio sharded/ddp is the point.

    python bench/memory.py [--strategies ddp fsdp] [--layers 14]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = [
    "model.d_model=768", "model.n_layers={layers}", "model.n_heads=12", "model.n_kv_heads=null",
    "model.vocab_size=4096", "model.max_seq_len=256", "data.seq_len=256",
    "train.global_batch_size=2", "train.micro_batch_size=1", "train.eval_batches=1",
]  # fmt: skip


def local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(strategy: str, layers: int, out: Path) -> None:
    from pretrain.config import load_config
    from pretrain.model import count_params
    from pretrain.trainer import Trainer

    overrides = [o.format(layers=layers) for o in MODEL]
    cfg = load_config(
        REPO / "configs/tiny.yaml",
        [*overrides, f"parallel.strategy={strategy}", f"run.dir={out / strategy}"],
    )
    trainer = Trainer(cfg)
    s = trainer.strategy
    tokens = trainer.train_data.next().to(s.device)
    s.backward(trainer.loss(tokens), last=True)
    params = local_bytes(p for p in s.model.parameters())
    grads = local_bytes(p.grad for p in s.model.parameters() if p.grad is not None)
    s.step(trainer.cfg.optim.grad_clip)
    optim = local_bytes(
        v for state in s.optimizer.state.values() for v in state.values() if hasattr(v, "numel")
    )
    row = {
        "strategy": strategy,
        "rank": s.rank,
        "params_m": count_params(cfg.model) / 1e6,
        "params": params,
        "grads": grads,
        "optim": optim,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    with open(out / f"{strategy}-rank{s.rank}.json", "w") as f:
        json.dump(row, f)
    trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.layers, args.out)
        return
    if not (REPO / "data/shakespeare/mds/meta.json").exists():
        subprocess.run(["make", "-C", str(REPO), "data/shakespeare/mds/meta.json"], check=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                __file__, "--worker", strategy, "--layers", str(args.layers), "--out", tmp,
            ]  # fmt: skip
            subprocess.run(
                cmd,
                cwd=REPO,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                capture_output=True,
            )
            rows[strategy] = [
                json.loads((Path(tmp) / f"{strategy}-rank{r}.json").read_text()) for r in (0, 1)
            ]
    print(f"model: {rows[args.strategies[0]][0]['params_m']:.1f}M parameters, fp32, AdamW, 2 ranks")
    print(
        f"{'strategy':>8} {'rank':>4} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} {'total MB':>9} {'peak RSS MB':>12}"
    )
    totals = {}
    for strategy, ranks in rows.items():
        for r in ranks:
            total = r["params"] + r["grads"] + r["optim"]
            totals[strategy] = max(totals.get(strategy, 0), total)
            print(
                f"{strategy:>8} {r['rank']:>4} {r['params'] / 1e6:10.1f} {r['grads'] / 1e6:9.1f} "
                f"{r['optim'] / 1e6:9.1f} {total / 1e6:9.1f} {r['rss'] / 1e6:12.0f}"
            )
    if "ddp" in totals:
        for strategy, total in totals.items():
            if strategy != "ddp":
                print(
                    f"{strategy}/ddp, largest rank's params+grads+optimizer state: {total / totals['ddp']:.3f} (target <= 0.55)"
                )


if __name__ == "__main__":
    main()
