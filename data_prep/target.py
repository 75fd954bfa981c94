"""Where an array prep job writes: a local folder (a shared filesystem on a cluster) or an
s3:// prefix, behind the few operations the tasks, the merge and `prep status` need.

Small JSON files (the plan, part manifests, task progress) are replaced atomically: a local
file through a temporary name and a rename, an object by a single PUT. A part's files, staged
on the task's scratch, go up the same way, shards first, then its index, so nothing lists a
shard that is not there yet, and a second task writing the same part (a duplicate) replaces
each file with the same bytes: no file of a part is ever partly written or removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from data_prep.remote import IO_THREADS, guard
from pretrain import objstore
from pretrain.files import atomic_open, write_atomic


class Target:
    def __init__(self, out: str) -> None:
        self.out = out.rstrip("/") if objstore.is_remote(out) else str(Path(out).resolve())
        self.remote = objstore.is_remote(out)

    def where(self, rel: str) -> str:
        return objstore.join(self.out, rel) if self.remote else str(Path(self.out) / rel)

    def read_json(self, rel: str) -> dict[str, Any] | None:
        """The JSON at `rel`, or None when there is none."""
        try:
            if self.remote:
                text = objstore.read_bytes(self.where(rel)).decode()  # one GET, no HEAD first
            else:
                text = Path(self.where(rel)).read_text()
        except FileNotFoundError:
            return None
        except objstore.StoreError as e:
            if str(e).endswith(": not found"):
                return None
            raise
        return json.loads(text)

    def read_many(self, rels: list[str]) -> list[dict[str, Any] | None]:
        """read_json of each, in threads: thousands of small objects in seconds."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(IO_THREADS * 2) as pool:
            return list(pool.map(self.read_json, rels))

    def write_text(self, rel: str, text: str) -> None:
        if self.remote:
            objstore.write_bytes(self.where(rel), text.encode())
        else:
            path = Path(self.where(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=1) + "\n")

    def names(self, rel: str = "") -> list[str]:
        """Paths (relative to the output) of every file under `rel`."""
        if self.remote:
            root = objstore.join(self.out, "")
            prefix = self.where(rel) if rel else self.out
            return sorted(url[len(root) :] for url, _ in objstore.list_objects(prefix))
        base = Path(self.out)
        folder = base / rel
        if not folder.is_dir():
            return []
        return sorted(p.relative_to(base).as_posix() for p in folder.rglob("*") if p.is_file())

    def exists(self, rel: str) -> bool:
        return objstore.exists(self.where(rel)) if self.remote else Path(self.where(rel)).exists()

    def remove_file(self, rel: str) -> None:
        if self.remote:
            objstore.delete(self.where(rel))
        else:
            Path(self.where(rel)).unlink(missing_ok=True)

    def remove(self, rel: str) -> None:
        """Delete the folder (prefix) `rel` and all under it, if any."""
        if self.remote:
            objstore.delete_prefix(self.where(rel))
        else:
            shutil.rmtree(self.where(rel), ignore_errors=True)

    def upload(self, local: Path, rels: list[str]) -> None:
        """Files `local/rel` to `rel`, each whole or not at all, shards before index.json."""
        from concurrent.futures import ThreadPoolExecutor

        shards = [r for r in rels if not r.endswith("/index.json")]
        indexes = [r for r in rels if r.endswith("/index.json")]
        for batch in (shards, indexes):
            with ThreadPoolExecutor(IO_THREADS) as pool:
                list(pool.map(lambda r: self._put(local / r, r), batch))

    def _put(self, src: Path, rel: str) -> None:
        if self.remote:
            # IO_THREADS files at a time, one request each (parts of 64 MiB, one at a time
            # past that), not boto3's 10 per file: 64 tasks x 8 files x 10 requests would
            # be ~5,000 at once against one prefix.
            guard(
                self.where(rel),
                objstore.upload_file,
                src,
                self.where(rel),
                objstore.transfer(1, 64 << 20),
            )
            return
        with open(src, "rb") as f, atomic_open(Path(self.where(rel))) as out:
            shutil.copyfileobj(f, out, 1 << 20)
