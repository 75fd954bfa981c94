"""`pretrain submit`: an sbatch script rendered from `slurm/pretrain.sbatch`, checked
against the cluster, then submitted. The job runs one `pretrain launch` per node, requeues
itself when the training exits with the requeue code (after SLURM's USR1 warning or a
`scancel --signal=USR1`), and the requeued job resumes from the checkpoint.

Each node's single SLURM task holds its launcher and all its ranks, so it must be given
the node's cores and memory: SLURM's defaults (one CPU per task, often a little memory per
CPU) would leave a node's 8 ranks on one core. The script asks for `--cpus-per-task` (or
the whole node, `--exclusive`) and `--mem` (default 0: all of it), hands the cores to srun
explicitly (it stopped inheriting them in SLURM 22.05) and to the ranks as OMP_NUM_THREADS.
A node whose launcher dies ends the step at once (`srun --kill-on-bad-exit`) and the job
is requeued, unless it keeps failing without a new checkpoint (`--max-requeues`)."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from launch.fitcheck import card_named, check_fit, gres_gpu_type
from launch.spec import LaunchSpec, prepare, record, require_positive, resolve, write_spec
from pretrain.errors import CONFIG_OR_DATA_ERROR, TRAINING_STOPPED, ConfigError
from pretrain.rundir import RunDir

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "pretrain.sbatch"
# sbatch options passed through as they are: (flag, argparse dest)
PASSTHROUGH = (
    ("--partition", "partition"),
    ("--time", "time"),
    ("--account", "account"),
    ("--qos", "qos"),
    ("--mem", "mem"),
    ("--constraint", "constraint"),
    ("--cpus-per-task", "cpus_per_task"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SLURM")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="also the ranks per node")
    for flag, _ in PASSTHROUGH:
        g.add_argument(flag)
    g.add_argument("--job-name", help="default: run.name")
    g.add_argument(
        "--signal-lead", type=int, default=180, metavar="SECONDS",
        help="USR1 this long before the time limit, to checkpoint and requeue (default 180)",
    )  # fmt: skip
    g.add_argument(
        "--max-requeues", type=int, default=3, metavar="N",
        help="requeue a job that was preempted or lost a node at most N times from the "
        "same checkpoint (default 3), so that a bug ending every start is not requeued forever",
    )  # fmt: skip
    g.add_argument("--max-parallel", type=int, help="array tasks running at once (sweeps)")
    g.add_argument(
        "--sbatch-arg", action="append", default=[], metavar="ARG",
        help="any other sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)",
    )  # fmt: skip
    g.add_argument("--template", default=str(TEMPLATE), help="the sbatch template")
    g.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    fit_arguments(parser)


def fit_arguments(parser: argparse.ArgumentParser) -> None:
    """--gpu-type and --no-fit-check, for `submit` and `launch` (see launch/fitcheck.py)."""
    parser.add_argument(
        "--gpu-type", help="the GPUs' type for the memory check (default: from the cluster)"
    )
    parser.add_argument(
        "--no-fit-check", action="store_true",
        help="launch even if the planner says the config will not fit in GPU memory",
    )  # fmt: skip


def options(args: argparse.Namespace) -> dict:
    """The SLURM options of parsed arguments, as recorded in launch.json."""
    opts = {dest: getattr(args, dest) for _, dest in PASSTHROUGH}
    opts.update(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node or args.gpus_per_node or 1,
        max_restarts=args.max_restarts,
        job_name=args.job_name,
        signal_lead=args.signal_lead,
        max_requeues=args.max_requeues,
        max_parallel=args.max_parallel,
        sbatch_args=args.sbatch_arg,
        template=str(Path(args.template).resolve()),
    )
    require_positive(**{k: opts[k] for k in ("nodes", "nproc_per_node", "signal_lead")})
    if opts["max_requeues"] < 0:
        raise ConfigError(f"--max-requeues {opts['max_requeues']}: must be 0 or more")
    return opts


def submit_config(
    config: str, overrides: list[str], opts: dict, dry_run: bool, fit: str | None = "auto"
) -> int:
    """`fit`: the GPU type to check the config's memory on ("auto": the partition's; None:
    no check)."""
    cfg, overrides = resolve(config, overrides)
    opts = {**opts, "requeue_code": cfg.fault.requeue_exit_code}
    spec = LaunchSpec(
        config=str(Path(config).resolve()),
        overrides=overrides,
        cwd=str(Path.cwd()),
        nproc_per_node=opts["nproc_per_node"],
        nnodes=opts["nodes"],
        max_restarts=opts["max_restarts"],
        slurm=opts,
    )
    script = render([Path(cfg.run.dir)], opts, cfg.run.name, spec.cwd)
    gpus = opts["gpus_per_node"] and fit is not None
    if dry_run:  # no cluster to ask for its GPU type: checked with --gpu-type only
        if gpus and fit != "auto":
            check_fit(cfg, opts["nodes"], opts["gpus_per_node"], _gpu_card(fit, opts))
        print(script, end="")
        return 0
    check_cluster(opts, script)  # before the run directory is made
    if gpus:
        check_fit(cfg, opts["nodes"], opts["gpus_per_node"], _gpu_card(fit, opts))
    run_dir = prepare(cfg, spec)
    spec.config = str(RunDir(run_dir).config)
    return _submit(spec, script)


def submit_spec(spec: LaunchSpec, name: str | None = None) -> int:
    """Submit the run whose resolved config is `spec.config` (RUN_DIR/config.yaml)."""
    run_dir = Path(spec.config).parent
    opts = spec.slurm or {}
    script = render([run_dir], opts, name or run_dir.name, spec.cwd)
    check_cluster(opts, script)
    return _submit(spec, script)


def _submit(spec: LaunchSpec, script: str) -> int:
    run = RunDir(Path(spec.config).parent)
    job = sbatch(script, run.submit_script)
    spec.job_id = job
    write_spec(run.path, spec)
    record(run.path, event="submit", job_id=job)
    print(f"submitted job {job}: run directory {run.path}")
    print(f"  pretrain status {run.path}    logs: {run.slurm_log(job)}")
    return 0


def render(run_dirs: list[Path], opts: dict, name: str, workdir: str, output: str = "") -> str:
    """The sbatch script for one run, or for a job array over `run_dirs`."""
    array = ""
    if len(run_dirs) > 1:
        array = f"#SBATCH --array=0-{len(run_dirs) - 1}"
        array += f"%{opts['max_parallel']}" if opts.get("max_parallel") else ""
    values = {
        "job_name": re.sub(r"[^\w.-]", "_", opts.get("job_name") or name),
        "nodes": opts["nodes"],
        "resources": "".join(f"#SBATCH {r}\n" for r in resources(opts)),
        "signal_lead": opts["signal_lead"],
        "output": output or str(RunDir(run_dirs[0]).slurm_log("%j")),
        "workdir": workdir,
        "array": array,
        "run_dirs": " ".join(shlex.quote(str(d)) for d in run_dirs),
        "python": shlex.quote(sys.executable),
        "nproc_per_node": opts["nproc_per_node"],
        "max_restarts": opts["max_restarts"],
        "requeue_code": opts.get("requeue_code", 75),
        "final_codes": f"{CONFIG_OR_DATA_ERROR}|{TRAINING_STOPPED}",
        "max_requeues": opts.get("max_requeues", 3),
    }
    template = Path(opts.get("template") or TEMPLATE)
    if not template.is_file():
        raise ConfigError(f"--template {template}: no such file")
    text = template.read_text()
    unknown = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values))
    if unknown:
        raise ConfigError(f"{template}: unknown placeholder {{{{{unknown[0]}}}}}")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), text)


def resources(opts: dict) -> list[str]:
    """The sbatch resource options: what was asked for, and for each node's one task all
    the node's cores (`--exclusive`) and memory (`--mem=0`) unless told otherwise."""
    extra = list(opts.get("sbatch_args") or [])
    given = {arg.split("=", 1)[0] for arg in extra}
    out = [f"--gpus-per-node={opts['gpus_per_node']}"] if opts["gpus_per_node"] else []
    out += [f"{flag}={opts[dest]}" for flag, dest in PASSTHROUGH if opts.get(dest)]
    if not opts.get("cpus_per_task") and not given & {"--exclusive", "--cpus-per-task"}:
        out.append("--exclusive")
    if not opts.get("mem") and not given & {"--mem", "--mem-per-cpu", "--mem-per-gpu"}:
        out.append("--mem=0")
    return out + extra


def check_cluster(opts: dict, script: str) -> None:
    """Refuse, before anything is submitted or written, what this cluster cannot run:
    our own checks for clear messages, then `sbatch --test-only` for everything else."""
    if not shutil.which("sbatch"):
        raise ConfigError(
            "sbatch not found: pretrain submit needs a SLURM client on PATH "
            "(--dry-run prints the script without one)"
        )
    partitions = _partitions()
    name = _partition_name(opts, partitions)
    total = int(partitions[name].get("TotalNodes", 0))
    if opts["nodes"] > total:
        raise ConfigError(f"--nodes {opts['nodes']}: partition {name} has {total} node(s)")
    if opts["gpus_per_node"]:
        gres = _run(["sinfo", "-h", "-p", name, "-o", "%G"]).split()
        if not any("gpu" in g for g in gres):
            raise ConfigError(
                f"--gpus-per-node {opts['gpus_per_node']}: partition {name} has no GPUs "
                f"(gres {' '.join(gres) or 'none'}); on CPU nodes use --gpus-per-node 0 "
                "--nproc-per-node N"
            )
    test = subprocess.run(
        ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60
    )
    if test.returncode != 0:
        raise ConfigError(f"sbatch refused the job: {_last_line(test.stderr)}")


def _partition_name(opts: dict, partitions: dict[str, dict[str, str]]) -> str:
    """--partition, checked, or the cluster's default one."""
    name = opts.get("partition")
    if name and name not in partitions:
        raise ConfigError(
            f"--partition {name}: no such partition (this cluster has: {', '.join(partitions)})"
        )
    if not name:
        name = next((p for p, info in partitions.items() if info.get("Default") == "YES"), None)
        if name is None:
            raise ConfigError("this cluster has no default partition: give --partition")
    return name


def _gpu_card(gpu_type: str, opts: dict):
    """The accelerator of --gpu-type, or ("auto") of the partition's GPU GRES."""
    if gpu_type != "auto":
        return card_named(gpu_type, "--gpu-type")
    if not shutil.which("sinfo"):
        raise ConfigError(
            "sinfo not found: pass --gpu-type for the memory check, or --no-fit-check"
        )
    name = _partition_name(opts, _partitions())
    found = gres_gpu_type(_run(["sinfo", "-h", "-p", name, "-o", "%G"]).split())
    if found is None:
        raise ConfigError(
            f"partition {name}'s GRES names no GPU type: pass --gpu-type for the memory "
            "check, or --no-fit-check"
        )
    return card_named(found, f"partition {name}'s GPU type")


def sbatch(script: str, path: Path) -> str:
    """Write `script` to `path` and submit it; the job id."""
    path.write_text(script)
    r = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ConfigError(f"sbatch refused {path}: {_last_line(r.stderr)}")
    return r.stdout.strip().split(";")[0]


def _partitions() -> dict[str, dict[str, str]]:
    out = {}
    for line in _run(["scontrol", "show", "partition", "-o"]).splitlines():
        info = dict(re.findall(r"(\w+)=(\S*)", line))
        if "PartitionName" in info:
            out[info["PartitionName"]] = info
    return out


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise ConfigError(f"{' '.join(cmd)} failed: {_last_line(r.stderr)}")
    return r.stdout


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
