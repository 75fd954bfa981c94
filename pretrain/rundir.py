"""The run directory: every path in it named once, and the functions that own them."""

from __future__ import annotations

import os
from pathlib import Path

from pretrain import files
from pretrain.checkpoint.checkpointer import has_checkpoint
from pretrain.config.load import from_dict, to_dict, to_yaml
from pretrain.config.schema import Config
from pretrain.data import order as data_order
from pretrain.errors import ConfigError

# Sections that must not change when a run directory is reused: a different model, data or
# optimisation would make the resumed run a different experiment. Length, checkpointing
# and logging may change (e.g. training longer than first planned), and so may where a
# stream is stored (local <-> s3://): data_check compares the datasets themselves.
FROZEN_SECTIONS = ("model", "data", "optim", "schedule", "parallel")


# How data is fetched and checked, not what it is: free to change on resume.
# How a run is executed, not what it computes (beyond float rounding): free to change on
# resume, e.g. a smaller loss chunk after an out-of-memory error, or device=cuda made strict.
OPERATIONAL_PARALLEL_KEYS = ("threads", "device", "fsdp_defer_grad_sync", "loss_chunk_tokens")


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
    _RUN_LOCK = files.hold(run_dir / ".lock", "training process")


def prepare_run_dir(cfg: Config, write: bool = True) -> Path:
    """Create the run directory, or check that an existing one holds the same experiment.

    The resolved config is written to `config.yaml`, so the folder alone reproduces the run.
    """
    run_dir = Path(cfg.run.dir)
    saved = run_dir / "config.yaml"
    if saved.exists() and has_checkpoint(run_dir):  # before any checkpoint, nothing to protect
        check_same_experiment(cfg, saved)
        if write:  # a run from before data_order.json keeps the order its config.yaml fixed
            import yaml

            data_order.keep_legacy(run_dir, yaml.safe_load(saved.read_text()))
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_name("config.yaml.tmp")
        tmp.write_text(to_yaml(cfg))
        os.replace(tmp, saved)
    return run_dir


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
