"""The run directory: every file in it named once, and the functions that own them.

    config.yaml           the resolved config: the folder alone reproduces the run (also the
                          name of its copy in every checkpoint folder)
    metrics.jsonl         one record per step, evaluation and event (pretrain.train.metrics)
    checkpoints/          step_N folders and `latest` (pretrain.checkpoint)
    logs/LAUNCH/          attemptK.rankR.{out,err,error.json}: every rank's output (launch.local)
    logs/slurm-JOB.out    a SLURM job's own output (launch.slurm)
    launch.json           how the run was launched, so `pretrain resume` can repeat it
    launches.jsonl        every launcher's start and exit (launch.spec)
    submit.sbatch         the script submitted to SLURM
    .lock                 held by the training's rank 0 while it runs
    .launch-nodeN.lock    held by node N's launcher while it runs
    data_hashes.json      xxh64 of local shards by path, size and mtime: a cache (data.check)
    data_order.json       num_canonical_nodes, fixed at the first start (data.order)
    data_SPLIT.json       what the datasets were when the run started (data.check)
    stacks/               every rank's stacks when the watchdog fires (train.resilience)
    wandb_id, wandb/      the wandb run this run logs to, and wandb's own files

A sweep's folder (`pretrain sweep`, `SweepDir`) holds one run directory per grid point,
`sweep.json`, `sweep.sbatch` and `logs/`. Inside a checkpoint folder the files are the
checkpointer's (manifest.json, train_state.json, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain import files
from pretrain.config.load import from_dict, to_dict, to_yaml
from pretrain.config.schema import Config
from pretrain.errors import ConfigError, DataError

# Names with a field, filled in by the methods below.
RANK_LOG = "attempt{attempt}.rank{rank}.{kind}"  # kind: out, err or error.json
SLURM_LOG = "slurm-{job}.out"  # job: a job id, or an sbatch pattern (%j, %A_%a)
NODE_LOCK = ".launch-node{node}.lock"
DATA_FINGERPRINTS = "data_{split}.json"


class _File:
    """A file or folder of a directory: on the class its name (`RunDir.config.name`), on
    an instance its path (`RunDir(path).config`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, folder, owner=None):
        return self if folder is None else folder.path / self.name


class RunDir:
    """The paths of one run directory; making one reads and creates nothing. Its files
    come in three groups, each beside the methods that use it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir:
        """The run directory of a checkpoint folder (RUN_DIR/checkpoints/step_N)."""
        return cls(Path(checkpoint).parent.parent)

    # What the run is and what it did.
    config = _File("config.yaml")
    metrics = _File("metrics.jsonl")
    checkpoints = _File("checkpoints")
    stacks = _File("stacks")
    wandb_id = _File("wandb_id")

    @property
    def wandb_dir(self) -> Path:
        """wandb.init's `dir`: wandb keeps its files in a `wandb/` folder in it."""
        return self.path

    def read_config(self) -> dict:
        """config.yaml as plain data (no schema: it may be from an older version)."""
        import yaml

        return yaml.safe_load(self.config.read_text()) or {}

    def has_checkpoint(self) -> bool:
        """Whether the run holds any trained state to protect (even a damaged checkpoint)."""
        from pretrain.checkpoint.folders import step_folders

        return bool(step_folders(self.checkpoints))

    def complete_checkpoints(self) -> list[Path]:
        """The complete checkpoints, newest first: what a resume would load, in order."""
        from pretrain.checkpoint.folders import complete_checkpoints

        return complete_checkpoints(self.checkpoints)

    # How it was started, and who runs it now.
    launch_spec = _File("launch.json")
    launch_history = _File("launches.jsonl")
    submit_script = _File("submit.sbatch")
    logs = _File("logs")
    lock = _File(".lock")

    def node_lock(self, node: int) -> Path:
        return self.path / NODE_LOCK.format(node=node)

    def locks(self) -> list[Path]:
        """The training's lock and every launcher's: held while any part of the run runs."""
        return [self.lock, *self.path.glob(NODE_LOCK.format(node="*"))]

    def launch_logs(self, launch: str) -> Path:
        return self.logs / launch

    def rank_log(self, launch: str, attempt: int | str, rank: int | str, kind: str) -> Path:
        return self.launch_logs(launch) / RANK_LOG.format(attempt=attempt, rank=rank, kind=kind)

    def slurm_log(self, job: str) -> Path:
        """A SLURM job's output; `job` may be sbatch's pattern, `%j`."""
        return self.logs / SLURM_LOG.format(job=job)

    # The data it was started on.
    data_hashes = _File("data_hashes.json")
    data_order = _File("data_order.json")

    def data_fingerprints(self, split: str) -> Path:
        return self.path / DATA_FINGERPRINTS.format(split=split)

    def recorded_data_order(self) -> int | None:
        """num_canonical_nodes recorded at the run's first start (pretrain.data.order)."""
        try:
            return int(json.loads(self.data_order.read_text())["num_canonical_nodes"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{self.data_order}: unreadable ({e}); restore it, or delete it to choose again"
            ) from None

    def record_data_order(self, value: int, why: str) -> None:
        """Record the run's num_canonical_nodes (global rank 0 only)."""
        files.write_json(self.data_order, {"num_canonical_nodes": value, "chosen": why})


class SweepDir:
    """The paths of a sweep's folder (`pretrain sweep`)."""

    spec = _File("sweep.json")  # the base config, overrides, grid and each run's values
    script = _File("sweep.sbatch")
    logs = RunDir.logs

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def run(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    def slurm_log(self) -> Path:
        """Every array task's output, as an sbatch pattern."""
        return self.logs / SLURM_LOG.format(job="%A_%a")


# Sections that must not change when a run directory is reused: a different model, data or
# optimisation would make the resumed run a different experiment. Length, checkpointing
# and logging may change (e.g. training longer than first planned), and so may where a
# stream is stored (local <-> s3://): data_check compares the datasets themselves.
FROZEN_SECTIONS = ("model", "data", "optim", "schedule", "parallel")


# How a run is executed, not what it computes (beyond float rounding): free to change on
# resume, e.g. a smaller loss chunk after an out-of-memory error, or device=cuda made strict.
# The mesh is as free as the number of ranks: DCP checkpoints reshard onto any layout.
OPERATIONAL_PARALLEL_KEYS = (
    "threads",
    "device",
    "fsdp_defer_grad_sync",
    "loss_chunk_tokens",
    "dp_replicate",
    "dp_shard",
    "tp",
    "tp_spans_nodes",
    "ep",
)


# How data is fetched and checked, not what it is: free to change on resume.
OPERATIONAL_DATA_KEYS = (
    "num_workers",
    "validate_hashes",
    "skip_bad_shards",
    "download_retry",
    "download_timeout",
)


_RUN_LOCK = None  # held (open) for the life of the process; the kernel drops it on any exit


def lock_run_dir(run_dir: Path) -> None:
    """At most one training process tree per run directory (rank 0 holds the lock)."""
    global _RUN_LOCK
    _RUN_LOCK = files.hold(RunDir(run_dir).lock, "training process")


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run directory, or check that an existing one holds the same experiment
    (global rank 0 or a launcher: one process, never every rank).

    The resolved config is written to `config.yaml`, so the folder alone reproduces the run.
    """
    run = RunDir(cfg.run.dir)
    if run.config.exists() and run.has_checkpoint():  # before any, nothing to protect
        check_same_experiment(cfg, run.config)
        _keep_legacy_data_order(run)
    run.path.mkdir(parents=True, exist_ok=True)
    files.write_atomic(run.config, to_yaml(cfg))
    return run.path


def _keep_legacy_data_order(run: RunDir) -> None:
    """A run from before data_order.json: keep the num_canonical_nodes its saved config
    holds (read before config.yaml is overwritten, only for a run with a checkpoint)."""
    value = (run.read_config().get("data") or {}).get("num_canonical_nodes")
    if value is not None and run.recorded_data_order() is None:
        run.record_data_order(int(value), "config.yaml of the run before data_order.json existed")


def check_same_experiment(cfg: Config, saved: Path) -> None:
    """Refuse `cfg` when a frozen section differs from the config saved at `saved`."""
    import yaml

    if not saved.exists():  # a checkpoint from before checkpoints carried their config
        return

    try:
        before = to_dict(from_dict(yaml.safe_load(saved.read_text())))
    except Exception as e:
        raise ConfigError(
            f"{saved}: cannot read the saved config ({e}); use a new run.dir"
        ) from None
    now = to_dict(cfg)
    for config in (before, now):  # where the data lives may change; what it is may not
        for key in ("streams", "val_streams"):
            for stream in config["data"][key]:
                stream.pop("path"), stream.pop("local")
        for key in OPERATIONAL_DATA_KEYS:
            config["data"].pop(key)
        for key in OPERATIONAL_PARALLEL_KEYS:
            config["parallel"].pop(key, None)  # None: a config from before the key existed
    if None in (before["data"]["num_canonical_nodes"], now["data"]["num_canonical_nodes"]):
        for config in (before, now):  # None: the value recorded in data_order.json is used
            config["data"].pop("num_canonical_nodes")
    for section in FROZEN_SECTIONS:
        diff = _first_difference(before[section], now[section], section)
        if diff:
            key, old, new = diff
            raise ConfigError(
                f"run.dir {saved.parent} holds a run with {key}={old!r}, this config has {new!r}; "
                "use another run.name (or run.dir) for a new experiment"
            )


def _first_difference(a, b, prefix: str):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
            if diff:
                return diff
        return None
    return None if a == b else (prefix, a, b)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder: `path` itself, or a run directory's latest complete one."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    complete = RunDir(path).complete_checkpoints()
    if complete:
        return complete[0]
    from pretrain.checkpoint.folders import MANIFEST

    if (path / MANIFEST).is_file():  # a complete checkpoint, but not in DCP format
        raise ConfigError(
            f"{path}: a DeepSpeed ZeRO checkpoint; export and generate read DCP checkpoints "
            "(ddp, fsdp or single runs)"
        )
    raise ConfigError(f"{path}: neither a checkpoint folder (step_N) nor a run directory")


def checkpoint_config(checkpoint: Path) -> Config:
    """The run config saved with a checkpoint (or its run directory's)."""
    import yaml

    for path in (checkpoint / RunDir.config.name, RunDir.of_checkpoint(checkpoint).config):
        if path.is_file():
            return from_dict(yaml.safe_load(path.read_text()))
    raise ConfigError(f"{checkpoint}: no config.yaml beside the checkpoint")


def find_tokenizer(path: str | Path, checkpoint: Path) -> Path:
    """The tokenizer named by the config: absolute, relative to here, or to where the run
    was launched (launch.json's cwd)."""
    path = Path(path)
    candidates = [path]
    launch = RunDir.of_checkpoint(checkpoint).launch_spec
    if not path.is_absolute() and launch.is_file():
        candidates.append(Path(json.loads(launch.read_text()).get("cwd", ".")) / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"tokenizer {path} not found (data.tokenizer); give it with --tokenizer")
