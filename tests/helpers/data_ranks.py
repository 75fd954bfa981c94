"""Run under torchrun by the data tests: each rank reads its share of the training data
through the trainer's own loader and records what it got.

    torchrun --nproc-per-node N tests/helpers/data_ranks.py [--epoch] [--resume STATE] [--save-at K]
        OUT_DIR STEPS key=value ...

Starts up as the trainer does (run directory, then the tokenizer and both splits checked
in one round). Writes OUT_DIR/rank{r}.jsonl: one line per micro-batch, {"step", "rows":
[sha1 of each sample]}; with --save-at K, rank 0 writes OUT_DIR/state.json (the loader's
checkpoint state) after K global steps. With --epoch, reads exactly one epoch (all ranks)
instead. OUT_DIR/opened{r}.json: every path the rank opened or listed during start-up (as
Python's audit events report them), so a test can see who touches the shared files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.config.load import load_config
from pretrain.data.loader import TrainBatches, check_data
from pretrain.parallel import device
from pretrain.train import process


def row_hashes(batch) -> list[str]:
    return [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in batch]


def watch_files() -> list[str]:
    """Paths opened or listed by this process from now on (audit hooks cannot be removed:
    the list just stops being read)."""
    seen: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event in ("open", "os.listdir", "os.scandir") and isinstance(args[0], (str, Path)):
            seen.append(str(args[0]))

    sys.addaudithook(hook)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--epoch", action="store_true")
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--save-at", type=int)
    parser.add_argument(
        "--pause-file", type=Path, help="after each batch, wait while this file exists"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    rank, world = device.init_distributed(timeout_s=120)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/tiny.yaml", args.overrides)
    opened = watch_files()
    run_dir = process.start(cfg)
    _, checked = check_data(cfg, run_dir)
    data = TrainBatches(cfg, run_dir, checked=checked["train"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"opened{rank}.json").write_text(json.dumps(opened))
    if args.resume:
        data.load_state_dict(json.loads(args.resume.read_text()))
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
    with open(args.out / f"rank{rank}.jsonl", "w") as f:
        if args.epoch:
            batches = ((0, b) for b in data.loader)  # exactly one pass over the data
        else:
            batches = ((step, data.next()) for step in range(args.steps) for _ in range(accum))
        for n, (step, batch) in enumerate(batches):
            f.write(json.dumps({"step": step, "rows": row_hashes(batch)}) + "\n")
            f.flush()
            if args.save_at is not None and (n + 1) == args.save_at * accum and rank == 0:
                (args.out / "state.json").write_text(json.dumps(data.state_dict()))
            while args.pause_file is not None and args.pause_file.exists():
                time.sleep(0.05)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
