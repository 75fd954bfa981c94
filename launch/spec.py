"""How a run was started, recorded in its directory so that `pretrain resume` can repeat it.

RUN_DIR/launch.json     the launch spec (config, overrides, ranks, SLURM options)
RUN_DIR/launches.jsonl  one line per launcher start and exit (time, node, exit code),
                        appended by every node's launcher at once (see `record`)
RUN_DIR/config.yaml     the resolved config (written here and by the trainer)

(Every file's name is in pretrain.rundir.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from pretrain import files
from pretrain.config.load import load_config
from pretrain.config.schema import Config
from pretrain.errors import ConfigError
from pretrain.rundir import RunDir, prepare_run_dir


@dataclass
class LaunchSpec:
    config: str  # absolute path of the YAML given at launch (the run dir's config.yaml later)
    overrides: list[str] = field(default_factory=list)
    cwd: str = "."  # relative paths in the config (data, tokenizer) are relative to this
    nproc_per_node: int = 1
    nnodes: int | str = 1  # a node count, or "MIN:MAX" for an elastic range
    max_restarts: int = 0
    slurm: dict | None = None  # `pretrain submit` options, to resubmit on resume
    job_id: str | None = None  # the SLURM job (or array task) that runs it


def resolve(config: str | Path, overrides: list[str]) -> tuple[Config, list[str]]:
    """Load and check the config; pin `run.dir` to an absolute path (so the run can be
    resumed, requeued or inspected from any working directory). Returns the config and
    the overrides that reproduce it."""
    cfg = load_config(config, overrides)
    run_dir = Path(cfg.run.dir).resolve()
    pinned = [o for o in overrides if not o.startswith("run.dir=")] + [f"run.dir={run_dir}"]
    return load_config(config, pinned), pinned


def prepare(cfg: Config, spec: LaunchSpec) -> Path:
    """Create the run directory with its resolved config and launch spec; a directory
    that holds another experiment's checkpoints is refused, before anything starts."""
    run_dir = prepare_run_dir(cfg)
    RunDir(run_dir).logs.mkdir(parents=True, exist_ok=True)
    write_spec(run_dir, spec)
    return run_dir


def write_spec(run_dir: Path, spec: LaunchSpec) -> None:
    files.write_json(RunDir(run_dir).launch_spec, dataclasses.asdict(spec), indent=2)


def read_spec(run_dir: Path) -> LaunchSpec | None:
    path = RunDir(run_dir).launch_spec
    if not path.exists():
        return None
    try:
        return LaunchSpec(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{path}: not a launch spec ({e}); relaunch with pretrain launch"
        ) from None


def require_positive(**values: int) -> None:
    """A one-line error for a count option below 1, named as on the command line."""
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def node_range(nnodes: int | str) -> tuple[int, int]:
    """(min, max) nodes of `--nnodes N` or `--nnodes MIN:MAX`, else a one-line error."""
    text = str(nnodes)
    parts = text.split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        low, high = 0, -1
    if not 1 <= low <= high:
        raise ConfigError(
            f"--nnodes {text}: expected a node count N or a range MIN:MAX with 1 <= MIN <= MAX"
        )
    return low, high


def require_run(run_dir: str | Path) -> Path:
    """`run_dir` if it is a run directory, else a one-line error."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not RunDir(path).config.is_file():
        raise ConfigError(
            f"{run_dir}: not a run directory (no config.yaml); give the run.dir of a run "
            "started with pretrain train, launch or submit"
        )
    return path.resolve()


def record(run_dir: Path, **event) -> None:
    """Append one launcher event to the run's history, which every node's launcher
    appends to at the same moments (start, exit).

    One write() of one whole line, under an exclusive flock. O_APPEND alone is atomic
    only on a local disk: an NFS client appends at the file size it last saw, so two
    nodes' lines can land on the same offset. The lock makes the client revalidate the
    size first (and is coherent across NFS clients); where a filesystem has no locks
    (Lustre mounted without `flock`), the append goes ahead unlocked. A line cut short by
    a crash is ended before the next one, so readers lose only that line.
    """
    line = json.dumps({"time": time.time(), "host": socket.gethostname(), **event}) + "\n"
    fd = os.open(RunDir(run_dir).launch_history, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):  # no locks on this filesystem
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line
        os.write(fd, line.encode())
    finally:
        os.close(fd)  # also drops the lock


def read_history(run_dir: Path) -> list[dict]:
    from pretrain.train.metrics import read_jsonl

    return read_jsonl(RunDir(run_dir).launch_history)
