"""Checkpoints mirrored to an object store: uploaded once complete, fetched when newer.

With `checkpoint.remote: s3://bucket/prefix`, rank 0 uploads every checkpoint after it is
committed in the run directory, in a background thread, in the order the disk commit
uses: each file, then `manifest.json` last. A checkpoint folder in the store is complete
exactly when its manifest is there, so a node that dies mid-upload leaves nothing a
resume would take. `keep_last` applies to the store as well.

On resume, when the store holds a complete checkpoint newer than any in the run directory
(a replacement node, a lost disk), rank 0 downloads it into a `.tmp-` folder, checks every
file against the manifest's sizes, and renames it into place before any rank loads it.

Rank 0 reads and writes every rank's files, so the run directory must be one filesystem
for all ranks (a shared filesystem on a cluster), as it already is for `latest`. Upload
failures are logged, never fatal: the local checkpoint is intact and training goes on.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

from pretrain import objstore
from pretrain.objstore import StoreError

log = logging.getLogger("pretrain")
MANIFEST = "manifest.json"


class CheckpointMirror:
    def __init__(self, url: str, keep_last: int) -> None:
        self.url = url.rstrip("/")
        self.keep_last = keep_last
        self._thread: threading.Thread | None = None
        self.failures = 0

    # ------------------------------------------------------------ upload
    def upload(self, folder: Path) -> None:
        """Start uploading the complete checkpoint `folder` (after any upload in flight)."""
        self.wait()
        self._thread = threading.Thread(
            target=self._upload_logged, args=(Path(folder),), name="checkpoint-upload", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the upload in flight, if any, has finished (or failed)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _upload_logged(self, folder: Path) -> None:
        try:
            self._upload(folder)
        except (StoreError, OSError, ValueError) as e:
            self.failures += 1
            log.error(
                "upload of checkpoint %s to %s failed: %s; the local copy is intact",
                folder.name,
                self.url,
                objstore.redact(str(e)),
            )

    def _upload(self, folder: Path) -> None:
        manifest = json.loads((folder / MANIFEST).read_text())
        prefix = objstore.join(self.url, folder.name)
        for name in manifest["files"]:
            objstore.upload_file(folder / name, objstore.join(prefix, name))
        objstore.upload_file(folder / MANIFEST, objstore.join(prefix, MANIFEST))
        log.info("uploaded checkpoint %s to %s", folder.name, prefix)
        self._prune(keep_up_to=folder.name)

    def _prune(self, keep_up_to: str) -> None:
        """Keep the newest `keep_last` complete checkpoints in the store (none newer than
        the one just uploaded is touched); delete older ones, manifest first."""
        complete = self.complete()
        for name in [n for n in complete if n <= keep_up_to][self.keep_last :]:
            prefix = objstore.join(self.url, name)
            objstore.delete(objstore.join(prefix, MANIFEST))
            objstore.delete_prefix(prefix)

    # ------------------------------------------------------------ download
    def complete(self) -> list[str]:
        """Names of the complete checkpoints in the store, newest first."""
        names = set()
        for url, _ in objstore.list_objects(self.url):
            parts = url[len(self.url) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and parts[0].startswith("step_"):
                names.add(parts[0])
        return sorted(names, reverse=True)

    def fetch_if_newer(self, root: Path, local: Path | None) -> Path | None:
        """Download the store's newest complete checkpoint into `root` if it is newer than
        `local` (or there is none); returns its folder, or None when nothing was fetched."""
        complete = self.complete()
        if not complete or (local is not None and complete[0] <= local.name):
            return None
        name = complete[0]
        prefix = objstore.join(self.url, name)
        tmp = Path(root) / f".tmp-fetch-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        objstore.download_file(objstore.join(prefix, MANIFEST), tmp / MANIFEST)
        files = json.loads((tmp / MANIFEST).read_text())["files"]
        for file, size in files.items():
            objstore.download_file(objstore.join(prefix, file), tmp / file)
            if (tmp / file).stat().st_size != size:
                raise StoreError(f"{objstore.join(prefix, file)}: size differs from its manifest")
        final = Path(root) / name
        shutil.rmtree(final, ignore_errors=True)  # an incomplete local folder of that name
        tmp.rename(final)
        log.info("downloaded checkpoint %s from %s", name, prefix)
        return final
