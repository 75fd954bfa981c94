"""`pretrain prep`: the command line of offline data preparation.

    pretrain prep tokenizer --inputs 'texts/*.txt' --vocab-size 4096 --out tok.model
    pretrain prep shards --inputs 'texts/*.txt' --tokenizer tok.model --seq-len 256 --out mds
    pretrain prep shards --inputs 's3://corpus/raw/*.parquet' --tokenizer tok.model \
        --seq-len 2048 --out s3://datasets/mds --workers 16
    pretrain prep tasks --inputs 'heldout/*.txt' --out eval_tasks --examples 500

Mistakes the user can fix (and object-store failures) end as one line, `prep error: ...`, on
stderr and exit status 2. Remote inputs are downloaded, and a remote dataset is staged, in a
temporary folder under $TMPDIR (or under --local), which is removed at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

from data_prep.array import Cancelled, run_task
from data_prep.inputs import expand_inputs, fetch_inputs
from data_prep.jobs import SCRATCH_HELP, add_slurm_arguments, resume, status
from data_prep.parts import DEFAULT_PART_SIZE
from data_prep.remote import check_out_prefix, publish
from data_prep.shards import Settings, ShardsResult, split_files, write_shards
from data_prep.tokenizer import MODEL_TYPES, train_tokenizer
from data_prep.workers import default_workers
from pretrain.data.format import SPLITS
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import PrepError, StoreError
from pretrain.objstore import is_remote

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}


class _Parser(argparse.ArgumentParser):
    """Turns argparse's usage-and-exit into a PrepError, so every error looks the same."""

    def error(self, message: str) -> NoReturn:
        raise PrepError(message)


def parse_size(text: str) -> int:
    """'64MB' -> 67108864 (binary units, case-insensitive; a bare number is bytes)."""
    number = text.strip().rstrip("bBkKmMgG")
    unit = text.strip()[len(number) :].lower()
    try:
        return int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a size such as 64MB (got {text!r})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pretrain prep", description="Offline data preparation.")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{tokenizer,shards,tasks,status,resume,task}"
    )

    tok = commands.add_parser("tokenizer", help="train a lossless sentencepiece tokenizer")
    inputs_help = "files or globs, local or s3://bucket/prefix/*.jsonl (.txt, .jsonl, .parquet)"
    field_help = "JSONL field / parquet column holding the text"
    tok.add_argument("--inputs", nargs="+", required=True, metavar="GLOB", help=inputs_help)
    tok.add_argument("--out", type=Path, required=True, metavar="PATH.model")
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    tok.add_argument("--text-field", default="text", help=field_help)
    tok.add_argument("--max-sentences", type=int, help="train on a sample of this many chunks")

    shards = commands.add_parser("shards", help="tokenize and pack into MDS shards")
    shards.add_argument("--inputs", nargs="+", required=True, metavar="GLOB", help=inputs_help)
    shards.add_argument("--tokenizer", type=Path, required=True, metavar="PATH.model")
    shards.add_argument("--out", required=True, metavar="DIR|s3://BUCKET/PREFIX")
    shards.add_argument(
        "--local",
        type=Path,
        metavar="DIR",
        help="with an s3:// --out: write the dataset here first and keep it afterwards "
        "(default: a temporary folder, removed at the end)",
    )
    shards.add_argument("--seq-len", type=int, required=True)
    shards.add_argument("--val-fraction", type=float, default=0.05)
    shards.add_argument("--text-field", default="text", help=field_help)
    shards.add_argument(
        "--compression",
        choices=("none", "zstd"),
        help="default: zstd for an s3:// --out (fewer bytes to download); none for a local "
        "--out, whose uncompressed shards streaming reads in place instead of copying",
    )
    shards.add_argument("--shard-size-limit", type=parse_size, default="64MB")
    shards.add_argument(
        "--part-size",
        type=parse_size,
        default=DEFAULT_PART_SIZE,
        help="inputs are cut into parts of this many bytes, each packed and written on its own "
        "(a task of --tasks writes whole parts; the dataset does not depend on --tasks) "
        "(default: 512MB)",
    )
    shards.add_argument("--overwrite", action="store_true", help="replace a dataset at --out")
    shards.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    shards.add_argument(
        "--workers",
        type=int,
        help="tokenizer processes; any number gives the same shards (default: min(4, CPUs); "
        "in an array task, its --cpus-per-task)",
    )
    add_slurm_arguments(shards)
    task = commands.add_parser("task", help="run one task of an array prep job (what --slurm runs)")
    task.add_argument("out", metavar="OUT")
    task.add_argument("--index", type=int, required=True)
    task.add_argument("--workers", type=int)
    task.add_argument("--scratch", metavar="DIR", help=SCRATCH_HELP)
    for name, what in (
        ("status", "parts done, running, failed"),
        ("resume", "rerun what is missing"),
    ):
        sub = commands.add_parser(name, help=f"array prep job: {what}")
        sub.add_argument("out", metavar="OUT")
    tasks = commands.add_parser("tasks", help="probe tasks (word order, cloze) from held-out text")
    tasks.add_argument("--inputs", nargs="+", required=True, metavar="GLOB", help=inputs_help)
    tasks.add_argument("--out", type=Path, required=True, metavar="DIR")
    tasks.add_argument("--examples", type=int, default=500, help="per task")
    tasks.add_argument("--context-lines", type=int, default=2)
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--text-field", default="text", help=field_help)
    return parser


def run_tasks(args: argparse.Namespace) -> None:
    from data_prep.tasks import make_tasks

    if args.examples < 1 or args.context_lines < 1:
        raise PrepError("--examples and --context-lines must be at least 1")
    names = expand_inputs(args.inputs)
    with tempfile.TemporaryDirectory(prefix="pretrain-prep-") as work:
        inputs = fetch_inputs(names, Path(work) / "inputs")
        try:
            written = make_tasks(inputs, args.out, args.examples, args.seed, args.context_lines, args.text_field)  # fmt: skip
        except ValueError as e:
            raise PrepError(f"--inputs: {e}") from None
    for name, n in written.items():
        print(f"tasks: {args.out / name}: {n} examples")


def run_tokenizer(args: argparse.Namespace) -> None:
    names = expand_inputs(args.inputs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pretrain-prep-") as work:
        sidecar = train_tokenizer(
            fetch_inputs(names, Path(work) / "inputs"),
            args.out,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            text_field=args.text_field,
            max_sentences=args.max_sentences,
        )
    print(
        f"tokenizer: {args.out} ({sidecar['model_type']}, vocab {sidecar['vocab_size']}, "
        f"sha256 {sidecar['sha256'][:12]}) from {len(names)} files "
        f"in {time.perf_counter() - started:.1f}s"
    )


def run_shards(args: argparse.Namespace) -> None:
    if args.tasks is not None or args.task_index is not None or args.slurm:
        return run_array(args)
    started = time.perf_counter()
    remote = is_remote(args.out)
    if args.local is not None and not remote:
        raise PrepError("--local is only for an s3:// --out (a local --out is written in place)")
    compression = args.compression or ("zstd" if remote else "none")
    try:
        tokenizer = Tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise PrepError(f"--tokenizer: {e}") from None
    names = expand_inputs(args.inputs)
    if remote:
        check_out_prefix(args.out, args.overwrite)  # before anything is downloaded or written
    with tempfile.TemporaryDirectory(prefix="pretrain-prep-") as work:
        local = (args.local or Path(work) / "mds") if remote else Path(args.out)
        result = write_shards(
            fetch_inputs(names, Path(work) / "inputs"),
            tokenizer,
            local,
            settings_of(args),
            overwrite=args.overwrite,
            workers=args.workers,
            out_flag="--local" if args.local else "--out",
        )
        uploaded = publish(local, args.out, args.overwrite) if remote else None
        _print_summary(args, result, local, compression, time.perf_counter() - started, uploaded)


def run_array(args: argparse.Namespace) -> None:
    """--tasks N with --slurm (submit the array) or --task-index I (run one task here)."""
    from data_prep.array import make_plan, open_plan, run_task
    from data_prep.jobs import slurm_options, submit
    from data_prep.target import Target

    if args.tasks is None:
        raise PrepError("--slurm and --task-index need --tasks N")
    if args.slurm == (args.task_index is not None):
        raise PrepError("--tasks N needs either --slurm (submit N array tasks) or --task-index I")
    if args.local is not None:
        raise PrepError("--local is for a one-machine write; array tasks stage their parts "
                        "in --scratch")  # fmt: skip
    if args.task_index is not None and args.overwrite:
        raise PrepError("--overwrite with --task-index would remove the other tasks' parts; "
                        "empty --out first, or use --slurm")  # fmt: skip
    plan = make_plan(args.inputs, args.tokenizer, settings_of(args), args.tasks, args.workers)
    target = Target(args.out)
    if args.slurm:
        plan["slurm"] = slurm_options(args)
        plan = open_plan(target, plan, args.overwrite)
        submit(target, plan, list(range(args.tasks)))
    else:
        open_plan(target, plan, overwrite=False)
        run_task(args.out, args.task_index, args.workers, args.scratch)


def settings_of(args: argparse.Namespace) -> Settings:
    compression = args.compression or ("zstd" if is_remote(args.out) else "none")
    return Settings(
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        compression=None if compression == "none" else compression,
        size_limit=args.shard_size_limit,
        seed=args.seed,
        part_size=args.part_size,
    )


def _print_summary(
    args: argparse.Namespace,
    result: ShardsResult,
    local: Path,
    compression: str,
    seconds: float,
    uploaded: tuple[int, int] | None,
) -> None:
    for split in SPLITS:
        counts = result.meta["splits"][split]
        shards, size = split_files(local / split)
        per_shard = counts["samples"] * (args.seq_len + 1) // max(shards, 1)
        print(
            f"{split}: documents={counts['documents']:,} tokens={counts['tokens']:,} "
            f"samples={counts['samples']:,} shards={shards} bytes={size:,} "
            f"tokens/shard={per_shard:,} text={result.text_bytes[split] / 1e6:,.2f}MB"
        )
    text_mb = sum(result.text_bytes.values()) / 1e6
    where = f"{args.out} (staged in {local})" if args.local else args.out
    upload = f"; uploaded {uploaded[0]} files, {uploaded[1]:,} bytes" if uploaded else ""
    print(
        f"shards: {where} (seq_len {args.seq_len}, {compression}, {args.workers or default_workers()} workers): "
        f"{text_mb:,.2f} MB of text in {seconds:.1f}s = {text_mb / seconds:.2f} MB/s "
        f"(tokenize+pack {result.seconds:.1f}s = {text_mb / result.seconds:.2f} MB/s){upload}"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        commands = {
            "tokenizer": run_tokenizer,
            "shards": run_shards,
            "tasks": run_tasks,
            "task": lambda a: run_task(a.out, a.index, a.workers, a.scratch),
            "status": lambda a: status(a.out),
            "resume": lambda a: resume(a.out),
        }
        commands[args.command](args)
    except (PrepError, StoreError) as e:
        print(f"prep error: {e}", file=sys.stderr)
        return 2
    except Cancelled:
        print("prep: cancelled (SIGTERM); `pretrain prep resume OUT` reruns it", file=sys.stderr)
        return 143
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
