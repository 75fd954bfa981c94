"""`pretrain prep`: the command line of offline data preparation.

    pretrain prep tokenizer --inputs 'texts/*.txt' --vocab-size 4096 --out tok.model
    pretrain prep shards --inputs 'texts/*.txt' --tokenizer tok.model --seq-len 256 --out mds

Mistakes the user can fix end as one line, `prep error: ...`, on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

from data_prep import PrepError
from data_prep.inputs import expand_inputs
from data_prep.shards import SPLITS, split_files, write_shards
from data_prep.tokenizer import MODEL_TYPES, train_tokenizer
from pretrain.tokenizer import Tokenizer

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
    commands = parser.add_subparsers(dest="command", required=True, metavar="{tokenizer,shards}")

    tok = commands.add_parser("tokenizer", help="train a lossless sentencepiece tokenizer")
    tok.add_argument("--inputs", nargs="+", required=True, metavar="GLOB")
    tok.add_argument("--out", type=Path, required=True, metavar="PATH.model")
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    tok.add_argument("--text-field", default="text", help="JSONL field holding the text")
    tok.add_argument("--max-sentences", type=int, help="train on a sample of this many chunks")

    shards = commands.add_parser("shards", help="tokenize and pack into MDS shards")
    shards.add_argument("--inputs", nargs="+", required=True, metavar="GLOB")
    shards.add_argument("--tokenizer", type=Path, required=True, metavar="PATH.model")
    shards.add_argument("--out", type=Path, required=True, metavar="DIR")
    shards.add_argument("--seq-len", type=int, required=True)
    shards.add_argument("--val-fraction", type=float, default=0.05)
    shards.add_argument("--text-field", default="text", help="JSONL field holding the text")
    shards.add_argument("--compression", choices=("none", "zstd"), default="none")
    shards.add_argument("--shard-size-limit", type=parse_size, default="64MB")
    shards.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    shards.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    return parser


def run_tokenizer(args: argparse.Namespace) -> None:
    inputs = expand_inputs(args.inputs)
    started = time.perf_counter()
    sidecar = train_tokenizer(
        inputs,
        args.out,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        text_field=args.text_field,
        max_sentences=args.max_sentences,
    )
    print(
        f"tokenizer: {args.out} ({sidecar['model_type']}, vocab {sidecar['vocab_size']}, "
        f"sha256 {sidecar['sha256'][:12]}) from {len(inputs)} files "
        f"in {time.perf_counter() - started:.1f}s"
    )


def run_shards(args: argparse.Namespace) -> None:
    inputs = expand_inputs(args.inputs)
    try:
        tokenizer = Tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise PrepError(f"--tokenizer: {e}") from None
    started = time.perf_counter()
    meta = write_shards(
        inputs,
        tokenizer,
        args.out,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        compression=None if args.compression == "none" else args.compression,
        size_limit=args.shard_size_limit,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    for split in SPLITS:
        counts = meta["splits"][split]
        shards, size = split_files(args.out / split)
        print(
            f"{split}: documents={counts['documents']:,} tokens={counts['tokens']:,} "
            f"samples={counts['samples']:,} shards={shards} bytes={size:,}"
        )
    print(f"shards: {args.out} (seq_len {args.seq_len}) in {time.perf_counter() - started:.1f}s")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "tokenizer":
            run_tokenizer(args)
        else:
            run_shards(args)
    except PrepError as e:
        print(f"prep error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
