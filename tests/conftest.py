"""Shared fixtures, and the tiers (tests/README.md).

Fixtures: real Shakespeare text, a small tokenizer and MDS dataset made with the real
`pretrain prep` commands, and the uninterrupted reference runs the parallel and fault tests
compare against. Each is made once per test session, also when pytest-xdist runs the
session on several workers: the first worker to need it makes it under a file lock in the
session's base temp folder, and the others wait for it and read it.

Tiers: `slow` marks the tests that start real processes that take a while (training runs
of the CLI, torchrun ranks, the S3 server, the SLURM cluster, the multi-node harness); the
fast tier is `-m "not slow"`. The markers naming what a test starts (torchrun, s3, slurm,
nodes) imply `slow`, and a test not marked slow that starts any of those fails, so that
the fast tier keeps its promise.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.runs import (
    REF,
    STRATEGIES,
    TEXT_FIELD,
    TINY_MODEL,
    made_once,
    prep,
    run_cli,
    run_torchrun,
    shakespeare_texts,
    with_overrides,
    write_plays,
)

# Markers that say what a test starts; each puts the test in the slow tier.
SLOW_KINDS = ("torchrun", "s3", "slurm", "nodes")
# Fixtures that start a server, and the marker their tests get.
FIXTURE_KINDS = {"s3_server": "s3"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, kind in FIXTURE_KINDS.items():
            if fixture in item.fixturenames:
                item.add_marker(kind)
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker("slow")


# Under pytest-xdist's `--dist loadgroup` (make test), the tests of each group's files run
# on one worker, so that their module-scoped runs (a SLURM cluster, four nodes, a dataset in
# the store) are made once, and the multi-node and 7B-shaped runs never meet in memory;
# every other test goes to whichever worker is free. (The groups are given here, by file,
# because xdist's own `xdist_group` marks are lost with pytest 9.2's node ids.)
XDIST_GROUPS = {
    "test_nodes.py": "heavy",
    "test_parallel_7b_build.py": "heavy",
    "test_slurm.py": "slurm",
    "test_data_s3.py": "s3-data",
    # one torchrun launch serves every case: on two workers one would wait for the other's
    "test_planner_memory.py": "plan-memory",
    # as for test_planner_memory.py: one torchrun launch serves its 2-rank cases
    "test_parallel_ranks.py": "parallel-ranks",
    # one trained run (module fixture) serves every test of the file
    "test_eval.py": "eval",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return XDIST_GROUPS.get(Path(nodeid.split("::")[0]).name, nodeid)

    return FileGroups(config, log)


# What the fast tier never starts: the basename of a program, or `python -m MODULE CMD`.
SLOW_PROGRAMS = {"weed", "unshare", "sbatch", "srun", "slurmctld", "slurmd", "munged"}
SLOW_MODULES = {"torch.distributed.run"}
SLOW_CLI = {"train", "launch", "resume", "sweep", "submit"}
RANK_STARTERS = {"torch.distributed.run", "pretrain launch"}


def slow_command(args) -> str | None:
    """Why starting `args` belongs in the slow tier, or None."""
    if isinstance(args, (str, bytes, os.PathLike)):
        args = [args]
    argv = [os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in args]
    if not argv:
        return None
    if Path(argv[0]).name in SLOW_PROGRAMS:
        return Path(argv[0]).name
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        rest = argv[argv.index("-m") + 2 :]
        if module in SLOW_MODULES:
            return module
        if module == "pretrain" and rest and rest[0] in SLOW_CLI and "--dry-run" not in rest:
            return f"pretrain {rest[0]}"
    return None


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """A test that starts ranks without the torchrun marker, or that starts anything of the
    slow tier without being in it, fails at that moment, naming the marker it lacks."""
    node = request.node
    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        why = slow_command(args)
        if why in RANK_STARTERS and not node.get_closest_marker("torchrun"):
            raise RuntimeError(f"{node.nodeid} starts `{why}`: mark it torchrun")
        if why and not node.get_closest_marker("slow"):
            raise RuntimeError(
                f"{node.nodeid} starts `{why}` but is not marked slow (or torchrun, s3, "
                f"slurm, nodes): the fast tier never starts it"
            )
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Five plays cut into ~3 kB documents, as JSONL with a non-default text field."""

    def make(folder: Path) -> None:
        write_plays(folder / "plays.jsonl", shakespeare_texts()[:5])

    return made_once(tmp_path_factory, "corpus", make) / "plays.jsonl"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, corpus) -> dict:
    """A 512-piece tokenizer and 64-token MDS shards, made by the real prep commands."""

    def make(root: Path) -> None:
        prep("tokenizer", "--inputs", corpus, "--text-field", TEXT_FIELD, "--vocab-size", "512",
             "--out", root / "tok.model")  # fmt: skip
        prep("shards", "--inputs", corpus, "--text-field", TEXT_FIELD, "--tokenizer",
             root / "tok.model", "--seq-len", "64", "--val-fraction", "0.1", "--out", root / "mds")  # fmt: skip

    root = made_once(tmp_path_factory, "data", make)
    return {"tokenizer": root / "tok.model", "mds": root / "mds", "corpus": corpus}


@pytest.fixture(scope="session")
def dataset_b(tmp_path_factory, dataset) -> Path:
    """A second dataset (three other plays) with the same tokenizer, for mixtures."""

    def make(root: Path) -> None:
        corpus = write_plays(root / "plays.jsonl", shakespeare_texts()[5:8])
        prep("shards", "--inputs", corpus, "--text-field", TEXT_FIELD, "--tokenizer",
             dataset["tokenizer"], "--seq-len", "64", "--val-fraction", "0.1", "--out", root / "mds")  # fmt: skip

    return made_once(tmp_path_factory, "data_b", make) / "mds"


@pytest.fixture
def tiny_overrides(dataset, tmp_path) -> list[str]:
    """A model small enough for a step in tens of milliseconds, on the session dataset."""
    return [
        f"run.dir={tmp_path / 'run'}",
        f"data.tokenizer={dataset['tokenizer']}",
        f"data.streams=[{{path: {dataset['mds']}}}]",
        *TINY_MODEL,
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        "train.max_steps=20",
        "train.eval_every=10",
        "train.eval_batches=2",
        "train.log_every=5",
        "schedule.warmup_steps=5",
        "checkpoint.every=5",
        "checkpoint.keep_last=2",
        "optim.lr=3e-3",
        "parallel.threads=1",
    ]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3 server (seaweedfs on 127.0.0.1) for the whole session (of this worker)."""
    from tests.helpers.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The server, with its endpoint and credentials in this process's environment."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    from pretrain import objstore

    objstore._client.cache_clear()  # clients capture the endpoint they were made with
    yield s3_server
    objstore._client.cache_clear()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """`reference(name, tiny_overrides)`: the run directory of an uninterrupted REF run on
    2 ranks with strategy `name`, or in one process for "single"; made once per session."""

    def get(name: str, tiny_overrides: list[str]) -> Path:
        def make(folder: Path) -> None:
            args = ["train", "configs/tiny.yaml"]
            overrides = with_overrides(
                tiny_overrides, f"run.dir={folder / 'run'}", *STRATEGIES.get(name, []), *REF
            )
            if name == "single":
                r = run_cli(*args, *overrides)
                assert r.returncode == 0, r.stderr
            else:
                run_torchrun(2, "-m", "pretrain", *args, *overrides)

        return made_once(tmp_path_factory, f"ref-{name}", make) / "run"

    return get
