"""Training data in a real S3-compatible store (seaweedfs on 127.0.0.1): prepared with
`pretrain prep shards --out s3://...`, streamed by the trainer, robust to the faults users
meet (bad credentials, missing bucket or prefix, damaged shards, a store that goes down)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from pretrain import iotrace
from pretrain.train.metrics import read_metrics
from tests.helpers.runs import REPO, losses_by_step, run_cli, with_overrides
from tests.helpers.s3server import ACCESS_KEY, SECRET_KEY
from tests.test_data_dist import all_samples, assert_one_epoch

pytestmark = pytest.mark.slow


def _prep(dataset, out, *flags, env=None):
    r = run_cli(
        "prep", "shards", "--inputs", str(dataset["corpus"]), "--text-field", "body", "--tokenizer",
        str(dataset["tokenizer"]), "--seq-len", "64", "--val-fraction", "0.1", "--out", str(out),
        "--shard-size-limit", "32KB", *flags, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def s3_dataset(s3_server, dataset, tmp_path_factory):
    """The session dataset, prepared again straight into a bucket in small zstd shards."""
    url = f"s3://{s3_server.make_bucket('pretrain-data')}/plays"
    _prep(dataset, url, env=s3_server.env)
    return url


def _train(s3_server, overrides, url, *extra, env=None):
    return run_cli(
        "train", "configs/tiny.yaml", *with_overrides(overrides, f"data.streams=[{{path: {url}}}]", *extra),
        env={**s3_server.env, **(env or {})},
    )  # fmt: skip


def test_training_from_s3_equals_training_from_local_files(
    s3_server, s3_dataset, dataset, tiny_overrides, tmp_path
):
    steps = ["train.max_steps=6", "train.eval_every=3", "logging.wandb=true"]
    r = _train(
        s3_server,
        tiny_overrides,
        s3_dataset,
        *steps,
        env={"WANDB_API_KEY": "", "WANDB_SILENT": "true"},
    )
    assert r.returncode == 0, r.stderr
    # The same dataset on local disk (sharding sets streaming's shuffle, so it must match).
    _prep(dataset, tmp_path / "mds")
    local = with_overrides(
        tiny_overrides,
        f"run.dir={tmp_path / 'local'}",
        f"data.streams=[{{path: {tmp_path / 'mds'}}}]",
    )
    assert run_cli("train", "configs/tiny.yaml", *local, *steps[:2]).returncode == 0
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "local")
    # Credentials live in the environment only: not in the run directory, not in the output.
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert secret not in r.stdout + r.stderr
        for path in (tmp_path / "run").rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        (
            "s3://pretrain-data/plays",
            {"AWS_SECRET_ACCESS_KEY": "wrong-secret-123"},
            "access denied (SignatureDoesNotMatch)",
        ),
        (
            "s3://pretrain-data/plays",
            {"AWS_ACCESS_KEY_ID": "nobody"},
            "access denied (InvalidAccessKeyId)",
        ),
        ("s3://no-such-bucket/plays", {}, "bucket 'no-such-bucket' does not exist"),
        ("s3://pretrain-data/nothing-here", {}, "no meta.json"),
    ],
)
def test_store_problems_are_one_line_naming_the_stream(
    s3_server, s3_dataset, tiny_overrides, tmp_path, url, env, expected
):
    r = _train(s3_server, tiny_overrides, url, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f"data error: data.streams[0] ({url})" in r.stderr and expected in r.stderr
    assert "wrong-secret-123" not in r.stderr and SECRET_KEY not in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_empty_dataset_is_refused(s3, s3_dataset, tiny_overrides):
    from pretrain import objstore

    empty = "s3://pretrain-data/empty"
    meta = json.loads(objstore.read_bytes(f"{s3_dataset}/meta.json"))
    meta["splits"]["train"]["samples"] = 0
    objstore.write_bytes(f"{empty}/meta.json", json.dumps(meta).encode())
    r = _train(s3, tiny_overrides, empty)
    assert r.returncode == 2 and "split 'train' has no samples" in r.stderr


def _copy_prefix(src: str, dst: str) -> list[str]:
    from pretrain import objstore

    for url, _ in objstore.list_objects(src):
        objstore.write_bytes(dst + url[len(src) :], objstore.read_bytes(url))
    return sorted(u for u, _ in objstore.list_objects(f"{dst}/train") if ".mds" in u)


def test_truncated_remote_shard_is_named_or_skipped(s3, s3_dataset, tiny_overrides, tmp_path):
    from pretrain import objstore

    copy = "s3://pretrain-data/truncated"
    shards = _copy_prefix(s3_dataset, copy)
    objstore.write_bytes(shards[1], objstore.read_bytes(shards[1])[:100])
    name = shards[1].split("/train/", 1)[1]  # with its part folder: 00000/shard.00001...
    r = _train(s3, tiny_overrides, copy)
    assert r.returncode == 2 and f"damaged shard(s) train/{name}" in r.stderr
    r = _train(s3, tiny_overrides, copy, "data.skip_bad_shards=true", "train.max_steps=2")
    assert r.returncode == 0 and f"skipping damaged shard(s) train/{name}" in r.stderr


def test_corrupt_remote_shard_fails_its_checksum_on_download(
    s3, s3_dataset, tiny_overrides, tmp_path
):
    from pretrain import objstore

    copy = "s3://pretrain-data/corrupt"
    shards = _copy_prefix(s3_dataset, copy)
    for shard in shards:  # every shard, so the very first download meets one
        data = bytearray(objstore.read_bytes(shard))
        data[-1] ^= 0xFF  # same size: only the hash can tell
        objstore.write_bytes(shard, bytes(data))
    r = _train(s3, tiny_overrides, copy, "data.download_retry=0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data error: data.streams[0]" in r.stderr and "shard." in r.stderr


@pytest.mark.torchrun
def test_store_down_mid_epoch_then_back(s3_server, s3_dataset, dataset, tiny_overrides, tmp_path):
    """Stop the server while 2 ranks stream; restart it 4 s later; the epoch completes."""
    pause = tmp_path / "pause"
    pause.touch()
    out, trace = tmp_path / "out", tmp_path / "trace"
    trace.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(REPO / "tests/helpers/data_ranks.py"), "--epoch", "--pause-file", str(pause), str(out), "0",
        *with_overrides(tiny_overrides, f"data.streams=[{{path: {s3_dataset}}}]"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**__import__("os").environ, **s3_server.env, iotrace.ENV: str(trace)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 120
    while not all((out / f"rank{r}.jsonl").exists() for r in (0, 1)):  # first batch read
        assert time.time() < deadline and proc.poll() is None, "".join(output)
        time.sleep(0.1)
    s3_server.stop()
    pause.unlink()  # the ranks go on reading and soon need shards they do not have
    time.sleep(4)
    s3_server.start()
    assert proc.wait(timeout=300) == 0, "".join(output)[-3000:]
    assert_one_epoch(out, all_samples(dataset["mds"]), world=2, micro=8)
    # Each split's prefix was listed once, by global rank 0 (its verdict went to rank 1).
    listings = [r for r in iotrace.read(trace) if r["kind"] == iotrace.LIST]
    assert {r["rank"] for r in listings} == {0}
    assert sorted(r["what"].rstrip("/").rsplit("/", 1)[-1] for r in listings) == ["train", "val"]


def test_slow_store_training_goes_on(s3_server, s3_dataset, tiny_overrides, tmp_path):
    from tests.helpers.s3server import SlowProxy

    with SlowProxy(s3_server.ports["s3"], delay=0.3) as proxy:
        r = _train(
            s3_server,
            tiny_overrides,
            s3_dataset,
            "train.max_steps=3",
            "train.eval_every=3",
            env={"S3_ENDPOINT_URL": proxy.endpoint},
        )
    assert r.returncode == 0, r.stderr
    steps = [x for x in read_metrics(tmp_path / "run") if "loss" in x]
    assert len(steps) == 3
    assert steps[0]["data_s"] > 0.3  # the first shard really came through the slow proxy
