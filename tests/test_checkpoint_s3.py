"""Checkpoints mirrored to a real S3-compatible store (seaweedfs on 127.0.0.1): each one
uploaded once complete, and a fresh node resumes from the store exactly."""

from __future__ import annotations

import logging

import pytest
import torch

from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.mirror import CheckpointMirror
from tests.helpers.runs import (
    REF,
    REF_STEPS,
    STRATEGIES,
    losses_by_step,
    run_torchrun,
    with_overrides,
)
from tests.helpers.s3server import SECRET_KEY, SlowProxy


def _writer(value: float, numel: int = 64):
    def write(folder):
        torch.save({"w": torch.full((numel,), value)}, folder / "model.pt")

    return write


def _names(s3, bucket: str, prefix: str) -> set[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {obj["Key"][len(prefix) :] for obj in listed}


def test_mirror_uploads_complete_checkpoints_and_prunes_the_store(s3, tmp_path):
    bucket = s3.make_bucket("mirror-prune")
    mirror = CheckpointMirror(f"s3://{bucket}/run", keep_last=2)
    ck = Checkpointer(tmp_path / "a", keep_last=2, mirror=mirror)
    for step in (2, 4, 6):
        ck.save(step, {"step": step}, _writer(step))
        mirror.wait()  # each upload ends before the next save: none is skipped
    assert mirror.complete_checkpoints() == ["step_00000006", "step_00000004"]
    assert _names(s3, bucket, "run/step_00000006/") == {
        "model.pt",
        "rng_rank0.pt",
        "train_state.json",
        "manifest.json",
    }
    assert not _names(s3, bucket, "run/step_00000002/")  # pruned, not just its manifest

    # A store checkpoint without its manifest (an upload cut short) is never fetched.
    s3.client().delete_object(Bucket=bucket, Key="run/step_00000006/manifest.json")
    fresh = Checkpointer(tmp_path / "b", keep_last=2, mirror=mirror)
    path = fresh.resume_point()
    assert [p.name for p in fresh.complete_checkpoints()] == [path.name] == ["step_00000004"]
    box: dict = {}
    assert fresh.load(path, lambda f: box.update(torch.load(f / "model.pt"))) == {"step": 4}
    assert torch.equal(box["w"], torch.full((64,), 4.0))
    assert fresh.resume_point() == path  # nothing newer in the store: nothing downloaded again
    assert [p.name for p in fresh.complete_checkpoints()] == ["step_00000004"]


def _through(proxy: SlowProxy, monkeypatch) -> None:
    """This process's store requests go through `proxy` from now on."""
    from pretrain import objstore

    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    objstore._client.cache_clear()


def _peak_part_uploads() -> dict:
    """The most UploadPart requests in flight at once on this process's store client,
    counted as botocore sends and receives them."""
    from pretrain import objstore

    count = {"now": 0, "peak": 0}

    def sent(**_):
        count["now"] += 1
        count["peak"] = max(count["peak"], count["now"])

    def received(**_):
        count["now"] -= 1

    events = objstore.client().meta.events
    events.register("before-send.s3.UploadPart", sent)
    events.register("response-received.s3.UploadPart", received)
    return count


def test_uploads_never_hold_up_a_save_and_the_last_one_is_never_skipped(
    s3, tmp_path, monkeypatch, caplog
):
    """While step 2 is uploading (every reply delayed 0.15 s), saves 4 and 6 return at once,
    their uploads skipped; step 2's folder stays until its upload ends, whatever keep_last
    says; `wait` (training's end) uploads the newest, 6. Each rank's parts go up 2 at a
    time, not boto3's 10."""
    bucket = s3.make_bucket("mirror-skip")
    with SlowProxy(s3.ports["s3"], delay=0.15) as proxy, caplog.at_level(logging.INFO, "pretrain"):
        _through(proxy, monkeypatch)
        mirror = CheckpointMirror(f"s3://{bucket}/run", keep_last=1, threads=2, part_mb=5)
        ck = Checkpointer(tmp_path, keep_last=1, mirror=mirror)
        parts = _peak_part_uploads()
        ck.save(2, {"step": 2}, _writer(2, numel=4 << 20))  # 16 MB: 4 parts
        for step in (4, 6):
            ck.save(step, {"step": step}, _writer(step))
        assert mirror.skipped == ["step_00000004", "step_00000006"]
        assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000006"]
        mirror.wait()
    assert parts["peak"] == 2
    assert mirror.skipped == ["step_00000004"]  # superseded by 6; 6 was owed and went up
    assert mirror.complete_checkpoints() == ["step_00000006"]
    assert "uploaded checkpoint step_00000002" in caplog.text
    assert "uploaded checkpoint step_00000006" in caplog.text
    assert caplog.text.count("is not uploaded: the upload of step_00000002 is still") == 1
    assert mirror.failures == 0
    # Step 2 outlived keep_last=1 while it was uploading; the next commit prunes it.
    assert [p.name for p in ck.complete_checkpoints()] == ["step_00000006", "step_00000002"]


def test_waiting_for_an_upload_ends_at_its_deadline(s3, tmp_path, monkeypatch, caplog):
    """An upload slower than its deadline (here 2 x 0.05 s + size at 10 MB/s) is given up
    with one line, on rank 0 as on the others, and the run goes on."""
    bucket = s3.make_bucket("mirror-deadline")
    with SlowProxy(s3.ports["s3"], delay=0.3) as proxy:
        _through(proxy, monkeypatch)
        mirror = CheckpointMirror(f"s3://{bucket}/run", keep_last=2, base_wait_s=0.05)
        ck = Checkpointer(tmp_path, keep_last=2, mirror=mirror)
        ck.save(2, {"step": 2}, _writer(2))
        upload = mirror._thread
        with caplog.at_level(logging.ERROR, logger="pretrain"):
            beats = []
            mirror.wait(lambda: beats.append(1))  # the deadline is 0.1 s away; a reply 0.3 s
            assert upload.is_alive() and beats  # the watchdog heard from the wait
        upload.join()  # the upload itself goes on to its end (no stray thread after the test)
    assert mirror.failures >= 1
    assert "upload of checkpoint step_00000002 to" in caplog.text
    assert "not done within its deadline (it is still running)" in caplog.text


def test_a_failed_upload_is_logged_and_training_goes_on(s3, tmp_path, caplog, monkeypatch):
    from pretrain import objstore

    bucket = s3.make_bucket("mirror-denied")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-wrong-secret-4242")
    objstore._client.cache_clear()
    mirror = CheckpointMirror(f"s3://{bucket}/run", keep_last=2)
    ck = Checkpointer(tmp_path, keep_last=2, mirror=mirror)
    with caplog.at_level(logging.ERROR, logger="pretrain"):
        ck.save(2, {"step": 2}, _writer(2))
        mirror.wait()
    assert mirror.failures == 1
    assert f"upload of checkpoint step_00000002 to s3://{bucket}/run failed" in caplog.text
    assert "a-wrong-secret-4242" not in caplog.text
    assert ck.latest().name == "step_00000002"  # the local checkpoint is intact


@pytest.mark.torchrun
def test_a_fresh_node_resumes_from_the_store_exactly(
    s3_server, tiny_overrides, tmp_path, reference
):
    """2 fsdp ranks upload their own shards; a new machine (empty run directory, same
    remote) downloads them, each rank its share, and continues bit for bit."""
    url = f"s3://{s3_server.make_bucket('ckpts')}/tiny"
    expected = losses_by_step(reference("fsdp", tiny_overrides))
    stop = REF_STEPS // 2

    def node(name: str, steps: int):
        overrides = with_overrides(
            tiny_overrides,
            *STRATEGIES["fsdp"],
            *REF,
            f"run.dir={tmp_path / name}",
            f"train.max_steps={steps}",
            f"checkpoint.remote={url}",
        )
        args = ["-m", "pretrain", "train", "configs/tiny.yaml", *overrides]
        return run_torchrun(2, *args, env=s3_server.env)

    node("first", stop)
    r = node("second", REF_STEPS)
    assert f"downloaded checkpoint step_{stop:08d}" in r.stderr
    assert "resumed from" in r.stderr
    resumed = losses_by_step(tmp_path / "second")
    assert sorted(resumed) == list(range(stop + 1, REF_STEPS + 1))
    assert all(resumed[s] == expected[s] for s in resumed)  # bit for bit
    for path in (tmp_path / "first").rglob("*"):  # the store's secret stays out of the run
        if path.is_file():
            assert SECRET_KEY.encode() not in path.read_bytes(), path
