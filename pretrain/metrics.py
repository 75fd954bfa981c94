"""Throughput, MFU and memory, and the sinks metrics go to: console, JSONL, wandb.

Only rank 0 writes. `metrics.jsonl` gets one JSON object per line: training lines carry
`step` and `loss`, validation lines `step` and `val_loss`, events an `event` name. Floats
are written with Python's shortest round-trip repr, so the file holds the exact loss.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from pretrain.progress import fmt_duration

log = logging.getLogger("pretrain")

# Dense peak FLOP/s per GPU for the dtypes we train in (vendor datasheets, no sparsity).
GPU_PEAK_FLOPS = {
    ("H200", "bf16"): 989e12,
    ("H100", "bf16"): 989e12,
    ("A100", "bf16"): 312e12,
    ("H200", "fp32"): 67e12,
    ("H100", "fp32"): 67e12,
    ("A100", "fp32"): 19.5e12,
}


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0
) -> float:
    """This machine's achieved FLOP/s on square n x n matmuls: the MFU denominator on CPU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    _sync(device)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s, how it was obtained) for MFU: a datasheet figure on known GPUs, else measured.

    A measurement is kept per machine (CPU model, device, precision, threads) in
    `$PRETRAIN_CACHE/peak_flops.json` (default ~/.cache/pretrain) as the best seen so far:
    each start measures briefly and takes the higher of the two, so a measurement made on a
    busy machine does not stick, MFU is comparable between runs, and starting is quick.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (gpu, prec), flops in GPU_PEAK_FLOPS.items():
            if gpu in name and prec == precision:
                return flops, f"{gpu} datasheet"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 512 if dtype == torch.bfloat16 and device.type == "cpu" else 1024  # CPU bf16 crawls
    measured = measure_matmul_flops(device, dtype, n=n, seconds=0.25)
    key = f"{_machine()}|{device.type}|{precision}|{torch.get_num_threads()} threads"
    path = Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain"))
    path = path / "peak_flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    best = max(measured, known.get(key, 0.0))
    if best > known.get(key, 0.0):
        known[key] = best
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, path)
        except OSError:  # a read-only home: measure every time
            pass
    return best, "measured matmul peak"


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb(device: torch.device) -> float:
    """Peak memory: allocated GPU memory, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MetricsSink:
    """Console + JSONL + wandb. A no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, config_dict: dict) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.jsonl = (
            _open_append(run_dir / "metrics.jsonl") if enabled and cfg.logging.jsonl else None
        )
        self.wandb = None
        if enabled and cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            import wandb  # heavy; only when asked for

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.run.name,
                dir=str(run_dir),
                mode=cfg.logging.wandb_mode,
                config=config_dict,
                resume="allow",
                id=_wandb_id(run_dir, cfg.run.name),
            )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:  # wall-clock time on every line: goodput, recovery times
            self.jsonl.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
            self.jsonl.flush()
        if self.wandb is not None and "step" in record:
            fields = {
                k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"
            }
            self.wandb.log(fields, step=record["step"])

    def console(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def _open_append(path: Path):
    """Append to a JSONL file, ending first any line a killed process left unfinished."""
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
    return open(path, "a")  # held open for the run; MetricsSink.close() closes it


def _wandb_id(run_dir: Path, name: str) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb_id"
    if not path.exists():
        import uuid

        path.write_text(f"{name}-{uuid.uuid4().hex[:8]}")
    return path.read_text().strip()


def read_metrics(run_dir: Path) -> list[dict]:
    """Every complete record of a run's metrics.jsonl (a line cut short by a kill is skipped)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    """Every complete record of a JSONL file (a line cut short by a kill is skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def train_line(r: dict, max_steps: int) -> str:
    return (
        f"step {r['step']:>6}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
        f"gnorm {r['grad_norm']:.3f} | {r['tokens_per_s'] / 1e3:.1f}k tok/s | "
        f"mfu {100 * r['mfu']:.1f}% | mem {r['mem_gb']:.2f}GB | eta {fmt_duration(r['eta_s'])}"
    )
