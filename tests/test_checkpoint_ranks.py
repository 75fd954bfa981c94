"""The checkpoint protocol on 2 real ranks (torchrun, gloo; workers in helpers/checkpoint_ranks.py):
each rank makes durable and moves to and from a real S3 server only the files it wrote;
rank 0 alone picks the checkpoint to resume from, and every rank loads that one."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from pretrain import iotrace
from pretrain.checkpoint.checkpointer import Checkpointer, rng_state
from pretrain.checkpoint.ranks import file_owner
from tests.helpers.checkpoint_ranks import COLLECTIVE_TIMEOUT_S
from tests.helpers.runs import run_torchrun
from tests.helpers.s3server import SlowProxy


def run_ranks(tmp_path: Path, mode: str, *args, env: dict | None = None):
    """Both ranks' reports and every io-trace record of a 2-rank run of `mode`."""
    out, trace = tmp_path / "out", tmp_path / "trace"
    out.mkdir()
    trace.mkdir()
    r = run_torchrun(
        2,
        "tests/helpers/checkpoint_ranks.py",
        mode,
        out,
        *args,
        env={iotrace.ENV: str(trace), **(env or {})},
    )
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    return reports, iotrace.read(trace), r.stdout + r.stderr


def traced(records: list[dict], kind: str, rank: int, under: Path) -> list[str]:
    """Paths (relative to `under`) of `kind` records that `rank` made."""
    return [
        str(Path(r["what"]).relative_to(under))
        for r in records
        if r["kind"] == kind and r["rank"] == rank and r["what"].startswith(f"{under}/")
    ]


@pytest.mark.torchrun
def test_each_rank_makes_only_its_own_files_durable(tmp_path):
    """ddp, fsdp (background write), zero 1/2/3 on 2 ranks: two commits, then a resume."""
    names = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
    root = tmp_path / "root"
    reports, records, _ = run_ranks(tmp_path, "strategies", root, *names)
    for name in names:
        written = [reports[rank][name]["written"] for rank in (0, 1)]
        for rank in (0, 1):
            for step, files in written[rank].items():
                # The rule names the rank that really wrote each file, for every strategy.
                assert files and all(file_owner(f) == rank for f in files), (name, rank, files)
                tmp = f".tmp-step_{int(step):08d}"
                own = {f"{tmp}/{f}" for f in files}
                fsynced = [p for p in traced(records, "fsync", rank, root / name) if tmp in p]
                if rank == 1:  # each own file once per commit; nothing of rank 0's
                    assert Counter(fsynced) == Counter(own), (name, step)
                else:  # plus the manifest and the folders
                    assert own <= set(fsynced) and not set(fsynced) & {
                        f"{tmp}/{f}" for f in written[1][step]
                    }
        final = root / name / "step_00000002"
        manifest = json.loads((final / "manifest.json").read_text())["files"]
        on_disk = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()}
        assert set(manifest) == on_disk - {"manifest.json"}
        assert set(manifest) | {"manifest.json"} == set(written[0]["2"]) | set(written[1]["2"])
        assert all((final / f).stat().st_size == size for f, size in manifest.items())
        assert reports[0][name]["resumed"] == reports[1][name]["resumed"] == "step_00000002"
    # Resuming, only rank 0 checks sizes; rank 1 read the size of its own files, once each.
    stats = traced(records, "stat", 1, root)
    assert all(file_owner(Path(p).name) == 1 for p in stats) and len(stats) == len(set(stats))


@pytest.mark.torchrun
def test_every_rank_resumes_from_the_checkpoint_rank_0_picked(tmp_path):
    """Rank 1's view of the run directory lags (the newest checkpoint's manifest is not
    visible there yet, as a node's stale filesystem cache can show): it still loads the
    checkpoint rank 0 picked, and never checks a manifest itself."""
    views = [tmp_path / "view0", tmp_path / "view1"]
    ck = Checkpointer(views[0], keep_last=3)
    for step in (5, 10):
        ck.save(step, {"step": step}, lambda folder: None)
    for rank in (0, 1):  # files as both ranks wrote them
        for step in ("05", "10"):
            torch.save(rng_state(), views[0] / f"step_000000{step}" / f"rng_rank{rank}.pt")
    for path in views[0].glob("step_*"):  # manifests naming every rank's files
        files = {p.name: p.stat().st_size for p in path.iterdir() if p.name != "manifest.json"}
        (path / "manifest.json").write_text(json.dumps({"step": 0, "files": files}))
    shutil.copytree(views[0], views[1])
    (views[1] / "step_00000010" / "manifest.json").unlink()
    assert Checkpointer(views[1], keep_last=3).latest().name == "step_00000005"

    reports, records, _ = run_ranks(tmp_path, "views", *views)
    assert [r["resumed"] for r in reports] == ["step_00000010", "step_00000010"]
    assert [r["step"] for r in reports] == [10, 10]
    stats = iotrace.counts(records, iotrace.STAT)
    assert stats[1] == 0 and stats[0] == 3  # rank 0: the newest checkpoint's files, once


@pytest.mark.torchrun
def test_ranks_move_their_own_files_to_and_from_the_store(s3_server, tmp_path):
    """Uploads and downloads by each rank of its own files; a rank's failure reaches rank 0
    as an error; a download slower than the collective timeout completes."""
    url = f"s3://{s3_server.make_bucket('ranks')}/run"
    with SlowProxy(s3_server.ports["s3"], delay=2.0) as proxy:  # >= 2 replies per file
        reports, records, output = run_ranks(
            tmp_path, "s3", tmp_path / "root", url, proxy.endpoint, env=s3_server.env
        )
    one, two = reports
    assert one["store"] == two["store"] == ["step_00000003", "step_00000002"]
    assert one["upload_failures"] == two["upload_failures"] == 0
    uploads = [Counter(r["what"].split("/run/")[1] for r in records if r["kind"] == "upload" and r["rank"] == rank) for rank in (0, 1)]  # fmt: skip
    for step in ("step_00000001", "step_00000002", "step_00000003"):
        assert uploads[1][f"{step}/__1_0.distcp"] == uploads[1][f"{step}/rng_rank1.pt"] == 1
        assert uploads[0][f"{step}/manifest.json"] == 1
    assert all(file_owner(Path(name).name) == 1 for name in uploads[1])
    assert all(file_owner(Path(name).name) == 0 for name in uploads[0])

    # Rank 1 was refused: both count the failure, no manifest went up, the local copy stands.
    assert one["failures_after_denied"] == two["failures_after_denied"] == 1
    assert one["store_after_denied"] == ["step_00000003", "step_00000002"]
    assert one["local_after_denied"] == "step_00000004"
    denied = f"upload of checkpoint step_00000004 to {url} failed: rank 1: "
    assert denied in output and "access denied" in output.split(denied)[1].splitlines()[0]
    assert "a-wrong-secret-4242" not in output

    # The fresh node: every rank got step 3 and downloaded its own share of it.
    assert one["fetched"] == two["fetched"] == "step_00000003"
    assert one["fetched_state"] == two["fetched_state"] == {"step": 3}
    assert one["fetched_own"] == two["fetched_own"] == "03"
    fresh = tmp_path / "root" / "second"
    downloads = [[r["what"] for r in records if r["kind"] == "download" and r["rank"] == rank] for rank in (0, 1)]  # fmt: skip
    assert sorted(Path(u).name for u in downloads[1] if "step_00000003" in u) == [
        "__1_0.distcp",
        "rng_rank1.pt",
    ]
    assert all(file_owner(Path(u).name) == 0 for u in downloads[0])
    assert sorted(p.name for p in (fresh / "step_00000003").iterdir()) == [
        "__0_0.distcp", "__1_0.distcp", "manifest.json", "rng_rank0.pt", "rng_rank1.pt",
        "train_state.json",
    ]  # fmt: skip
    # Rank 1's share came through a store slower than the collective timeout.
    took = [r["t"] for r in records if r["rank"] == 1 and r["kind"] == "download"]
    start = next(r["t"] for r in records if r["rank"] == 0 and r["kind"] == "download")
    assert max(took) - start > COLLECTIVE_TIMEOUT_S

    # Rank 1 cannot download: every rank stops with the reason; nothing was put in place.
    for report in reports:
        assert "download of checkpoint step_00000003" in report["denied_fetch"]
        assert "rank 1: " in report["denied_fetch"] and "access denied" in report["denied_fetch"]
        assert "no checkpoint to fall back to" in report["denied_fetch"]
    assert not [name for name in one["third"] if name.startswith("step_")]
