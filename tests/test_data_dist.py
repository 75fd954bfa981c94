"""The training data under real torchrun: every rank streams its own part, an epoch covers
the dataset once, and a stopped run resumes at exactly the next sample on 1 or 2 ranks."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.runs import REPO, made_once, run_torchrun

pytestmark = pytest.mark.torchrun


def torchrun(nproc: int, *args, env: dict | None = None, timeout: float = 300) -> None:
    """tests/helpers/data_ranks.py on `nproc` ranks."""
    run_torchrun(nproc, REPO / "tests/helpers/data_ranks.py", *args, env=env, timeout=timeout)


def seen(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(out.glob("rank*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def global_batches(out: Path) -> dict[int, list[str]]:
    """Global step -> sorted sample hashes of every rank's micro-batches in that step."""
    steps: dict[int, list[str]] = {}
    for record in seen(out):
        steps.setdefault(record["step"], []).extend(record["rows"])
    return {step: sorted(rows) for step, rows in steps.items()}


def all_samples(mds: Path, split: str = "train") -> Counter:
    """Hash of every sample in the dataset, read straight from the shards."""
    from pretrain.data.streaming_compat import streaming_module

    dataset = streaming_module().LocalDataset(local=str(mds), split=split)
    return Counter(
        hashlib.sha1(dataset[i]["tokens"].astype("int64").tobytes()).hexdigest()[:16]
        for i in range(len(dataset))
    )


def data_overrides(tiny_overrides: list[str], run_dir: Path) -> list[str]:
    return [o if not o.startswith("run.dir=") else f"run.dir={run_dir}" for o in tiny_overrides]


def assert_one_epoch(out: Path, expected: Counter, world: int, micro: int) -> None:
    got = Counter(h for record in seen(out) for h in record["rows"])
    assert not got - expected, "a sample was read more often than the dataset holds it"
    missing = sum((expected - got).values())
    # drop_last keeps micro-batches full: less than one batch per rank may go unread.
    assert missing < world * micro, f"{missing} samples never read"


def test_two_ranks_read_disjoint_parts_covering_one_epoch(dataset, tiny_overrides, tmp_path):
    out = tmp_path / "out"
    torchrun(2, "--epoch", out, 0, *data_overrides(tiny_overrides, tmp_path / "run"))
    ranks = [
        Counter(
            h
            for line in (out / f"rank{r}.jsonl").read_text().splitlines()
            for h in json.loads(line)["rows"]
        )
        for r in (0, 1)
    ]
    assert sum(ranks[0].values()) == sum(ranks[1].values()) > 0
    assert_one_epoch(out, all_samples(dataset["mds"]), world=2, micro=8)


@pytest.mark.parametrize("resume_world", [1, 2])
def test_resume_mid_epoch_on_1_or_2_ranks_gives_the_same_global_batches(
    dataset, tiny_overrides, tmp_path, tmp_path_factory, resume_world
):
    """Uninterrupted on 2 ranks vs. stopped after 3 steps and resumed on `resume_world`."""
    steps, stop = 8, 3

    def make(root: Path) -> None:  # the same two runs for both resumes: made once
        torchrun(2, root / "ref", steps, *data_overrides(tiny_overrides, root / "run-ref"))
        torchrun(2, "--save-at", stop, root / "first", stop,
                 *data_overrides(tiny_overrides, root / "run-a"))  # fmt: skip

    root = made_once(tmp_path_factory, "stopped-mid-epoch", make)
    ref, first = root / "ref", root / "first"
    second = tmp_path / "second"
    state = first / "state.json"
    assert json.loads(state.read_text())["sample_in_epoch"] == stop * 16
    torchrun(
        resume_world,
        "--resume",
        state,
        second,
        steps - stop,
        *data_overrides(tiny_overrides, tmp_path / "run-b"),
    )

    expected = global_batches(ref)
    resumed = global_batches(first) | {stop + s: rows for s, rows in global_batches(second).items()}
    assert len(expected) == steps and resumed == expected
