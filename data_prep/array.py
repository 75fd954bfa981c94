"""`prep shards --tasks N`: one dataset written by N tasks, as a SLURM job array
(data_prep.array_slurm) or started by hand under any scheduler (`--task-index I`).

OUT/_prep/ holds the job's bookkeeping, next to the dataset:
    plan.json           the inputs (names and sizes), the flags, the tokenizer, N, the jobs
    parts/00012.json    part 12's manifest: written once its shards and index are in place,
                        so a part is complete exactly when its manifest is there
    tasks/00001.json    task 1's state (running, done, failed, cancelled), host, heartbeat
                        and its end summary
    summary.json        the merge's totals

Every task reads the plan and takes its parts that have no manifest one at a time: it stages
the part's inputs in a folder of its own on node-local scratch (--scratch, $PRETRAIN_SCRATCH,
else the temp folder), checks its documents (a first pass, as one machine does), tokenizes
and packs it there (one pool of tokenizer processes serves all the task's parts), publishes
it (target.py: each file whole under its name, so a killed attempt leaves no partial file
under a real name and a duplicate task only rewrites the same bytes), then writes its
manifest and empties the folder. Nothing is ever deleted from the output, so a
task can never take away a part that another has completed. The task that finds every manifest
present after writing its own merges: it concatenates the parts' indexes in part order into
train/index.json and val/index.json and writes meta.json last. Two tasks finishing at once
both merge to the same bytes. The merged dataset is the one a single `prep shards` writes
(data_prep.parts explains why N cannot change it).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_prep.inputs import check_readable, expand_inputs
from data_prep.parts import Part, check_tasks, fetch_pieces, plan_parts, task_parts
from data_prep.shards import (
    Settings,
    check_workers,
    count_documents,
    dumps,
    merged_indexes,
    merged_meta,
    tokenizer_pool,
    write_parts,
)
from data_prep.target import Target
from pretrain.data.format import INDEX_NAME, META_NAME, PREP_DIR, SPLITS, is_dataset_key
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import PrepError
from pretrain.objstore import is_remote

PLAN_FORMAT = "pretrain-prep-plan-v1"
PLAN = f"{PREP_DIR}/plan.json"
SUMMARY = f"{PREP_DIR}/summary.json"
HEARTBEAT_S = 30.0
# The fields of a plan that decide the dataset: a task started with other ones is refused.
PLAN_KEYS = ("format", "inputs", "tokenizer", "tokenizer_sha256", "settings", "tasks")


def part_key(index: int) -> str:
    return f"{PREP_DIR}/parts/{index:05d}.json"


def task_key(index: int) -> str:
    return f"{PREP_DIR}/tasks/{index:05d}.json"


class Cancelled(BaseException):
    """SIGTERM (scancel, a time limit, preemption): the task records it and stops."""


def make_plan(
    inputs: Sequence[str], tokenizer: Path, settings: Settings, tasks: int, workers: int | None
) -> dict[str, Any]:
    """The plan of a job, from a listing of the inputs (nothing is read but one byte each)."""
    settings.check()
    names = expand_inputs(inputs)
    local = [n for n in names if not is_remote(n)]
    from data_prep.inputs import InputFile

    check_readable([InputFile.local(n) for n in local])
    sizes = {n: os.stat(n).st_size for n in local}
    remote = [n for n in names if is_remote(n)]
    if remote:
        from data_prep.remote import object_sizes

        sizes |= object_sizes(remote)
    try:
        tok = Tokenizer(tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise PrepError(f"--tokenizer: {e}") from None
    files = [[n, sizes[n]] for n in names]
    check_tasks(plan_parts(files, settings.part_size), tasks, settings.part_size)
    return {
        "format": PLAN_FORMAT,
        "inputs": files,
        "tokenizer": str(tok.path.resolve()),
        "tokenizer_sha256": tok.sha256,
        "settings": asdict(settings),
        "tasks": tasks,
        "workers": workers,
        "jobs": [],
    }


def parts_of(plan: dict[str, Any]) -> list[Part]:
    return plan_parts([tuple(f) for f in plan["inputs"]], plan["settings"]["part_size"])


def open_plan(target: Target, plan: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Write `plan` to an empty output, or return the same plan found there (tasks started
    by hand each bring it). Refuses an output holding anything else."""
    found = target.read_json(PLAN)
    if found is not None and not overwrite:
        if {k: found.get(k) for k in PLAN_KEYS} == {k: plan[k] for k in PLAN_KEYS}:
            return found
        differ = next(k for k in PLAN_KEYS if found.get(k) != plan[k])
        raise PrepError(
            f"--out {target.out} holds another prep job ({differ} differs); see `pretrain prep "
            "status` on it, or pass --overwrite to replace it"
        )
    names = target.names()
    if found is None and not overwrite:
        # Tasks started together by hand: another may be writing this same plan right now
        # (its temporary file): bookkeeping without a plan is not a dataset to protect.
        names = [n for n in names if not n.startswith(PREP_DIR + "/")]
    if names and not overwrite:
        what = "a dataset" if META_NAME in names else f"files ({', '.join(names[:3])})"
        raise PrepError(
            f"--out {target.out} already holds {what}; pass --overwrite to replace a dataset, "
            "or choose a new or empty folder"
        )
    foreign = [n for n in names if not is_dataset_key(n)]
    if foreign:
        raise PrepError(
            f"--out {target.out} holds files prep did not write ({', '.join(foreign[:3])}); "
            "--overwrite only replaces a dataset: choose a new or empty folder"
        )
    if names:  # --overwrite: meta.json first, so a half-removed dataset never looks complete
        if META_NAME in names:
            target.remove_file(META_NAME)
        for top in (*SPLITS, PREP_DIR):
            target.remove(top)
    target.write_json(PLAN, plan)
    return plan


def done_parts(target: Target) -> set[int]:
    return {int(Path(n).stem) for n in target.names(f"{PREP_DIR}/parts") if n.endswith(".json")}


def scratch_base(scratch: str | Path | None) -> Path:
    """Where tasks stage their parts: `scratch`, else $PRETRAIN_SCRATCH, else the temp dir."""
    from pretrain.train.process import SCRATCH_ENV

    base = scratch or os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()
    path = Path(base).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepError(f"--scratch {path}: cannot create it ({e.strerror})") from None
    return path


def run_task(
    out: str, index: int, workers: int | None = None, scratch: str | Path | None = None
) -> dict[str, Any] | None:
    """Task `index` of the job in `out`: its missing parts, then the merge if it is the last.
    Returns the merge's summary when this task merged."""
    target = Target(out)
    plan = target.read_json(PLAN)
    if plan is None:
        raise PrepError(f"{out}: no {PLAN}: not an array prep job (start it with prep shards)")
    if not 0 <= index < plan["tasks"]:
        raise PrepError(f"--task-index {index}: the job in {out} has tasks 0..{plan['tasks'] - 1}")
    settings = Settings(**plan["settings"])
    tokenizer = _tokenizer(plan)
    workers = check_workers(workers or plan.get("workers") or _slurm_cpus())
    mine = task_parts(parts_of(plan), plan["tasks"], index)
    done = done_parts(target)
    todo = [p for p in mine if p.index not in done]
    status = _TaskStatus(target, index, len(mine))
    try:
        base = scratch_base(scratch)
        with status, tempfile.TemporaryDirectory(prefix="pretrain-prep-", dir=base) as work:
            if todo:
                _write_task(target, todo, tokenizer, settings, workers, Path(work), status)
            status.finish()
    except Cancelled:
        status.end("cancelled", "SIGTERM (scancel, the time limit or preemption)")
        raise
    except BaseException as e:
        status.end("failed", str(e) or type(e).__name__)
        raise
    return merge(target) if len(done_parts(target)) == len(parts_of(plan)) else None


def _write_task(target, todo, tokenizer, settings, workers, work: Path, status) -> None:
    for piece in {p for part in todo for p in part.pieces if not is_remote(p.name)}:
        size = os.stat(piece.name).st_size if os.path.exists(piece.name) else None
        if size != piece.size:
            raise PrepError(
                f"{piece.name} changed since the job was planned ({piece.size:,} bytes, now "
                f"{'missing' if size is None else f'{size:,}'}); start a new job"
            )
    with tokenizer_pool(tokenizer, workers) as pool:  # its processes serve every part
        for part in todo:
            _write_part(target, part, tokenizer, settings, pool, work, status)


def _write_part(target, part, tokenizer, settings, pool, work: Path, status) -> None:
    """One part: staged in its own folder under `work`, checked, packed, published, removed."""
    if target.exists(part_key(part.index)):  # a duplicate of this task wrote it meanwhile
        print(f"task {status.index}: part {part.index} was written by another task", flush=True)
        return
    folder = work / part.folder  # this part's inputs and shards, and nothing else
    sources = fetch_pieces([part], folder / "inputs")
    documents = count_documents([part], sources, settings)  # bad input fails before writing
    stage = folder / "stage"
    publish = functools.partial(_publish, target, stage, status)
    write_parts([part], sources, tokenizer, stage, settings, pool, documents, publish)
    shutil.rmtree(folder)


def _publish(target: Target, stage: Path, status: _TaskStatus, manifest: dict[str, Any]) -> None:
    """A written part: its files (shards, then indexes), then its manifest."""
    files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    target.upload(stage, files)
    target.write_json(part_key(manifest["part"]), {**manifest, "task": status.index})
    status.part_done(manifest)


def merge(target: Target) -> dict[str, Any]:
    """Concatenate every part's index in part order, then write meta.json last."""
    plan = target.read_json(PLAN)
    assert plan is not None
    parts = parts_of(plan)
    started = time.perf_counter()
    manifests = target.read_many([part_key(p.index) for p in parts])
    missing = [p.index for p, m in zip(parts, manifests, strict=True) if m is None]
    if missing:
        raise PrepError(f"{target.out}: parts {missing[:5]} are not written yet; see prep status")
    meta = merged_meta(manifests, _tokenizer(plan), Settings(**plan["settings"]))
    for split, index in merged_indexes(manifests).items():
        target.write_text(f"{split}/{INDEX_NAME}", dumps(index))
    target.write_text(META_NAME, dumps(meta))
    records = [r or {} for r in target.read_many([task_key(i) for i in range(plan["tasks"])])]
    first = min((r["started"] for r in records if "started" in r), default=time.time())
    summary = _totals(manifests) | {
        "merge_seconds": round(time.perf_counter() - started, 3),
        "wall_seconds": round(time.time() - first, 3),  # first task's start to the merge
    }
    target.write_json(SUMMARY, summary)
    print(f"merged {len(parts)} parts into {target.out}: {describe(summary)}", flush=True)
    return summary


def describe(t: dict[str, Any]) -> str:
    """docs, tokens and MB/s of a summary (a task's, a part's or the whole job's)."""
    rate = t["text_bytes"] / 1e6 / max(t["seconds"], 1e-9)
    return (
        f"{t['documents']:,} docs, {t['tokens']:,} tokens, {t['text_bytes'] / 1e6:,.2f} MB "
        f"in {t['seconds']:.1f} s = {rate:.2f} MB/s"
    )


def _totals(manifests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "documents": sum(m["splits"][s]["documents"] for m in manifests for s in SPLITS),
        "tokens": sum(m["splits"][s]["tokens"] for m in manifests for s in SPLITS),
        "text_bytes": sum(m["text_bytes"][s] for m in manifests for s in SPLITS),
        "seconds": sum(m["seconds"] for m in manifests),
        "parts": len(manifests),
    }


def _tokenizer(plan: dict[str, Any]) -> Tokenizer:
    try:
        tok = Tokenizer(Path(plan["tokenizer"]))
    except (FileNotFoundError, ValueError) as e:
        raise PrepError(f"tokenizer of the plan: {e}") from None
    if tok.sha256 != plan["tokenizer_sha256"]:
        raise PrepError(f"{tok.path} changed since the job was planned (its sha256 differs)")
    return tok


def _slurm_cpus() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(value) if value.isdigit() else None


class _TaskStatus:
    """Task progress in OUT/_prep/tasks/I.json: a heartbeat every HEARTBEAT_S while it runs,
    each finished part's counts, and how it ended. SIGTERM becomes `Cancelled`."""

    def __init__(self, target: Target, index: int, parts: int) -> None:
        self.target, self.index = target, index
        self.manifests: list[dict[str, Any]] = []
        self.record: dict[str, Any] = {
            "task": index,
            "state": "running",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
            "parts": parts,
            "started": time.time(),
        }
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> _TaskStatus:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_term)
        self._write()
        threading.Thread(target=self._beat, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _on_term(self, signum: int, frame: object) -> None:
        raise Cancelled()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()

    def _write(self) -> None:
        with self._lock:
            self.record["updated"] = time.time()
            self.target.write_json(task_key(self.index), self.record)

    def part_done(self, manifest: dict[str, Any]) -> None:
        self.manifests.append(manifest)
        self.record["written"] = _totals(self.manifests)
        self._write()
        print(f"task {self.index}: part {manifest['part']} done: {describe(_totals([manifest]))}", flush=True)  # fmt: skip

    def finish(self) -> None:
        self.end("done", None)
        if self.manifests:
            print(f"task {self.index} done: {describe(_totals(self.manifests))}", flush=True)
        else:
            print(f"task {self.index}: every part was already written", flush=True)

    def end(self, state: str, error: str | None) -> None:
        self._stop.set()
        self.record.update(state=state, error=error, ended=time.time())
        self._write()
