"""The array prep job from outside: submitted to SLURM, its status, its resumption.

`prep shards --slurm --tasks N` writes the plan, then submits one job array of N tasks, each
running `pretrain prep task OUT --index $SLURM_ARRAY_TASK_ID` (no scheduler of ours: SLURM
places, retries and cancels tasks as users already know). Credentials reach the tasks in the
environment sbatch exports, never in the script or the plan.

`prep status OUT` reads the plan, the part manifests and the task records, and asks SLURM
(squeue) which tasks are still queued or running. A task is done when every one of its parts
has a manifest; failed when it is not, it is no longer queued, and its record says why (an
error, SIGTERM) or its heartbeat stopped (kill -9, a lost node). `prep resume OUT` submits an
array of only the tasks that are neither done nor queued (or, for a job started by hand, runs
them here), and merges when every part is written but the merge never ran.

Without an answer from squeue (a controller timeout, common on big clusters; no squeue on
PATH) nobody can tell a running task from a dead one: status says so and resume refuses,
rather than resubmitting tasks that are still running.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from data_prep.array import (
    HEARTBEAT_S,
    PLAN,
    SUMMARY,
    describe,
    done_parts,
    merge,
    parts_of,
    run_task,
    task_key,
)
from data_prep.parts import task_parts
from data_prep.target import Target
from pretrain.data.format import META_NAME, PREP_DIR
from pretrain.errors import PrepError

PASSTHROUGH = ("partition", "time", "cpus_per_task", "mem", "account", "qos")
SCRATCH_HELP = (
    "node-local folder where a task stages one part at a time (its inputs and shards), "
    "emptied after each part (default: $PRETRAIN_SCRATCH, else the temp folder, $TMPDIR)"
)


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("array job (--tasks N with --slurm or --task-index)")
    g.add_argument("--tasks", type=int, metavar="N", help="split the work over N tasks")
    g.add_argument("--task-index", type=int, metavar="I", help="run task I of N here")
    g.add_argument("--slurm", action="store_true", help="submit the N tasks as a SLURM job array")
    for name in PASSTHROUGH:
        g.add_argument("--" + name.replace("_", "-"))
    g.add_argument("--max-parallel", type=int, metavar="K", help="array tasks running at once")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG")
    g.add_argument("--scratch", metavar="DIR", help=SCRATCH_HELP)
    g.add_argument(
        "--log-dir",
        type=Path,
        help="the tasks' logs, on a shared filesystem (default: OUT/_prep/slurm for a local "
        "--out, ./prep-logs for an s3:// one)",
    )


def slurm_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {name: getattr(args, name) for name in PASSTHROUGH if getattr(args, name)}
    opts["max_parallel"] = args.max_parallel
    opts["sbatch_args"] = list(args.sbatch_arg)
    default_logs = (
        Path(args.out) / PREP_DIR / "slurm" if "://" not in args.out else Path("prep-logs")
    )
    opts["log_dir"] = str((args.log_dir or default_logs).resolve())
    opts["cwd"] = str(Path.cwd())
    opts["scratch"] = args.scratch  # a path on each task's node: not resolved here
    return opts


def render(target: Target, opts: dict[str, Any], tasks: list[int]) -> str:
    array = ",".join(map(str, tasks)) + (f"%{opts['max_parallel']}" if opts.get("max_parallel") else "")  # fmt: skip
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=pretrain-prep",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={opts['log_dir']}/prep-%A_%a.out",
        *(f"#SBATCH --{k.replace('_', '-')}={opts[k]}" for k in PASSTHROUGH if opts.get(k)),
        *(f"#SBATCH {arg}" for arg in opts.get("sbatch_args", [])),
        f"cd {shlex.quote(opts['cwd'])}",
        f"exec {shlex.quote(sys.executable)} -m pretrain prep task {shlex.quote(target.out)} "
        '--index "$SLURM_ARRAY_TASK_ID"'
        + (f" --scratch {shlex.quote(opts['scratch'])}" if opts.get("scratch") else ""),
    ]
    return "\n".join(lines) + "\n"


def submit(target: Target, plan: dict[str, Any], tasks: list[int]) -> str:
    """Submit `tasks` as one job array; the job id (recorded in the plan)."""
    opts = plan["slurm"]
    if not shutil.which("sbatch"):
        raise PrepError("sbatch not found: --slurm needs a SLURM client on PATH")
    script = render(target, opts, tasks)
    Path(opts["log_dir"]).mkdir(parents=True, exist_ok=True)
    path = Path(opts["log_dir"]) / f"prep-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    r = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=60)  # fmt: skip
    if r.returncode != 0:
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        raise PrepError(f"sbatch refused {path}: {lines[-1] if lines else 'no message'}")
    job = r.stdout.strip().split(";")[0]
    plan["jobs"].append({"id": job, "tasks": tasks, "submitted": time.time()})
    target.write_json(PLAN, plan)
    print(f"submitted job array {job} (tasks {','.join(map(str, tasks))}): logs "
          f"{opts['log_dir']}/prep-{job}_I.out; see: pretrain prep status {target.out}")  # fmt: skip
    return job


SQUEUE_TIMEOUT_S = 60


class SlurmUnreachable(PrepError):
    """squeue gave no answer: which tasks still run is unknown."""


def queued(plan: dict[str, Any]) -> dict[int, str]:
    """Array task -> SLURM state (PENDING, RUNNING, ...) of the job's tasks still queued.
    Raises SlurmUnreachable when squeue does not answer."""
    states: dict[int, str] = {}
    if not plan.get("jobs"):
        return states
    if not shutil.which("squeue"):
        raise SlurmUnreachable("squeue not found on PATH")
    for job in plan["jobs"]:  # later submissions win
        try:
            r = subprocess.run(["squeue", "-h", "-r", "-j", job["id"], "-o", "%K %T"],
                               capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise SlurmUnreachable(f"squeue gave no answer in {SQUEUE_TIMEOUT_S} s") from None
        if r.returncode != 0:
            if "invalid job id" in r.stderr.lower():  # long ended: the controller forgot it
                continue
            lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
            raise SlurmUnreachable(f"squeue failed ({lines[-1] if lines else f'exit {r.returncode}'})")  # fmt: skip
        for line in r.stdout.splitlines():
            task, _, state = line.strip().partition(" ")
            if task.isdigit():
                states[int(task)] = state
    return states


def task_states(
    target: Target, plan: dict[str, Any], queue: dict[int, str] | None
) -> list[dict[str, Any]]:
    """Each task's state, parts done and record. `queue`: from `queued`, None when squeue
    gave no answer (then an unfinished task of a SLURM job is "unknown")."""
    parts, done = parts_of(plan), done_parts(target)
    by_slurm = bool(plan.get("jobs"))
    records = target.read_many([task_key(i) for i in range(plan["tasks"])])
    rows = []
    for i in range(plan["tasks"]):
        mine = task_parts(parts, plan["tasks"], i)
        record = records[i] or {}
        finished = sum(p.index in done for p in mine)
        state, why = record.get("state", "not started"), record.get("error")
        if finished == len(mine):
            state, why = "done", None
        elif by_slurm and queue is None:
            state, why = "unknown", "squeue gave no answer"
        elif i in (queue or {}):
            state, why = queue[i].lower(), None
        elif state == "running":
            silent = time.time() - record.get("updated", 0)
            if by_slurm or silent > 3 * HEARTBEAT_S:
                state, why = "failed", f"stopped without a word (no heartbeat for {silent:.0f} s): killed?"  # fmt: skip
        elif state == "done":  # its parts' manifests are gone
            state, why = "failed", "parts missing after it ended"
        elif state == "not started" and by_slurm:
            state, why = "failed", "no record: it never started (see its log)"
        rows.append({"task": i, "state": state, "why": why, "parts": len(mine),
                     "done": finished, "record": record})  # fmt: skip
    return rows


def status(out: str) -> int:
    target = Target(out)
    plan = _plan(target)
    try:
        queue: dict[int, str] | None = queued(plan)
    except SlurmUnreachable as e:
        queue, unreachable = None, str(e)
    rows = task_states(target, plan, queue)
    s = plan["settings"]
    jobs = ", ".join(j["id"] for j in plan.get("jobs", [])) or "none (started by hand)"
    print(f"prep job {target.out}: {plan['tasks']} tasks, {len(parts_of(plan))} parts of "
          f"{s['part_size']:,} bytes, seq_len {s['seq_len']}; SLURM jobs: {jobs}")  # fmt: skip
    for row in rows:
        rec = row["record"]
        written = f" | {describe(rec['written'])}" if rec.get("written") else ""
        host = f" | {rec['host']}" if rec.get("host") else ""
        why = f" ({row['why']})" if row["why"] else ""
        print(f"task {row['task']}: {row['state']}{why} | parts {row['done']}/{row['parts']}{written}{host}")  # fmt: skip
    n_done, n_parts = len(done_parts(target)), len(parts_of(plan))
    summary = target.read_json(SUMMARY) if target.exists(META_NAME) else None
    if summary is not None:
        print(f"merged: {describe(summary)}; wall {summary.get('wall_seconds', 0):.1f} s "
              f"= {summary['text_bytes'] / 1e6 / max(summary.get('wall_seconds', 0), 1e-9):.2f} MB/s; "
              f"merge {summary['merge_seconds']:.2f} s")  # fmt: skip
    elif queue is None and any(r["state"] == "unknown" for r in rows):
        print(f"parts written {n_done}/{n_parts}; {unreachable}: cannot tell which tasks still "
              "run; run status again when squeue answers, before any resume")  # fmt: skip
    else:
        missing = [r["task"] for r in rows if r["state"] in ("failed", "cancelled", "not started")]
        advice = f"; `pretrain prep resume {target.out}` reruns task(s) {missing}" if missing else ""  # fmt: skip
        print(f"parts written {n_done}/{n_parts}; not merged yet{advice}")
    return 0


def resume(out: str) -> int:
    target = Target(out)
    plan = _plan(target)
    if target.exists(META_NAME):
        print(f"{target.out}: complete (meta.json is there); nothing to resume")
        return 0
    try:
        queue = queued(plan)
    except SlurmUnreachable as e:
        raise PrepError(f"{e}: cannot tell which tasks of {target.out} still run, so none is "
                        "resubmitted; try again when squeue answers") from None  # fmt: skip
    rows = task_states(target, plan, queue)
    active = [r["task"] for r in rows if r["state"] in ("pending", "running", "configuring", "completing")]  # fmt: skip
    missing = [r["task"] for r in rows if r["state"] != "done" and r["task"] not in active]
    if not missing:
        if active:
            print(f"task(s) {active} still queued or running; nothing resubmitted")
        else:
            merge(target)
        return 0
    if plan.get("slurm"):
        submit(target, plan, missing)
        return 0
    for i in missing:  # started by hand: run them here
        run_task(target.out, i)
    return 0


def _plan(target: Target) -> dict[str, Any]:
    plan = target.read_json(PLAN)
    if plan is None:
        raise PrepError(f"{target.out}: no {PLAN}; not an array prep job (prep shards --tasks)")
    return plan
