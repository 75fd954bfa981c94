"""Atomic checkpoints in the run directory, and finding the latest complete one.

Layout under `RUN_DIR/checkpoints/`:

    step_00000200/        a complete checkpoint (it has manifest.json)
      model + optimizer   written by the parallel strategy (DCP files, or DeepSpeed's)
      train_state.json    step, tokens, data-loader position, ... (rank 0)
      config.yaml         the run's resolved config, so the folder stands alone
      rng_rank{r}.pt      every RNG of rank r
      manifest.json       every file above with its size; written last
    latest                the name of the newest complete checkpoint; moved last
    .tmp-step_00000300/   a save in progress (or one killed mid-write): never loaded

A save writes everything into a `.tmp-` folder, fsyncs it, writes the manifest, then
renames the folder into place, so a checkpoint either is complete or does not exist under
its final name. With a background (async) model write, the same commit runs at the first
step boundary after every rank's write is done (or at the next save, or at the end).
Loading re-checks the manifest, and falls back to the previous checkpoint
when files are missing or truncated. Pruning renames a folder to `.trash-` before
deleting it, so a half-deleted checkpoint can never look complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.mirror import CheckpointMirror

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds any trained state to protect (even a damaged one)."""
    return any((Path(run_dir) / "checkpoints").glob("step_*"))


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and finds checkpoints; the strategy writes and reads model + optimizer state.

    `barrier` synchronises ranks (a no-op in one process). Every rank calls `save` (and
    `wait`); only rank 0 renames, moves `latest` and prunes, after every rank's part is
    durable. `mirror`, on rank 0, uploads each committed checkpoint to an object store.
    """

    def __init__(
        self,
        root: Path,
        keep_last: int,
        rank: int = 0,
        barrier: Callable[[], None] = lambda: None,
        mirror: CheckpointMirror | None = None,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier
        self.mirror = mirror if rank == 0 else None
        self._pending: tuple[Future, int] | None = None
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # a save that was killed mid-write
                log.warning("removing incomplete checkpoint %s", stale.name)
                shutil.rmtree(stale, ignore_errors=True)
            for stale in self.root.glob(".trash-*"):  # a prune that was killed mid-delete
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def save(
        self,
        step: int,
        train_state: dict,
        write_model: Callable[[Path], Future | None],
        extra_files: dict[str, str] | None = None,
    ) -> Path:
        """Write checkpoint `step`. `write_model(folder)` writes model and optimizer state;
        when it returns a Future (a background write), the checkpoint is committed by
        `wait()`, which the next save calls first. `extra_files` (rank 0): name -> text."""
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        pending = write_model(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            _write_json(tmp / TRAIN_STATE, train_state)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        if pending is None:
            self._commit(step)
        else:
            self._pending = (pending, step)
        return final

    def commit_if_written(self, any_rank: Callable[[bool], bool]) -> Path | None:
        """Commit a background save as soon as every rank's write has finished; called by
        every rank at the same point (each step), `any_rank` agrees on it across ranks."""
        if self._pending is None or any_rank(not self._pending[0].done()):
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Finish and commit a background save, if one is in flight; returns its folder."""
        if self._pending is None:
            return None
        future, step = self._pending
        self._pending = None
        future.result()  # re-raises a failed write: the checkpoint is then never committed
        return self._commit(step)

    def _commit(self, step: int) -> Path:
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}"
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync(path, missing_ok=True)  # another rank's temp file may be renamed away
        self.barrier()  # every rank's part is on disk
        if self.rank == 0:
            files = {
                str(p.relative_to(tmp)): p.stat().st_size
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            _write_json(tmp / MANIFEST, {"step": step, "files": files})
            _fsync(tmp)
            if self.mirror is not None:  # no prune under an upload still reading
                self.mirror.wait()
            if final.exists():  # re-saving a step (e.g. after a resume): replace atomically
                _trash(final)
            os.rename(tmp, final)
            _fsync(self.root)
            _write_json(self.root / "latest", {"checkpoint": final.name, "step": step})
            self._prune()
            if self.mirror is not None:
                self.mirror.upload(final)
        self.barrier()
        return final

    def fetch(self) -> None:
        """Rank 0 downloads the mirror's newest checkpoint when it is newer than any here;
        every rank returns once it is in place."""
        if self.mirror is not None:
            self.mirror.fetch_if_newer(self.root, self.latest())
        self.barrier()

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        complete = self.complete()
        return complete[0] if complete else None

    def load(self, path: Path, read_model: Callable[[Path], None]) -> dict:
        read_model(path)
        rng = path / f"rng_rank{self.rank}.pt"
        if rng.exists():  # absent when resuming on more ranks than were saved
            set_rng_state(torch.load(rng, weights_only=False))
        return json.loads((path / TRAIN_STATE).read_text())

    def _prune(self) -> None:
        for old in self.complete()[self.keep_last :]:
            _trash(old)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (RUN_DIR/checkpoints), newest first: what a
    resume would load, in order."""
    found = []
    for path in Path(root).glob("step_*"):
        match = STEP_RE.match(path.name)
        if match and path.is_dir() and _verify(path):
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_step(path: Path) -> int:
    return int(STEP_RE.match(path.name).group(1))


def _verify(path: Path) -> bool:
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            log.warning(
                "checkpoint %s is damaged (%s missing or truncated); skipping it", path.name, name
            )
            return False
    return True


def _trash(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync(path: Path, missing_ok: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
