"""Command lines of `pretrain launch | submit | sweep | sweep-status | resume | status`.
Argument parsing only; the work is in local.py, slurm.py, sweep.py and status.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from launch.spec import LaunchSpec, node_range, read_spec, require_positive, require_run
from pretrain.rundir import RunDir


def main(command: str, argv: list[str]) -> int:
    return COMMANDS[command](argv)


def _parser(command: str, config: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"pretrain {command}")
    if config:
        parser.add_argument("config", help="YAML file")
        parser.add_argument(
            "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3"
        )
    return parser


def _ranks_args(parser: argparse.ArgumentParser, max_restarts: int) -> None:
    parser.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node")
    parser.add_argument(
        "--max-restarts", type=int, default=max_restarts,
        help=f"restarts of all ranks after a crash (default {max_restarts}); a config error, "
        "a stopped run or a preemption is never restarted",
    )  # fmt: skip


def _launch(argv: list[str]) -> int:
    from launch import slurm
    from launch.fitcheck import card_named, check_fit, local_card
    from launch.local import launch
    from launch.spec import resolve

    parser = _parser("launch")
    _ranks_args(parser, max_restarts=0)
    parser.add_argument(
        "--nnodes", default="1", metavar="N|MIN:MAX",
        help="nodes of the job; a range MIN:MAX is elastic: when a node is lost the others "
        "restart from the last checkpoint with the nodes left (at least MIN, same global "
        "batch and sample order), and a node that (re)joins is taken in at the next restart",
    )  # fmt: skip
    parser.add_argument("--node-rank", type=int, default=int(os.environ.get("SLURM_NODEID", 0)))
    parser.add_argument("--rdzv-endpoint", help="HOST:PORT of node 0's rendezvous (nnodes > 1)")
    parser.add_argument("--rdzv-id", help="the same on every node (default: from run.dir)")
    parser.add_argument(
        "--rdzv-conf", metavar="KEY=V,...",
        help="torchrun's c10d rendezvous settings, in seconds: join_timeout (600: how long "
        "nodes wait for each other), last_call_timeout (30: with MIN:MAX, how long to wait "
        "for more nodes once MIN are there), keep_alive_interval (5) and "
        "keep_alive_max_attempt (3: a node silent this many intervals is dropped)",
    )  # fmt: skip
    slurm.fit_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    low, high = node_range(args.nnodes)
    require_positive(nproc_per_node=args.nproc_per_node or 1)
    if not args.no_fit_check:
        card = card_named(args.gpu_type, "--gpu-type") if args.gpu_type else local_card()
        if card is not None:  # at the fewest nodes an elastic job may run on
            check_fit(resolve(args.config, args.overrides)[0], low, args.nproc_per_node or 1, card)
    spec = LaunchSpec(
        config=str(Path(args.config).resolve()),
        overrides=args.overrides,
        cwd=os.getcwd(),
        nproc_per_node=args.nproc_per_node or 1,
        nnodes=low if low == high else f"{low}:{high}",
        max_restarts=args.max_restarts,
        job_id=_slurm_job_id(),
    )
    return launch(spec, args.node_rank, args.rdzv_endpoint, args.rdzv_id, args.rdzv_conf)


def _submit(argv: list[str]) -> int:
    from launch import slurm

    parser = _parser("submit")
    _ranks_args(parser, max_restarts=3)
    slurm.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    fit = None if args.no_fit_check else (args.gpu_type or "auto")
    return slurm.submit_config(args.config, args.overrides, slurm.options(args), args.dry_run, fit)


def _sweep(argv: list[str]) -> int:
    from launch import slurm, sweep

    parser = _parser("sweep")
    parser.add_argument(
        "--grid", action="append", required=True, metavar="KEY=V1,V2",
        help="a config key and its values; several --grid give the cartesian product",
    )  # fmt: skip
    parser.add_argument("--out", help="the sweep's folder (default: runs/NAME-sweep)")
    parser.add_argument("--slurm", action="store_true", help="run as one SLURM job array")
    _ranks_args(parser, max_restarts=0)
    slurm.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    opts = slurm.options(args) if args.slurm else None
    return sweep.run_sweep(
        args.config, args.overrides, args.grid, args.out, opts, args, dry_run=args.dry_run
    )


def _sweep_status(argv: list[str]) -> int:
    from launch import sweep

    parser = _parser("sweep-status", config=False)
    parser.add_argument("sweep_dir", help="the folder `pretrain sweep` printed")
    args = parser.parse_args(argv)
    print(sweep.sweep_status(args.sweep_dir))
    return 0


def _resume(argv: list[str]) -> int:
    from launch.local import launch
    from launch.status import run_status

    parser = _parser("resume", config=False)
    parser.add_argument("run_dir")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="changes that keep the experiment, e.g. train.max_steps=2000",
    )  # fmt: skip
    args = parser.parse_args(argv)
    run_dir = require_run(args.run_dir)
    status = run_status(run_dir)
    if status.state in ("running", "queued"):
        print(f"{run_dir} is {status.state}; nothing to resume")
        return 1
    if status.state == "finished" and not args.overrides:
        print(f"{run_dir} finished at step {status.step}; nothing to resume")
        return 0
    spec = read_spec(run_dir) or LaunchSpec(config="", cwd=os.getcwd())
    spec.config = str(RunDir(run_dir).config)  # the resolved config, frozen at launch
    spec.overrides = args.overrides
    print(f"resuming {run_dir} ({status.state} at step {status.step})")
    if spec.slurm:
        from launch import slurm
        from launch.spec import prepare, resolve

        if args.overrides:  # the job runs RUN_DIR/config.yaml: write the change into it
            cfg, spec.overrides = resolve(spec.config, args.overrides)
            prepare(cfg, spec)
        return slurm.submit_spec(spec)
    return launch(spec)


def _status(argv: list[str]) -> int:
    from launch.status import format_status, run_status

    parser = _parser("status", config=False)
    parser.add_argument("run_dir")
    print(format_status(run_status(parser.parse_args(argv).run_dir)))
    return 0


def _slurm_job_id() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and job:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return job


COMMANDS = {
    "launch": _launch,
    "submit": _submit,
    "sweep": _sweep,
    "sweep-status": _sweep_status,
    "resume": _resume,
    "status": _status,
}
