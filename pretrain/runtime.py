"""Process start-up, in one place: run directory, seeds, threads, temp files, logging.

Everything a training process must do before the first tensor is made happens in
`start(cfg)`, in a fixed order, so a resumed or restarted process sets itself up exactly
like the original one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pretrain import data_order, lockfile
from pretrain.checkpoint import has_checkpoint
from pretrain.config import Config, ConfigError, from_dict, to_dict, to_yaml

log = logging.getLogger("pretrain")

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


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("streaming", "filelock", "urllib3", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start(cfg: Config, rank: int = 0) -> Path:
    """Prepare this process for training; returns the run directory."""
    if rank == 0:
        lock_run_dir(Path(cfg.run.dir))
    run_dir = prepare_run_dir(cfg, write=rank == 0)
    if cfg.parallel.threads:
        torch.set_num_threads(cfg.parallel.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    seed_everything(cfg.run.seed)
    scope_temp_files(scratch_dir(cfg))
    return run_dir


def init_distributed(timeout_s: float = 600.0, device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes; (rank, world_size). (0, 1) without torchrun.

    The backend follows the device every rank agreed on (`agree_on_device`): NCCL on
    CUDA, gloo on CPU, so one node whose CUDA failed cannot quietly pick gloo while the
    others pick NCCL. The group is built on a store prefixed by the restart attempt: after
    `torchrun --max-restarts` restarts the workers, the new attempt must not read the
    addresses the old one left in the reused rendezvous store (pytorch#135712), and every
    collective has a timeout so a dead peer ends in an error, not a hang.
    """
    import datetime

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        if not dist.is_initialized():
            choose_device(device, cuda_usable())  # a one-process run checks alone
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rank = int(os.environ["RANK"])
    timeout = datetime.timedelta(seconds=timeout_s)
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timeout,
    )
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)
    kind = agree_on_device(device, store, rank, world)
    backend = "nccl" if kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    log.info("process group: %d ranks, %s on %s (parallel.device=%s)", world, backend, kind, device)
    return rank, world


# Test-only fault injection: "RANK:0|1[,RANK:0|1...]" makes those ranks report CUDA as
# (un)usable whatever the truth, so a test on a machine without GPUs can make ranks disagree.
FAULT_CUDA_ENV = "PRETRAIN_FAULT_CUDA_USABLE"


def cuda_usable(rank: int | None = None) -> bool:
    """Whether this process can run on CUDA: a device is visible and initialises."""
    forced = dict(item.split(":") for item in os.environ.get(FAULT_CUDA_ENV, "").split(",") if item)
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if str(rank) in forced:
        return forced[str(rank)] == "1"
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except RuntimeError:  # a driver that fails to initialise
        return False


def choose_device(requested: str, usable: bool, where: str = "this process") -> str:
    """The device kind, cuda or cpu, for `parallel.device` (auto|cuda|cpu), given whether
    CUDA is usable (`where`: the processes that verdict is about, for the error)."""
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" and not usable:
        raise ConfigError(
            f"parallel.device=cuda, but CUDA is not usable in {where}: check the GPU and "
            "driver (nvidia-smi), or set parallel.device=cpu to train on CPU"
        )
    return "cuda" if usable else "cpu"


def agree_on_device(requested: str, store, rank: int, world: int) -> str:
    """The device kind every rank uses, decided together before any backend is chosen.

    Each rank adds its verdict (is CUDA usable here?) to counters in the rendezvous store
    and waits until all have; a constant number of store calls per rank. All usable: cuda
    (unless cpu was asked for), none: cpu; a mix is an error on every rank naming a rank
    without CUDA, never a silent CPU run on some nodes or a hang in NCCL init.
    """
    import socket

    import torch.distributed as dist

    here = f"rank {rank} ({socket.gethostname()})"
    usable = requested != "cpu" and cuda_usable(rank)
    votes = dist.PrefixStore("device", store)
    if requested != "cpu" and not usable:
        votes.compare_set("without", "", here)  # the first rank to say so is named
    votes.add("usable", int(usable))
    if votes.add("arrived", 1) == world:
        votes.set("done", "1")
    votes.wait(["done"])
    count = votes.add("usable", 0)
    if 0 < count < world:
        without = votes.get("without").decode()
        raise ConfigError(
            f"parallel.device={requested}: CUDA is usable on {count} of {world} ranks but not "
            f"on {without} (this is {here}); fix that node's GPU or driver, or set "
            "parallel.device=cpu"
        )
    return choose_device(requested, count == world, f"any of the {world} ranks")


def die_with_launcher() -> None:
    """Under torchrun, end this worker when its agent dies, even by kill -9.

    torchrun starts every worker in a session of its own, so nothing else stops an orphaned
    worker from training on (holding the run lock, GPUs and cores) after its launcher is
    gone: a node agent killed by the OOM killer or by a test would otherwise leave it. The
    kernel sends SIGKILL on the parent's death (Linux `PR_SET_PDEATHSIG`).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() == 1:  # the agent died before the line above
        os._exit(128 + int(signal.SIGKILL))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


SCRATCH_ENV = "PRETRAIN_SCRATCH"


def scratch_dir(cfg: Config) -> Path:
    """This run's folder on node-local scratch: streaming's cache and the temp dir.

    `run.scratch`, else $PRETRAIN_SCRATCH, else /tmp, plus `pretrain-` and 10 hex digits
    of the run directory's absolute path: the same on every node and every restart of the
    run, distinct between runs, and short, because DataLoader workers pass tensors over
    AF_UNIX sockets in the temp dir, whose paths may not exceed 107 bytes.
    """
    base = cfg.run.scratch or os.environ.get(SCRATCH_ENV) or "/tmp"
    tag = hashlib.sha1(os.path.abspath(cfg.run.dir).encode()).hexdigest()[:10]
    return Path(os.path.abspath(os.path.expanduser(base))) / f"pretrain-{tag}"


def scope_temp_files(scratch: Path) -> None:
    """Point TMPDIR at SCRATCH/tmp (node-local, short), dropping lock files a killed run left.

    Temp files (DataLoader sockets, compile caches, streaming's `*_filelock` files) belong
    on the node, not on the shared filesystem. The folder is this run's own, so every lock
    file there belongs to an earlier process of this run (the run lock says none is alive),
    and a stale one would make streaming skip or wait on its prefix.
    """
    tmp = scratch / "tmp"
    try:
        tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = scratch.stat().st_uid
    except OSError as e:
        raise ConfigError(
            f"run.scratch: cannot use {scratch} ({e.strerror}); set run.scratch or "
            f"${SCRATCH_ENV} to a writable node-local folder"
        ) from None
    if hasattr(os, "getuid") and owner != os.getuid():  # e.g. planted in a shared /tmp
        raise ConfigError(
            f"run.scratch: {scratch} belongs to another user; set run.scratch or ${SCRATCH_ENV}"
        )
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        for stale in tmp.glob("*_filelock"):
            stale.unlink(missing_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = None  # re-read TMPDIR


_RUN_LOCK = None  # held (open) for the life of the process; the kernel drops it on any exit


def lock_run_dir(run_dir: Path) -> None:
    """At most one training process tree per run directory (rank 0 holds the lock)."""
    global _RUN_LOCK
    _RUN_LOCK = lockfile.hold(run_dir / ".lock", "training process")


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
                stream.pop("remote"), stream.pop("local")
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
