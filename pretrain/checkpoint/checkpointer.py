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

A save writes everything into a `.tmp-` folder, makes it durable, writes the manifest, then
renames the folder into place, so a checkpoint either is complete or does not exist under
its final name. With a background (async) model write, the same commit runs at the first
step boundary after every rank's write is done (or at the next save, or at the end).

The work of a commit stays O(own files) per rank at any scale: each rank fsyncs only the
files it wrote (found by name, `sync_own_files`), and sends their names and sizes to rank 0
in one collective; rank 0 writes the manifest from them without touching another rank's
file (only one the naming rule does not know, found by listing the folder once).
Resuming, rank 0 alone picks the checkpoint (reading manifests, checking sizes) and tells
the others, so every rank loads the same one even when their views of a shared filesystem
differ for a moment. Loading falls back to the previous checkpoint when files are missing
or truncated. Pruning renames a folder to `.trash-` before deleting it, so a half-deleted
checkpoint can never look complete. Which folders are checkpoints, and which are complete,
is `folders.py`'s: it imports no torch, for `pretrain status`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pretrain.checkpoint.folders import (
    MANIFEST,
    complete_checkpoints,
    step_dir_name,
    step_folders,
    verify,
)
from pretrain.checkpoint.ranks import Ranks
from pretrain.errors import StoreError
from pretrain.files import fsync_path, sync_files, sync_folders, write_durable, write_json

if TYPE_CHECKING:
    from pretrain.checkpoint.mirror import CheckpointMirror

log = logging.getLogger(__name__)
TRAIN_STATE = "train_state.json"


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

    `ranks`: the default process group's (one process when there is none). Every rank
    calls `save` (and `wait`, `resume_point`) at the same point; only rank 0
    writes the manifest, renames, moves `latest` and prunes, after every rank's part is
    durable. With a `mirror`, every rank uploads its own files of each committed checkpoint
    (one at a time: see pretrain.checkpoint.mirror).
    """

    def __init__(
        self,
        root: Path,
        keep_last: int,
        ranks: Ranks | None = None,
        mirror: CheckpointMirror | None = None,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.ranks = ranks or Ranks.current()
        self.rank = self.ranks.rank
        self.mirror = mirror
        if mirror is not None:
            mirror.ranks = self.ranks
        self._pending: tuple[Future, int] | None = None
        self._extra_names: list[str] = []
        self._verified: set[str] = set()  # complete checkpoints rank 0 wrote or checked
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # a save that was killed mid-write
                log.warning("removing incomplete checkpoint %s", stale.name)
                shutil.rmtree(stale, ignore_errors=True)
            for stale in self.root.glob(".trash-*"):  # a prune that was killed mid-delete
                shutil.rmtree(stale, ignore_errors=True)
        self.ranks.barrier()

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
        self.ranks.barrier()
        pending = write_model(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:  # made durable with every other file by the commit
            (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=1))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        self._extra_names = list(extra_files or {})
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
        mine = sync_own_files(tmp, self.rank, self._extra_names)
        parts = self.ranks.gather(mine)
        info = None
        if self.rank == 0:
            files = {name: size for part in parts for name, size in part.items()}
            # Any file no rank claimed (one the naming rule does not know) is rank 0's to
            # make durable; every rank has reported, so none is still growing.
            late = sync_files(tmp, [n for n in _list_files(tmp) if n not in files])
            files.update(late)
            mine.update(late)
            manifest = {"step": step, "files": dict(sorted(files.items()))}
            write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            sync_folders(tmp, files)
            if final.exists():  # re-saving a step (e.g. after a resume): replace atomically
                _trash(final)
            os.rename(tmp, final)
            fsync_path(self.root)
            self._verified.add(final.name)
            write_json(self.root / "latest", {"checkpoint": final.name, "step": step})
            most = max(sum(part.values()) for part in parts)
            # A commit never waits for an upload: while the last one is in flight (rank 0's
            # part ends last), every rank skips this one, as rank 0 decides here.
            uploading = self.mirror.in_flight() if self.mirror is not None else None
            info = {"rank_bytes": most, "tag": uuid.uuid4().hex, "uploading": uploading}
        info = self.ranks.broadcast(info)  # every rank: the checkpoint is in place
        if self.rank == 0:  # after the broadcast: nobody waits in a collective for a slow delete
            self._prune(keep=info["uploading"])
        if self.mirror is not None:
            skip = info["uploading"] is not None
            self.mirror.upload(final, mine, info["rank_bytes"], info["tag"], skip=skip)
        return final

    def resume_point(self) -> Path | None:
        """The checkpoint every rank resumes from: rank 0 picks the newest complete one in
        the run directory, or a newer one in the mirror, which every rank helps download;
        every rank gets rank 0's answer. None: nothing to resume from."""
        plan = self._plan_resume() if self.rank == 0 else None
        plan = self.ranks.broadcast(plan)
        if plan["error"]:
            raise StoreError(plan["error"])
        name = plan["local"]
        if plan["fetch"] is not None:
            try:
                name = self.mirror.fetch(self.root, plan["fetch"]).name
                self._verified.add(name)
            except StoreError as e:
                if name is None:
                    raise StoreError(
                        f"{e}; the run directory has no checkpoint to fall back to: "
                        "fix access to checkpoint.remote and rerun"
                    ) from None
                if self.rank == 0:
                    log.error("%s; resuming from %s in the run directory instead", e, name)
        return self.root / name if name else None

    def _plan_resume(self) -> dict:
        local = self.latest()
        plan = {"local": local.name if local else None, "fetch": None, "error": None}
        if self.mirror is not None:
            try:
                plan["fetch"] = self.mirror.plan_fetch(self.root, plan["local"])
            except StoreError as e:
                if local is None:  # a new start must not ignore (and later prune) the store
                    plan["error"] = f"cannot read checkpoint.remote: {e}"
                else:
                    log.error("cannot read checkpoint.remote: %s; resuming from %s", e, local.name)
        return plan

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: each checked, newest first, until one is."""
        for path in step_folders(self.root):
            if verify(path):
                self._verified.add(path.name)
                return path
        return None

    def load(self, path: Path, read_model: Callable[[Path], None]) -> dict:
        read_model(path)
        rng = path / f"rng_rank{self.rank}.pt"
        if rng.exists():  # absent when resuming on more ranks than were saved
            set_rng_state(torch.load(rng, weights_only=False))
        return json.loads((path / TRAIN_STATE).read_text())

    def _prune(self, keep: str | None = None) -> None:
        """Trash complete checkpoints beyond `keep_last`, except `keep` (one being uploaded:
        pruned by a later commit, once its upload has ended)."""
        # Checkpoints this process committed or checked count as complete without their
        # files being checked again: that would stat every rank's files at every commit.
        kept = 0
        for path in step_folders(self.root):
            if path.name in self._verified or verify(path):
                self._verified.add(path.name)
                kept += 1
                if kept > self.keep_last and path.name != keep:
                    _trash(path)
                    self._verified.discard(path.name)


def _trash(path: Path) -> None:
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _list_files(folder: Path) -> list[str]:
    """Every file under `folder`, relative, from directory listings only (no stat)."""
    names = []
    for parent, _, files in os.walk(folder):
        rel = Path(parent).relative_to(folder)
        names += [(rel / f).as_posix() for f in files]
    return sorted(names)


def sync_own_files(folder: Path, rank: int, extra: list[str] = ()) -> dict[str, int]:
    """Make the files `rank` wrote into checkpoint `folder` durable; name -> size.

    They are found by name (`file_owner`'s rule), without listing the folder: every rank
    listing a folder of every rank's files reads O(ranks²) entries per commit. A file the
    rule does not name is left to rank 0, which lists the folder once after every rank
    reported. `extra`: rank 0's further files (train_state.json's companions)."""
    own = [f"rng_rank{rank}.pt"] + [
        f"zero/{bf16}zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt"
        for bf16 in ("", "bf16_")
        for kind in ("optim", "model")
    ]
    if rank == 0:
        own += [".metadata", TRAIN_STATE, "zero/mp_rank_00_model_states.pt", *extra]
    sizes = sync_files(folder, own, missing_ok=True)
    for i in itertools.count():  # DCP: one file per writer thread, numbered from 0
        shard = sync_files(folder, [f"__{rank}_{i}.distcp"], missing_ok=True)
        if not shard:
            break
        sizes.update(shard)
    return sizes
