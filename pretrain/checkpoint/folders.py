"""Which folders under RUN_DIR/checkpoints are checkpoints, and which are complete.

Names and manifests only, no torch: `pretrain status` and `sweep-status` read them in a
process that must start in a fraction of a second, and the checkpointer reads them too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

from pretrain import iotrace

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(STEP_RE.match(path.name).group(1))


def step_folders(root: Path) -> list[Path]:
    """Folders named like checkpoints, newest first (complete or not)."""
    found = [p for p in Path(root).glob("step_*") if STEP_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step, reverse=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (RUN_DIR/checkpoints), newest first: what a
    resume would load, in order."""
    return [path for path in step_folders(root) if verify(path)]


def verify(path: Path) -> bool:
    """Whether every file the manifest of checkpoint `path` lists is there, at its size."""
    manifest = path / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for name, size in files.items():
        iotrace.record(iotrace.STAT, path / name)
        try:
            found = os.stat(path / name)
        except OSError:
            found = None
        if found is None or not stat.S_ISREG(found.st_mode) or found.st_size != size:
            log.warning(
                "checkpoint %s is damaged (%s missing or truncated); skipping it", path.name, name
            )
            return False
    return True
