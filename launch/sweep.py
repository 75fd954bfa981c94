"""`pretrain sweep`: the cartesian product of `--grid key=v1,v2` options as runs, each in
its own directory with its resolved config, run one after another here or as one SLURM
job array; `pretrain sweep-status` tabulates them.

    SWEEP_DIR/sweep.json        the base config, overrides, grid and each run's values
    SWEEP_DIR/NN_key-value.../  one run directory per grid point
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

from launch.spec import LaunchSpec, prepare, resolve, write_spec
from launch.status import run_status, table
from pretrain.errors import ConfigError
from pretrain.files import write_json
from pretrain.rundir import RunDir, SweepDir


def parse_grid(grid: list[str]) -> dict[str, list[str]]:
    """`key=v1,v2` items as {key: [v1, v2]}; commas inside [] or {} do not split."""
    out: dict[str, list[str]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,...")
        if key in out:
            raise ConfigError(f"--grid {key} is given twice")
        parts = [v.strip() for v in _split_top_level(values)]
        if not all(parts):
            raise ConfigError(f"--grid {item!r}: empty value")
        out[key] = parts
    return out


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def run_name(index: int, point: dict[str, str]) -> str:
    tail = "_".join(f"{key.split('.')[-1]}-{value}" for key, value in point.items())
    return f"{index:02d}_" + re.sub(r"[^\w.-]", "", tail)[:80]


def run_sweep(
    config: str,
    overrides: list[str],
    grid: list[str],
    out: str | None,
    slurm_opts: dict | None,
    args: argparse.Namespace,
    dry_run: bool = False,
) -> int:
    axes = parse_grid(grid)
    base, _ = resolve(config, overrides)
    sweep = SweepDir(Path(out or Path(base.run.dir).parent / f"{base.run.name}-sweep").resolve())
    sweep_dir = sweep.path
    points = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    runs = []
    for i, point in enumerate(points):  # every point is checked before anything starts
        name = run_name(i, point)
        extra = [f"{k}={v}" for k, v in point.items()]
        extra += [f"run.name={base.run.name}-{name}", f"run.dir={sweep.run(name).path}"]
        cfg, _ = resolve(config, [*overrides, *extra])
        runs.append((name, point, cfg))
    if slurm_opts is not None:
        from launch import slurm

        slurm_opts = {**slurm_opts, "requeue_code": base.fault.requeue_exit_code}
        run_dirs = [Path(cfg.run.dir) for _, _, cfg in runs]
        output = str(sweep.slurm_log())
        script = slurm.render(
            run_dirs, slurm_opts, f"{base.run.name}-sweep", str(Path.cwd()), output
        )
        if dry_run:
            print(script, end="")
            return 0
        slurm.check_cluster(slurm_opts, script)
    elif dry_run:
        for name, point, _ in runs:
            print(f"{sweep_dir / name}: {' '.join(f'{k}={v}' for k, v in point.items())}")
        return 0

    sweep.logs.mkdir(parents=True, exist_ok=True)
    specs = []
    for _, _, cfg in runs:
        spec = LaunchSpec(
            config=str(RunDir(cfg.run.dir).config),
            overrides=[],
            cwd=str(Path.cwd()),
            nproc_per_node=(slurm_opts or {}).get("nproc_per_node") or args.nproc_per_node or 1,
            nnodes=(slurm_opts or {}).get("nodes", 1),
            max_restarts=args.max_restarts,
            slurm=slurm_opts,
        )
        prepare(cfg, spec)
        specs.append(spec)
    write_json(sweep.spec, {
        "config": str(Path(config).resolve()),
        "overrides": overrides,
        "grid": axes,
        "runs": [{"name": name, "values": point} for name, point, _ in runs],
    }, indent=2)  # fmt: skip
    print(f"sweep of {len(runs)} runs in {sweep_dir}")

    if slurm_opts is not None:
        job = slurm.sbatch(script, sweep.script)
        for i, spec in enumerate(specs):
            spec.job_id = f"{job}_{i}"
            write_spec(Path(spec.config).parent, spec)
        print(f"submitted job array {job} (tasks 0-{len(runs) - 1})")
        print(f"  pretrain sweep-status {sweep_dir}")
        return 0

    failed = 0
    for (name, _, _), spec in zip(runs, specs, strict=True):
        print(f"--- {name}", flush=True)
        cmd = [sys.executable, "-m", "pretrain", "launch", spec.config]
        cmd += [f"--nproc-per-node={spec.nproc_per_node}", f"--max-restarts={spec.max_restarts}"]
        failed += subprocess.run(cmd).returncode != 0
    print(sweep_status(sweep_dir))
    return 1 if failed else 0


def sweep_status(sweep_dir: str | Path) -> str:
    folder = SweepDir(sweep_dir)
    if not folder.spec.is_file():
        raise ConfigError(f"{sweep_dir}: not a sweep folder (no sweep.json)")
    sweep = json.loads(folder.spec.read_text())
    rows = []
    for run in sweep["runs"]:
        status = run_status(folder.run(run["name"]).path)
        rows.append({"run": run["name"], **run["values"], **status.row()})
    return table(rows)
