"""s3:// inputs and outputs of data prep, built on `pretrain.objstore`.

Remote inputs are listed, matched like local globs (`*` stays inside one folder, `**` crosses
folders) and downloaded to a local work folder before anything is read, so an unreadable
object fails the run before the output is touched and both passes read a local file.

A remote dataset is written locally first, then published: old objects are deleted only now
(meta.json first, so a half-replaced dataset never looks complete), shards go up, then each
split's index.json, the listing is checked against the local files, and meta.json goes up
last: its presence is what marks a complete dataset for the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pretrain import objstore
from pretrain.data.format import META_NAME, is_dataset_key
from pretrain.errors import PrepError, StoreError
from pretrain.progress import Progress

IO_THREADS = 8
_GLOB_CHARS = "*?["


def expand_remote(pattern: str) -> list[str]:
    """The URLs of the objects `pattern` (s3://bucket/prefix/*.jsonl) matches."""
    bucket, key = objstore.split_url(pattern)
    first_glob = min((key.find(c) for c in _GLOB_CHARS if c in key), default=len(key))
    folder = key[:first_glob].rpartition("/")[0]  # list only below the last fixed folder
    root = f"{objstore.SCHEME}{bucket}/"
    wanted = key.split("/")
    return [
        url
        for url, _ in objstore.list_objects(root + folder)
        if match_parts(url[len(root) :].split("/"), wanted)
    ]


def object_sizes(urls: Sequence[str]) -> dict[str, int]:
    """The size of each object, from one listing per folder (not a request per object)."""
    sizes: dict[str, int] = {}
    for folder in sorted({url.rpartition("/")[0] for url in urls}):
        wanted = {u for u in urls if u.rpartition("/")[0] == folder}
        sizes.update((u, n) for u, n in objstore.list_objects(folder) if u in wanted)
    missing = [u for u in urls if u not in sizes]
    if missing:
        raise PrepError(f"{missing[0]}: not found (was it deleted since it was listed?)")
    return sizes


def match_parts(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Glob matching of path segments: `**` matches any number of segments."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(match_parts(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and match_parts(parts[1:], pattern[1:])


def download(jobs: Sequence[tuple[str, Path]]) -> None:
    """Download each (s3:// URL, local path) pair, in threads, with progress."""
    with Progress("download", len(jobs), "file") as progress:
        _in_threads(_download, jobs, progress)


def check_out_prefix(url: str, overwrite: bool) -> None:
    """Refuse a non-empty prefix without --overwrite, and one holding foreign objects."""
    keys = sorted(_listing(url))
    if not keys:
        return
    if not overwrite:
        raise PrepError(f"--out {url} is not empty; pass --overwrite to replace its contents")
    foreign = [k for k in keys if not is_dataset_key(k)]
    if foreign:
        raise PrepError(
            f"--out {url} holds objects prep did not write ({', '.join(foreign[:3])}); "
            "--overwrite only replaces a dataset: choose a new or empty prefix"
        )


def publish(local: Path, url: str, overwrite: bool) -> tuple[int, int]:
    """Upload the dataset in `local` to `url`, meta.json last; (files, bytes) uploaded."""
    files = sorted(
        p.relative_to(local).as_posix()
        for p in local.rglob("*")
        if p.is_file() and is_dataset_key(p.relative_to(local).as_posix())
    )
    if META_NAME not in files:
        raise PrepError(f"{local} holds no {META_NAME}: nothing to publish")
    check_out_prefix(url, overwrite)  # again: writing the dataset may have taken hours
    if overwrite:
        guard(url, _delete_object, objstore.join(url, META_NAME))
        objstore.delete_prefix(url)
    shards = [f for f in files if f != META_NAME and not f.endswith("/index.json")]
    indexes = [f for f in files if f.endswith("/index.json")]
    with Progress("upload", len(files), "file") as progress:
        for batch in (shards, indexes):  # an index never lists a shard that is not there yet
            _in_threads(_upload, [(local / f, objstore.join(url, f)) for f in batch], progress)
        listed = _listing(url)
        for name in shards + indexes:
            if listed.get(name) != (local / name).stat().st_size:
                raise StoreError(f"{objstore.join(url, name)}: missing or incomplete after upload")
        progress.update(1, _upload(local / META_NAME, objstore.join(url, META_NAME)))
    return len(files), sum((local / f).stat().st_size for f in files)


def _listing(url: str) -> dict[str, int]:
    """{key relative to the prefix `url`: size} of every object under it."""
    bucket, key = objstore.split_url(url)
    root = f"{objstore.SCHEME}{bucket}/" + (key.rstrip("/") + "/" if key else "")
    return {u[len(root) :]: size for u, size in objstore.list_objects(url)}


def _download(url: str, local: Path) -> int:
    guard(url, objstore.download_file, url, local)
    return local.stat().st_size


def _upload(local: Path, url: str) -> int:
    # boto3's upload_file raises S3UploadFailedError, which objstore does not translate.
    guard(url, objstore.upload_file, local, url)
    return local.stat().st_size


def _delete_object(url: str) -> None:
    bucket, key = objstore.split_url(url)
    objstore.client().delete_object(Bucket=bucket, Key=key)


def guard(url: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call `fn`, turning any boto error into a one-line StoreError naming `url`."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args)
    except (ClientError, BotoCoreError) as e:
        raise StoreError(objstore.describe(e, url)) from None
    except Boto3Error as e:
        cause = e.__context__
        if isinstance(cause, (ClientError, BotoCoreError)):
            raise StoreError(objstore.describe(cause, url)) from None
        raise StoreError(objstore.redact(f"{url}: {type(e).__name__}")) from None


def _in_threads(
    fn: Callable[[Any, Any], int], jobs: Sequence[tuple[Any, Any]], progress: Progress
) -> None:
    """fn(*job) for every job on IO threads (fn returns bytes moved); first failure raised."""
    with ThreadPoolExecutor(IO_THREADS) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        try:
            for future in futures:
                progress.update(1, future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
