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
from tests.helpers.s3server import SECRET_KEY


def _writer(value: float):
    def write(folder):
        torch.save({"w": torch.full((64,), value)}, folder / "model.pt")

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
    mirror.wait()
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
