"""`pretrain eval RUN_DIR|CHECKPOINT [--tasks F.jsonl ...]`: score a checkpoint on the
downstream tasks, on one process or on any number of torchrun ranks, into a JSON report.

    pretrain eval runs/NAME                          # its latest checkpoint, its eval.tasks
    pretrain eval runs/NAME/checkpoints/step_00001000 --tasks hellaswag.jsonl arc.jsonl \\
        --num-fewshot 5 --out report.json
    torchrun --nproc-per-node 8 -m pretrain eval runs/NAME --out report.json

Every rank holds the whole model (read from the DCP checkpoint as `generate` does) and
scores its share of the batches; the numbers are the same bit for bit at any rank count
(see `scoring`). A model too large for one device is scored during training instead, on
the sharded training ranks (eval.every / eval.at_checkpoint). Tasks default to the run's
own `eval.tasks`; `--tasks` files take the type their first line shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.errors import ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pretrain eval")
    p.add_argument("path", help="a run directory (its latest checkpoint) or a checkpoint folder")
    p.add_argument("--tasks", nargs="+", metavar="F.jsonl|F.yaml", help="task files (local or s3://), or YAML lists of eval.tasks entries; default: the run's eval.tasks")  # fmt: skip
    p.add_argument("--num-fewshot", type=int, default=0, help="for --tasks JSONL files")
    p.add_argument("--continuation-delimiter", default=" ", help="for --tasks JSONL files")
    p.add_argument("--limit", type=int, help="score the first N examples of every task (0: all)")
    p.add_argument("--batch-size", type=int, help="default: the run's eval.batch_size")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: the run's parallel.mixed_precision")  # fmt: skip
    p.add_argument("--samples", action="store_true", help="each request's log-likelihood in the report")  # fmt: skip
    p.add_argument("--out", type=Path, help="the JSON report (default: printed)")
    p.add_argument("--tokenizer", help="default: the run's data.tokenizer")
    return p.parse_args(argv)


def task_configs(args: argparse.Namespace, cfg) -> list:
    """The tasks to score: the run's eval.tasks, or --tasks (JSONL files, whose type their
    first line shows, or YAML lists of eval.tasks entries); --limit applies to all."""
    import dataclasses

    import yaml

    from pretrain.config.checks import check_eval
    from pretrain.config.schema import EvalTaskConfig
    from pretrain.evals.tasks import read_file

    if not args.tasks and not cfg.eval.tasks:
        raise ConfigError(f"{args.path}: the run has no eval.tasks; name task files with --tasks")  # fmt: skip
    out = [] if args.tasks else list(cfg.eval.tasks)
    fields = {f.name for f in dataclasses.fields(EvalTaskConfig)}
    for path in args.tasks or []:
        text = read_file(path).decode("utf-8", "replace")
        if path.endswith((".yaml", ".yml")):
            entries = yaml.safe_load(text)
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise ConfigError(f"--tasks {path}: must be a YAML list of eval.tasks entries")
            for i, entry in enumerate(entries):
                unknown = set(entry) - fields
                if unknown:
                    raise ConfigError(f"--tasks {path}: entry {i} has unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(fields))})")  # fmt: skip
                out.append(EvalTaskConfig(**entry))
            continue
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        kind = "multiple_choice" if '"choices"' in first else "language_modeling"
        out.append(EvalTaskConfig(path=path, type=kind, num_fewshot=args.num_fewshot,
                                  continuation_delimiter=args.continuation_delimiter))  # fmt: skip
    if args.limit is not None:
        out = [dataclasses.replace(t, limit=args.limit) for t in out]
    cfg.eval.tasks = out
    check_eval(cfg)
    return out


def main(argv: list[str]) -> int:
    from pretrain.checkpoint.folders import checkpoint_step
    from pretrain.checkpoint.ranks import Ranks
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.evals.evaluator import Evaluator
    from pretrain.files import write_json
    from pretrain.parallel.device import init_distributed
    from pretrain.parallel.distributed import local_device
    from pretrain.rundir import find_tokenizer, resolve_checkpoint
    from pretrain.tools.generate import load_model

    args = parse(argv)
    checkpoint = resolve_checkpoint(args.path)
    _, world = init_distributed()
    try:
        if torch.distributed.is_initialized():  # the device every rank agreed on
            kind = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        else:
            kind = "cuda" if torch.cuda.is_available() else "cpu"
        device = local_device(kind)
        model, cfg = load_model(checkpoint, device)
        if args.batch_size is not None:
            cfg.eval.batch_size = args.batch_size
        tasks = task_configs(args, cfg)
        cfg.eval.tasks = tasks
        tok = Tokenizer(find_tokenizer(args.tokenizer or cfg.data.tokenizer, checkpoint))
        evaluator = Evaluator(cfg.eval, tok, cfg.model.max_seq_len, Ranks.current(), device)
        precision = args.precision or cfg.parallel.mixed_precision
        dtype = torch.bfloat16 if precision == "bf16" else None
        chunk = cfg.parallel.loss_chunk_tokens

        @torch.no_grad()
        def forward(inputs: torch.Tensor, targets: torch.Tensor, planned: int) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return model(
                    inputs, targets, loss_chunk_tokens=chunk, scores=True, planned_tokens=planned
                )

        report = evaluator.run(forward, samples=args.samples)
        if report is None:  # not rank 0
            return 0
        report = {
            "checkpoint": str(checkpoint),
            "step": checkpoint_step(checkpoint),
            "world_size": world,
            "precision": precision,
            "sequences": evaluator.sequences,
            "tokens": evaluator.tokens,
            **report,
        }
        for name, m in report["tasks"].items():
            print(f"{name:<24} {m['metric']:<8} {m[m['metric']]:.4f}  (n={m['n']}, chance {m['chance']:.3f})", file=sys.stderr)  # fmt: skip
        print(f"{'core':<24} {'':<8} {report['core']:.4f}  ({report['eval_s']:.1f} s on {world} rank(s))", file=sys.stderr)  # fmt: skip
        if args.out:
            write_json(args.out, report, indent=1)
        else:
            print(json.dumps(report, indent=1))
        return 0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
