"""An array task reads a remote parquet file in place: the footer and its parts' row groups by
ranged GETs, not the whole object once per task that touches it; and the dataset is the one a
single machine writes from the same object (real S3 server, tests/helpers/s3server.py)."""

from __future__ import annotations

import re
from pathlib import Path

from pretrain import iotrace
from tests.test_prep_array import TEXTS, files, prep  # the same texts, runs and comparison


def fetched(trace: Path, url: str) -> int:
    """Bytes of `url` read by ranged GETs, from the iotrace records."""
    ranges = [r["what"] for r in iotrace.read(trace) if r["kind"] == iotrace.DOWNLOAD]
    return sum(int(b) - int(a) for a, b in (re.search(rf"^{url} \[(\d+), (\d+)\)$", w).groups() for w in ranges))  # fmt: skip


def test_array_tasks_read_remote_parquet_by_ranges_into_the_same_dataset(
    s3, dataset, tmp_path, monkeypatch
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = "".join(p.read_text() for p in sorted(TEXTS.glob("*_gut.txt"))[:6])
    local = tmp_path / "docs.parquet"
    docs = [text[i : i + 1500] for i in range(0, len(text), 1500)]
    pq.write_table(pa.table({"text": docs}), local, row_group_size=40, compression="none")
    bucket = s3.make_bucket("prep-parquet")
    s3.client().upload_file(str(local), bucket, "raw/docs.parquet")
    url, size = f"s3://{bucket}/raw/docs.parquet", local.stat().st_size
    flags = ["--inputs", url, "--tokenizer", dataset["tokenizer"], "--seq-len", "64",
             "--part-size", "100KB", "--shard-size-limit", "32KB", "--workers", "1"]  # fmt: skip

    assert prep("shards", *flags, "--out", tmp_path / "one") == 0  # downloads it whole
    scratch, out = tmp_path / "scratch", tmp_path / "array"
    for task in range(3):
        trace = tmp_path / f"trace{task}"
        trace.mkdir()
        monkeypatch.setenv(iotrace.ENV, str(trace))
        assert prep("shards", *flags, "--out", out, "--tasks", 3, "--task-index", task,
                    "--scratch", scratch) == 0  # fmt: skip
        assert 0 < fetched(trace, url) < size * 0.75, (task, fetched(trace, url), size)
        assert not list(scratch.iterdir())  # each part's folder is removed after it
    assert files(out) == files(tmp_path / "one")
