"""The `pretrain` command line. Subcommands dispatch only; the work lives in the library."""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.errors import (
    CONFIG_OR_DATA_ERROR,
    INTERRUPTED,
    TRAINING_STOPPED,
    ConfigError,
    DataError,
    StoreError,
    TrainingStopped,
)

USAGE = """pretrain <command> ...

commands:
  train CONFIG [key=value ...]    train (or resume) the run CONFIG describes
  config CONFIG [key=value ...]   print the resolved config
  prep tokenizer|shards|status|resume ...  tokenizer, packed MDS shards (--tasks N: a SLURM array)
  consolidate CHECKPOINT --out F  full weights of a (sharded) checkpoint as safetensors
  export CHECKPOINT --hf OUT_DIR  a Hugging Face transformers model folder (Llama format)
  generate RUN_DIR|CHECKPOINT --prompt TEXT    sample text with a KV cache
  eval RUN_DIR|CHECKPOINT [--tasks F.jsonl ...] downstream task scores (any number of ranks)
  plot RUN_DIR [RUN_DIR ...] --out F.png       loss, learning rate and tokens/s curves
  plan CONFIG [k=v ...] --nodes N --gpus-per-node G --gpu-type T [--search]
                                  per-GPU memory, step time and MFU on a cluster (no GPU needed);
                                  --search: the fastest layouts that fit
  plan --flops F | --gpus N --hours H --gpu-type T   compute-optimal model and data size
  launch CONFIG [k=v ...] --nproc-per-node N   torchrun on this machine (or one node of many)
  submit CONFIG [k=v ...] --nodes N ...        submit a SLURM job that requeues on preemption
  sweep CONFIG --grid key=v1,v2 ...            a grid of runs, locally or as a SLURM job array
  sweep-status SWEEP_DIR                       a table of a sweep's runs
  resume RUN_DIR                               relaunch a stopped or failed run as it was launched
  status RUN_DIR                               state, step, checkpoint, losses, restarts
"""
LAUNCH_COMMANDS = ("launch", "submit", "sweep", "sweep-status", "resume", "status")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = {"train": _train, "config": _config, "prep": _prep, "consolidate": _consolidate}
    commands.update(dict.fromkeys(LAUNCH_COMMANDS, _launcher(command)))
    commands.update(export=_export, generate=_generate, plot=_plot, plan=_plan, eval=_eval)
    if command not in commands:
        print(f"pretrain: unknown command '{command}'\n{USAGE}", end="", file=sys.stderr)
        return 2
    try:
        return commands[command](rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return CONFIG_OR_DATA_ERROR
    except (DataError, StoreError) as e:
        print(f"data error: {e}", file=sys.stderr)
        return CONFIG_OR_DATA_ERROR
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return TRAINING_STOPPED
    except KeyboardInterrupt:
        return INTERRUPTED


def _config_args(prog: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"pretrain {prog}")
    parser.add_argument("config", help="YAML file")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3"
    )
    return parser.parse_args(argv)


def _config(argv: list[str]) -> int:
    from pretrain.config.load import load_config, to_yaml

    args = _config_args("config", argv)
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _train(argv: list[str]) -> int:
    from pretrain.config.load import load_config
    from pretrain.train.process import die_with_launcher, setup_logging

    die_with_launcher()
    args = _config_args("train", argv)
    cfg = load_config(args.config, args.overrides)
    setup_logging(int(os.environ.get("RANK", "0")))
    from pretrain.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close(exiting=True)
    return cfg.fault.requeue_exit_code if trainer.preempted else 0


def _consolidate(argv: list[str]) -> int:
    from pathlib import Path

    from pretrain.tools.consolidate import consolidate

    parser = argparse.ArgumentParser(prog="pretrain consolidate")
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint folder, e.g. runs/NAME/checkpoints/step_00001000",
    )
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if not (args.checkpoint / ".metadata").is_file():
        raise ConfigError(f"{args.checkpoint}: not a checkpoint folder (no .metadata)")
    n = consolidate(args.checkpoint, args.out)
    print(f"{args.out}: {n} tensors from {args.checkpoint}")
    return 0


# The tools import torch, transformers or matplotlib: each is imported when its command runs,
# so `pretrain status` or `pretrain config` starts in a fraction of a second.
def _export(argv: list[str]) -> int:
    from pretrain.tools import export

    return export.main(argv)


def _generate(argv: list[str]) -> int:
    from pretrain.tools import generate

    return generate.main(argv)


def _eval(argv: list[str]) -> int:
    from pretrain.evals import cli

    return cli.main(argv)


def _plot(argv: list[str]) -> int:
    from pretrain.tools import plot

    return plot.main(argv)


def _plan(argv: list[str]) -> int:
    """With a CONFIG: its per-rank memory and step time on a cluster (pretrain.planner);
    with --flops or --gpus/--hours: the compute-optimal model and data for a budget."""
    if argv and not argv[0].startswith("-"):
        from pretrain.planner.cli import main as plan_config

        return plan_config(argv)
    from pretrain.tools import compute_optimal

    return compute_optimal.main(argv)


def _launcher(command: str):
    # launch/ is the process manager beside the library; only the CLI composes the two.
    def run(argv: list[str]) -> int:
        from launch.cli import main as launch_main

        return launch_main(command, argv)

    return run


def _prep(argv: list[str]) -> int:
    # data_prep is an offline tool beside the library; only the CLI composes the two.
    from data_prep.cli import main as prep_main

    return prep_main(argv)


# Commands whose own teardown has run when they return (training closes its trainer, a
# launch has waited for its workers): the interpreter's finalization after that frees torch's
# modules and C++ state one by one, about 1 s of CPU per process that nobody waits for, and
# a place where a destructor can hang (bound_teardown bounds it). They end at once instead.
ENDS_AT_ONCE = ("train", "launch", "resume")


def exit_now(code: int) -> None:
    """End the process with `code` after what a normal exit does that matters: the atexit
    handlers (streaming's shared memory, DataLoader and multiprocessing children, filelocks),
    the logs and the standard streams. Threads still running are not waited for: a
    `train` process has waited for its saves and uploads in `Trainer.close`."""
    import atexit
    import contextlib
    import logging

    logging.shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


def console() -> None:
    """The `pretrain` command (the console script) and `python -m pretrain`."""
    code = main()
    if sys.argv[1:2] and sys.argv[1] in ENDS_AT_ONCE and isinstance(code, int):
        exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
