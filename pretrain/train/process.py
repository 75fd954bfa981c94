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

from pretrain.checkpoint.ranks import Ranks
from pretrain.config.schema import Config
from pretrain.errors import ConfigError
from pretrain.rundir import lock_run_dir, prepare_run_dir

log = logging.getLogger("pretrain")


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("streaming", "filelock", "urllib3", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start(cfg: Config) -> Path:
    """Prepare this process for training; returns the run directory."""
    # Global rank 0 alone locks, checks and writes the run directory (on a shared filesystem,
    # not 1,000 ranks reading config.yaml and listing checkpoints); its refusal stops all.
    run_dir = Ranks.current().from_rank0(
        lambda _: _own_run_dir(cfg),
        cfg.fault.collective_timeout_s,
        "preparing the run directory",
        ConfigError,
    )
    if cfg.parallel.threads:
        torch.set_num_threads(cfg.parallel.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    seed_everything(cfg.run.seed)
    scope_temp_files(scratch_dir(cfg))
    return run_dir


def _own_run_dir(cfg: Config) -> Path:
    lock_run_dir(Path(cfg.run.dir))
    return prepare_run_dir(cfg)


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
