"""Damaged datasets and mixtures on local data: refused with the shard named, or skipped."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.runs import losses_by_step, run_cli, with_overrides
from tests.test_data_dist import all_samples, seen, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture
def damaged(dataset, tmp_path):
    """A private copy of the test dataset, split into several shards, to damage."""
    copy = tmp_path / "mds"
    r = run_cli(
        "prep", "shards", "--inputs", str(dataset["corpus"]), "--text-field", "body", "--tokenizer",
        str(dataset["tokenizer"]), "--seq-len", "64", "--val-fraction", "0.1", "--out", str(copy),
        "--shard-size-limit", "64KB",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    shards = sorted((copy / "train").glob("*/shard.*.mds"))
    assert len(shards) > 3
    return copy, shards


def _train(tiny_overrides, mds, *extra):
    return run_cli(
        "train",
        "configs/tiny.yaml",
        *with_overrides(tiny_overrides, f"data.streams=[{{path: {mds}}}]", *extra),
    )


def test_truncated_shard_is_named_before_training(tiny_overrides, damaged, tmp_path):
    mds, shards = damaged
    with open(shards[2], "r+b") as f:
        f.truncate(1000)
    r = _train(tiny_overrides, mds)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"damaged shard(s) train/00000/{shards[2].name}" in r.stderr
    assert "data.skip_bad_shards=true" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_corrupt_shard_fails_its_checksum(tiny_overrides, damaged):
    mds, shards = damaged
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shards[1].write_bytes(bytes(data))
    r = _train(tiny_overrides, mds)
    assert r.returncode == 2 and f"train/00000/{shards[1].name}" in r.stderr


def test_skip_bad_shards_trains_without_them(tiny_overrides, damaged, tmp_path):
    mds, shards = damaged
    shards[0].unlink()
    r = _train(tiny_overrides, mds, "data.skip_bad_shards=true", "train.max_steps=3")
    assert r.returncode == 0, r.stderr
    assert f"skipping damaged shard(s) train/00000/{shards[0].name}" in r.stderr
    assert len(losses_by_step(tmp_path / "run")) == 3
    fingerprint = json.loads((tmp_path / "run" / "data_train.json").read_text())[0]
    index = json.loads((mds / "train" / "index.json").read_text())
    assert fingerprint["shards"] == len(index["shards"]) - 1


def test_val_streams_are_read_for_validation(tiny_overrides, dataset, damaged):
    mds, _ = damaged
    for shard in (mds / "val").glob("*/shard.*"):
        shard.unlink()
    r = _train(tiny_overrides, dataset["mds"], f"data.val_streams=[{{path: {mds}}}]")
    assert (
        r.returncode == 2 and "data.val_streams[0]" in r.stderr and "val/00000/shard." in r.stderr
    )


def _corrupt_remote(root: Path) -> Path:
    """Four zstd MDS shards with xxh64 hashes, each with its last byte flipped (same size,
    so only the hash can tell), in a folder streaming downloads from as from a store."""
    from pretrain.data.streaming_compat import streaming_module

    columns = {"tokens": "ndarray:uint16"}
    with streaming_module().MDSWriter(
        out=str(root / "train"), columns=columns, compression="zstd", hashes=["xxh64"],
        size_limit=4096,
    ) as out:  # fmt: skip
        for i in range(128):
            out.write({"tokens": np.arange(i, i + 65, dtype=np.uint16)})
    shards = sorted((root / "train").glob("shard.*.mds.zstd"))
    assert len(shards) >= 4
    for shard in shards:
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    return root


@pytest.mark.parametrize("failing", ["one thread", "both threads"])
def test_a_shard_that_fails_its_download_raises(tmp_path, failing):
    """streaming downloads in two threads (one ahead of the reader, one that waits for the
    reader's next shard and downloads it itself if not yet started). Whether one of them or
    both (as on a loaded machine) fail, reading raises: it must neither end as if the epoch
    were complete (validation would score nothing) nor wait forever for the failed threads."""
    from pretrain.data import loader
    from pretrain.data.streaming_compat import streaming_module

    remote, both = _corrupt_remote(tmp_path / "remote"), failing == "both threads"
    downloading, failed = threading.Event(), []
    met = threading.Barrier(2 if both else 1, timeout=60)

    class Dataset(loader._dataset_class()):
        def _prepare_thread(self, it) -> None:
            if both:  # the ready thread takes the first shard, the download thread another
                downloading.wait(60)
            super()._prepare_thread(it)

        def _ready_thread(self, it) -> None:
            if not both:  # the download thread takes the first shard: the ready thread waits
                downloading.wait(60)
            super()._ready_thread(it)

    stream = streaming_module().Stream(
        remote=str(remote), local=str(tmp_path / "cache"), split="train", download_retry=1,
        validate_hash="xxh64",
    )  # fmt: skip
    download = stream.prepare_shard

    def held(shard):
        downloading.set()
        met.wait()  # with both: each thread holds a shard of its own when they fail
        try:
            return download(shard)
        except ValueError:
            failed.append(threading.current_thread().name)
            raise

    stream.prepare_shard = held
    dataset = Dataset(streams=[stream], batch_size=8, shuffle=True, shuffle_seed=1)
    outcome: list[BaseException | int] = []

    def read() -> None:
        try:
            outcome.append(sum(1 for _ in dataset))
        except Exception as e:
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(120)
    assert not reader.is_alive(), f"reading hung after {failed} failed"
    # The reader raises at the first failure; on a loaded machine the other thread's
    # download may still be failing then. Both must have failed for the case to be "both".
    deadline = time.monotonic() + 60
    while len(failed) < (2 if both else 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(failed) == (2 if both else 1)
    assert isinstance(outcome[0], RuntimeError), outcome
    # The failed thread's error, in the reader's one line (also across a DataLoader worker).
    assert re.fullmatch(
        r"Background thread failed: ValueError: Checksum failure: \S+\.mds\.zstd", str(outcome[0])
    )


@pytest.mark.torchrun
def test_repeat_weights_show_up_exactly_in_an_epoch(tiny_overrides, dataset, dataset_b, tmp_path):
    streams = f"data.streams=[{{path: {dataset['mds']}, repeat: 2}}, {{path: {dataset_b}}}]"
    out = tmp_path / "out"
    torchrun(1, "--epoch", out, 0, *with_overrides(tiny_overrides, streams))
    got = Counter(h for record in seen(out) for h in record["rows"])
    a, b = all_samples(dataset["mds"]), all_samples(dataset_b)
    assert not set(a) & set(b)
    expected = Counter({h: 2 * n for h, n in a.items()}) + b
    assert not got - expected
    assert sum((expected - got).values()) < 8  # only the tail that fills no micro-batch


@pytest.mark.torchrun
def test_proportions_set_the_mix(tiny_overrides, dataset, dataset_b, tmp_path):
    streams = f"data.streams=[{{path: {dataset['mds']}, proportion: 0.8}}, {{path: {dataset_b}, proportion: 0.2}}]"
    out = tmp_path / "out"
    torchrun(1, "--epoch", out, 0, *with_overrides(tiny_overrides, streams))
    a, b = all_samples(dataset["mds"]), all_samples(dataset_b)
    rows = [h for record in seen(out) for h in record["rows"]]
    # Over an epoch streaming draws round(proportion * epoch size) samples from each stream.
    assert abs(len(rows) - (a.total() + b.total())) < 8
    assert sum(h in a for h in rows) / len(rows) == pytest.approx(0.8, abs=0.005)


def test_a_run_may_move_its_data_but_not_change_it(tiny_overrides, dataset, dataset_b, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(dataset["mds"], moved)
    assert _train(tiny_overrides, dataset["mds"], "train.max_steps=5").returncode == 0
    r = _train(tiny_overrides, moved, "train.max_steps=10")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    r = _train(tiny_overrides, dataset_b, "train.max_steps=15")
    assert r.returncode == 2 and "is not the dataset this run started with" in r.stderr


def test_shards_from_another_tokenizer_are_refused(tiny_overrides, dataset, tmp_path):
    other = tmp_path / "other.model"
    r = run_cli(
        "prep",
        "tokenizer",
        "--inputs",
        str(dataset["corpus"]),
        "--text-field",
        "body",
        "--vocab-size",
        "600",
        "--out",
        str(other),
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "train",
        "configs/tiny.yaml",
        *with_overrides(tiny_overrides, f"data.tokenizer={other}", "model.vocab_size=600"),
    )
    assert (
        r.returncode == 2
        and "was tokenized with" in r.stderr
        and "re-run `pretrain prep shards`" in r.stderr
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
