"""S3-compatible object stores, in one place.

The endpoint and credentials come only from the standard environment variables
(`S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_DEFAULT_REGION`, or an AWS profile), never from a config file, so they never reach a
run directory. mosaicml-streaming reads the same variables for its shard downloads.

Every failure becomes a `StoreError` whose message is one actionable line naming the URL,
with any secret value from the environment masked. Transient failures (connection
refused, timeouts, throttling, 5xx) are retried with exponential backoff by botocore.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from pretrain.errors import StoreError

SCHEME = "s3://"
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# Attempts per request, with botocore's exponential backoff (capped at 20 s a wait): rides
# out an object store that is down for tens of seconds.
MAX_ATTEMPTS = int(os.environ.get("PRETRAIN_S3_MAX_ATTEMPTS", "8"))

_DENIED = {
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "403",
    "InvalidToken",
    "ExpiredToken",
}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}


def is_remote(path: str | Path) -> bool:
    return str(path).startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    if not is_remote(url):
        raise StoreError(f"not an s3:// URL: {url}")
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise StoreError(f"no bucket in {url}")
    return bucket, key


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def endpoint() -> str:
    """How error messages name the endpoint: by its variable, never by its value."""
    return "$S3_ENDPOINT_URL" if os.environ.get("S3_ENDPOINT_URL") else "AWS S3"


def redact(text: str) -> str:
    """`text` with the value of every credential variable replaced by ***."""
    for var in SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@lru_cache(maxsize=4)
def _client(endpoint_url: str | None, attempts: int, timeout: float):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=timeout,
        read_timeout=timeout,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def client(timeout: float = 20.0, attempts: int | None = None):
    return _client(os.environ.get("S3_ENDPOINT_URL") or None, attempts or MAX_ATTEMPTS, timeout)


def describe(error: Exception, url: str) -> str:
    """One line saying what went wrong with `url` and what to do about it."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        bucket, _ = split_url(url)
        if code in _DENIED:
            return (
                f"{url}: access denied ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                f"for {endpoint()}"
            )
        if code == "NoSuchBucket":
            return f"{url}: bucket '{bucket}' does not exist at {endpoint()}"
        if code in _NOT_FOUND:
            return f"{url}: not found"
        return redact(f"{url}: {code or 'error'}: {error}".splitlines()[0])
    if isinstance(error, NoCredentialsError):
        return f"{url}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        return f"{url}: cannot reach the object store at {endpoint()} after {MAX_ATTEMPTS} attempts"
    return redact(f"{url}: {type(error).__name__}: {error}".splitlines()[0])


def _call(url: str, fn, *args, **kwargs):
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (ClientError, BotoCoreError) as e:
        raise StoreError(describe(e, url)) from None
    except Boto3Error as e:  # S3UploadFailedError and friends wrap a ClientError
        cause = e.__context__ if isinstance(e.__context__, (ClientError, BotoCoreError)) else e
        raise StoreError(describe(cause, url)) from None


def read_bytes(url: str) -> bytes:
    bucket, key = split_url(url)
    body = _call(url, client().get_object, Bucket=bucket, Key=key)["Body"]
    return _call(url, body.read)


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of an object (one ranged GET)."""
    bucket, key = split_url(url)
    rng = f"bytes={start}-{end - 1}"
    body = _call(url, client().get_object, Bucket=bucket, Key=key, Range=rng)["Body"]
    return _call(url, body.read)


def write_bytes(url: str, data: bytes) -> None:
    bucket, key = split_url(url)
    _call(url, client().put_object, Bucket=bucket, Key=key, Body=data)


def transfer(threads: int, part_bytes: int):
    """How one file moves: in parts of `part_bytes`, at most `threads` requests at a time.

    boto3's default (10 threads, 8 MB parts) is made for one client alone. When every rank
    of a large job moves its files into one prefix at once, it is 10 x ranks concurrent
    requests against the store's per-prefix request rate: callers such as the checkpoint
    mirror pass a small `threads` and large parts instead."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=part_bytes,
        multipart_chunksize=part_bytes,
        max_concurrency=threads,
        use_threads=threads > 1,
    )


def upload_file(local: str | Path, url: str, config=None) -> None:
    """Upload `local` to `url`; `config`: a `transfer(...)`, else boto3's default."""
    bucket, key = split_url(url)
    _call(url, client().upload_file, str(local), bucket, key, Config=config)


def download_file(url: str, local: str | Path, config=None) -> None:
    """Download to `local` atomically (a partial download never has the final name);
    `config`: a `transfer(...)`, else boto3's default."""
    bucket, key = split_url(url)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
    try:
        _call(url, client().download_file, bucket, key, str(tmp), Config=config)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def list_objects(url: str) -> Iterator[tuple[str, int]]:
    """(url, size) of every object under the prefix `url`."""
    bucket, prefix = split_url(url)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    paginator = client().get_paginator("list_objects_v2")
    pages = _call(url, lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix)))
    for page in pages:
        for obj in page.get("Contents", []):
            yield f"{SCHEME}{bucket}/{obj['Key']}", obj["Size"]


def exists(url: str) -> bool:
    bucket, key = split_url(url)
    try:
        _call(url, client().head_object, Bucket=bucket, Key=key)
    except StoreError as e:
        if str(e).endswith(": not found"):
            return False
        raise
    return True


def delete(url: str) -> None:
    bucket, key = split_url(url)
    _call(url, client().delete_object, Bucket=bucket, Key=key)


def delete_prefix(url: str) -> int:
    """Delete every object under `url`; returns how many."""
    bucket, _ = split_url(url)
    keys = [u[len(SCHEME) + len(bucket) + 1 :] for u, _ in list_objects(url)]
    for i in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
        _call(url, client().delete_objects, Bucket=bucket, Delete=batch)
    return len(keys)
