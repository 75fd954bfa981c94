"""Checkpoints mirrored to an object store: each rank moves its own files, and ranks wait
for each other's transfers outside collectives.

With `checkpoint.remote: s3://bucket/prefix`, every committed checkpoint is uploaded in the
background (a thread per rank): each rank uploads the files it wrote, so no rank moves the
whole checkpoint, and rank 0 uploads `manifest.json` last, only once every rank reported
success. A checkpoint folder in the store is complete exactly when its manifest is there,
so a node that dies mid-upload leaves nothing a resume would take. `keep_last` applies to
the store as well, pruned only after a complete upload.

At 1,000 ranks every rank uploads into one prefix at the same moment, so each rank moves
its files with a few threads (`threads`) in large parts (`part_mb`), not boto3's 10 threads
of 8 MB parts: the store sees ranks x threads requests at a time, not ranks x 10.

A commit never waits for an upload: when the previous checkpoint's upload is still in
flight (uploads slower than checkpoints), rank 0 decides for every rank in the commit's
broadcast that the new one's upload is skipped, and rank 0 does not prune the local folder
being uploaded. The newest skipped checkpoint is owed: `wait()`, called once training ends
(its last save, or a preemption's), uploads it after the one in flight, so the last
checkpoint always reaches the store.

A transfer takes as long as its bytes take, far longer than a collective may wait (the
collective timeout would kill a barrier). So ranks never wait for each other's transfers
in a collective: each reports its end (or its error, one line) in the c10d key-value store,
and whoever must wait polls it with a deadline sized for the transfer, 300 s + bytes /
`checkpoint.remote_min_mb_per_s`, counted from the upload's start, the same on rank 0
(joining its thread) as on the others (polling the store). A failed or overdue upload is
logged, never fatal: the local checkpoint is intact and training goes on.

On resume, rank 0 lists the store once; when it holds a complete checkpoint newer than any
in the run directory (a replacement node, a lost disk), rank 0 reads its manifest and
tells every rank; each rank downloads its share (the files it would have written, so each
lands where it will be read) into a `.tmp-` folder and checks their sizes, and rank 0
renames the folder into place once all succeeded. A failed download is an error on every
rank: the run falls back to its newest local checkpoint, or stops with the reason.

The run directory must be one filesystem for all ranks (a shared filesystem on a cluster),
as it already is for `latest`.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pretrain import iotrace, objstore
from pretrain.checkpoint.ranks import Ranks, file_owner
from pretrain.errors import StoreError
from pretrain.files import sync_files, sync_folders, write_durable

log = logging.getLogger("pretrain")
MANIFEST = "manifest.json"
BASE_WAIT_S = 300.0
# Per rank: 2 requests at a time in 64 MiB parts. At 1,000 ranks that is 2,000 requests in
# flight, each moving 64 MiB (8x fewer requests per byte than boto3's 8 MB parts), instead
# of boto3's default of 10,000 in flight.
UPLOAD_THREADS = 2
PART_MB = 64
BEAT_S = 5.0  # how often a long wait for an upload tells the watchdog it is alive


class CheckpointMirror:
    def __init__(
        self,
        url: str,
        keep_last: int,
        min_mb_per_s: float = 10.0,
        threads: int = UPLOAD_THREADS,
        part_mb: int = PART_MB,
        base_wait_s: float = BASE_WAIT_S,
    ) -> None:
        self.url = url.rstrip("/")
        self.keep_last = keep_last
        self.min_mb_per_s = min_mb_per_s
        self.transfer = objstore.transfer(threads, part_mb << 20)
        self.base_wait_s = base_wait_s
        self.ranks = Ranks()  # the Checkpointer using this mirror sets its own
        self._thread: threading.Thread | None = None
        # The upload in flight: its checkpoint's name, store key and deadline (monotonic).
        self._flight: tuple[str, str, float] | None = None
        self._owed: tuple | None = None  # `upload`'s arguments of the newest skipped one
        self.failures = 0
        self.skipped: list[str] = []  # checkpoints never uploaded (skipped), oldest first

    def timeout_s(self, nbytes: int) -> float:
        """How long to wait for a transfer of `nbytes` by one rank."""
        return self.base_wait_s + nbytes / (self.min_mb_per_s * 1e6)

    @staticmethod
    def _key(what: str, tag: str) -> str:
        return f"pretrain/checkpoint/{what}/{tag}"

    # ------------------------------------------------------------ upload
    def in_flight(self) -> str | None:
        """Rank 0: the checkpoint whose upload has not ended yet (on some rank), if any;
        rank 0's part ends last, after every rank reported. An upload past its deadline
        counts as ended: `wait` logs it."""
        if self._thread is None or not self._thread.is_alive():
            return None
        name, _, deadline = self._flight
        return name if time.monotonic() < deadline else None

    def upload(
        self, folder: Path, files: dict[str, int], rank_bytes: int, tag: str, skip: bool = False
    ) -> None:
        """Start uploading this rank's `files` (name -> size) of the committed checkpoint
        `folder` (rank 0 uploads its manifest last); never waits for an earlier upload.
        `rank_bytes`: the most any rank uploads, which sizes every wait; `tag`: the same on
        every rank, new for every upload (the key-value store outlives it). `skip` (rank
        0's decision, the same on every rank): an upload is in flight, so this one is only
        owed, uploaded by `wait` unless a newer checkpoint is uploaded first."""
        if skip:
            self._owed = (folder, files, rank_bytes, tag)
            self.skipped.append(Path(folder).name)
            if self.ranks.rank == 0 and len(self.skipped) == 1:
                log.warning(
                    "checkpoint %s is not uploaded: the upload of %s is still in flight (uploads "
                    "are slower than checkpoint.every); while one is, periodic uploads are "
                    "skipped, and the last checkpoint is uploaded when training ends",
                    Path(folder).name,
                    self._flight[0] if self._flight else "the previous one",
                )
            return
        self._owed = None
        self._end_wait()  # rank 0 saw the last one end: nothing is left to wait for
        timeout = self.timeout_s(rank_bytes)
        key = self._key("upload", tag)
        # + rank 0's manifest and store pruning after the others' files
        deadline = time.monotonic() + timeout + self.base_wait_s
        self._flight = (Path(folder).name, key, deadline)
        self._thread = threading.Thread(
            target=self._upload,
            args=(Path(folder), files, key, timeout),
            name="checkpoint-upload",
            daemon=True,
        )
        self._thread.start()

    def wait(self, beat: Callable[[], None] = lambda: None, owed: bool = True) -> None:
        """Once training has ended (every rank, at the same point): wait until the upload in
        flight has ended on every rank, then upload the newest skipped checkpoint, if any,
        and wait for that. Each wait ends by its deadline at the latest, calling `beat`
        (the watchdog's) every few seconds meanwhile; afterwards no rank reads its local
        folders any more. `owed=False` (after an error): only the upload in flight."""
        self._wait_flight(beat)
        if owed and self._owed is not None:  # not after an error: leave as soon as we can
            self.skipped.remove(Path(self._owed[0]).name)  # uploaded after all
            self.upload(*self._owed)
            self._wait_flight(beat)

    def _wait_flight(self, beat: Callable[[], None]) -> None:
        if self._flight is None:
            return
        _, key, deadline = self._flight
        ended = None
        while ended is None and (left := deadline - time.monotonic()) > 0:
            beat()
            if self._thread is not None and self._thread.is_alive():
                self._thread.join(min(left, BEAT_S))
            elif self.ranks.rank == 0:
                break
            else:
                try:
                    ended = self.ranks.wait_announced(key, min(left, BEAT_S))
                except Exception as e:  # the store went away: nobody is left to wait for
                    ended = f"store: {e}"
        self._end_wait()  # rank 0 logs an overdue upload (once, not once per rank)

    def _end_wait(self) -> None:
        """Forget the upload in flight; one still running (past its deadline) is logged."""
        if self._thread is not None and self._thread.is_alive():
            self._overdue(self._flight[0], "it is still running")
        self._thread, self._flight = None, None

    def _overdue(self, name: str, why: str) -> None:
        self._failed(
            name,
            f"not done within its deadline ({why}); at least checkpoint.remote_min_mb_per_s="
            f"{self.min_mb_per_s:g} MB/s per rank is expected",
        )

    def _upload(self, folder: Path, files: dict, key: str, timeout: float) -> None:
        prefix = objstore.join(self.url, folder.name)
        error = None
        try:
            for name in files:
                objstore.upload_file(folder / name, objstore.join(prefix, name), self.transfer)
                iotrace.record(iotrace.UPLOAD, objstore.join(prefix, name))
        except Exception as e:  # any failure must reach rank 0, or it waits out the timeout
            known = isinstance(e, (StoreError, OSError))
            error = objstore.redact(str(e) if known else f"{type(e).__name__}: {e}")
            self._failed(
                folder.name, error if self.ranks.rank == 0 else f"rank {self.ranks.rank}: {error}"
            )
        try:
            self.ranks.report(key, error)
            if self.ranks.rank == 0:
                self._finish(folder, prefix, key, timeout, own_error=error is not None)
        except Exception as e:  # the store itself failed: the upload is not complete
            self._failed(folder.name, f"waiting for the other ranks: {e}")
        finally:
            if self.ranks.rank == 0:
                self._announce_end(key)

    def _finish(self, folder: Path, prefix: str, key: str, timeout: float, own_error: bool):
        """Rank 0: once every rank's files are up, the manifest, then the store's pruning."""
        failed = self.ranks.wait_reports(key, timeout)
        if failed is not None:
            if not own_error:
                self._failed(folder.name, failed)
            return
        try:
            objstore.upload_file(folder / MANIFEST, objstore.join(prefix, MANIFEST), self.transfer)
            iotrace.record(iotrace.UPLOAD, objstore.join(prefix, MANIFEST))
            log.info("uploaded checkpoint %s to %s", folder.name, prefix)
            self._prune(keep_up_to=folder.name)
        except (StoreError, OSError, ValueError) as e:
            self._failed(folder.name, objstore.redact(str(e)))

    def _announce_end(self, key: str) -> None:
        try:
            self.ranks.announce(key, "end")
        except Exception as e:
            log.error("cannot tell the other ranks that upload %s ended: %s", key, e)

    def _failed(self, name: str, why: str) -> None:
        self.failures += 1
        log.error(
            "upload of checkpoint %s to %s failed: %s; the local copy is intact",
            name,
            self.url,
            why,
        )

    def _prune(self, keep_up_to: str) -> None:
        """Keep the newest `keep_last` complete checkpoints in the store (none newer than
        the one just uploaded is touched); delete older ones, manifest first."""
        complete = self.complete_checkpoints()
        for name in [n for n in complete if n <= keep_up_to][self.keep_last :]:
            prefix = objstore.join(self.url, name)
            objstore.delete(objstore.join(prefix, MANIFEST))
            objstore.delete_prefix(prefix)

    # ------------------------------------------------------------ download
    def complete_checkpoints(self) -> list[str]:
        """Names of the complete checkpoints in the store, newest first."""
        iotrace.record(iotrace.LIST, self.url)
        names = set()
        for url, _ in objstore.list_objects(self.url):
            parts = url[len(self.url) + 1 :].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST and parts[0].startswith("step_"):
                names.add(parts[0])
        return sorted(names, reverse=True)

    def plan_fetch(self, root: Path, local: str | None) -> dict | None:
        """Rank 0: the store's newest complete checkpoint, when it is newer than `local` (a
        name, or None): {"name", "manifest", "tag"}, for `fetch` on every rank; else None."""
        complete = self.complete_checkpoints()
        if not complete or (local is not None and complete[0] <= local):
            return None
        name = complete[0]
        url = objstore.join(self.url, name, MANIFEST)
        try:
            manifest = json.loads(objstore.read_bytes(url))
        except ValueError:
            manifest = None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise StoreError(f"{url}: not a checkpoint manifest; delete that folder")
        iotrace.record(iotrace.DOWNLOAD, url)
        shutil.rmtree(Path(root) / f".tmp-fetch-{name}", ignore_errors=True)  # a killed fetch
        return {"name": name, "manifest": manifest, "tag": uuid.uuid4().hex}

    def share(self, files: dict[str, int]) -> dict[str, int]:
        """This rank's part of a download: the files its rank number wrote (modulo the
        ranks there are now), so each lands on the node that will read it."""
        r, n = self.ranks.rank, self.ranks.world_size
        return {name: size for name, size in files.items() if file_owner(name) % n == r}

    def fetch(self, root: Path, plan: dict) -> Path:
        """Every rank: download this rank's share of `plan` (from `plan_fetch` on rank 0);
        returns the checkpoint's folder once it is in place, or raises StoreError (on every
        rank alike) when any rank's part failed."""
        name, files = plan["name"], plan["manifest"]["files"]
        prefix = objstore.join(self.url, name)
        tmp = Path(root) / f".tmp-fetch-{name}"
        key = self._key("fetch", plan["tag"])
        n = self.ranks.world_size
        per_rank = Counter()  # one pass over the files, not one per rank
        for f, s in files.items():
            per_rank[file_owner(f) % n] += s
        most = max(per_rank.values(), default=0)
        timeout = self.timeout_s(most)
        error = None
        try:
            for file, size in self.share(files).items():
                objstore.download_file(objstore.join(prefix, file), tmp / file, self.transfer)
                iotrace.record(iotrace.DOWNLOAD, objstore.join(prefix, file))
                if sync_files(tmp, [file])[file] != size:
                    raise StoreError(
                        f"{objstore.join(prefix, file)}: size differs from its manifest"
                    )
        except (StoreError, OSError) as e:
            error = objstore.redact(str(e))
        self.ranks.report(key, error)
        if self.ranks.rank == 0:
            outcome = self._place(tmp, Path(root) / name, plan["manifest"], key, timeout)
        else:
            limit = timeout + self.base_wait_s
            outcome = self.ranks.wait_announced(key, limit)
            outcome = outcome or f"rank 0 did not finish within {limit:.0f} s"
        if outcome != "ok":
            raise StoreError(f"download of checkpoint {name} from {self.url} failed: {outcome}")
        if self.ranks.rank == 0:
            log.info("downloaded checkpoint %s from %s", name, prefix)
        return Path(root) / name

    def _place(self, tmp: Path, final: Path, manifest: dict, key: str, timeout: float) -> str:
        """Rank 0: once every rank's share is in, the manifest, then the folder into place;
        the outcome ("ok" or why not) is announced to every rank."""
        outcome = "ok"
        try:
            failed = self.ranks.wait_reports(key, timeout)
            if failed is not None:
                outcome = failed
            else:
                write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
                sync_folders(tmp, manifest["files"])
                shutil.rmtree(final, ignore_errors=True)  # an incomplete local folder of that name
                tmp.rename(final)
                sync_folders(final.parent, [])
        except (OSError, ValueError) as e:
            outcome = str(e)
        finally:
            self.ranks.announce(key, outcome)
        return outcome
