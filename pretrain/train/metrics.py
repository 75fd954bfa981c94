"""Throughput, MFU and memory, and the sinks metrics go to: console, JSONL, wandb.

Only rank 0 writes. `metrics.jsonl` gets one JSON object per line: training lines carry
`step` and `loss`, validation lines `step` and `val_loss`, events an `event` name. Floats
are written with Python's shortest round-trip repr, so the file holds the exact loss.

Reading a number off a GPU makes the host wait until the device has done everything queued
before it, and the device then idles while the host queues the next kernels. So a step's
loss and gradient norm stay on the device as a `PendingStep`, and the trainer reads a batch
of them with one copy (`read_pending`) every `train.log_every` steps, or before an
evaluation or checkpoint; each step still gets its own line, with its own time (`StepClock`).
MFU's denominator comes from `pretrain.hardware`'s table, or is measured (`peak_flops`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import files, hardware
from pretrain.progress import fmt_duration
from pretrain.rundir import RunDir

log = logging.getLogger("pretrain")


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0
) -> float:
    """This machine's achieved FLOP/s on square n x n matmuls: the MFU denominator on CPU
    (timed on the host, which is exact there: a CPU op has finished when its call returns)."""
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


def measure_gpu_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10, trials: int = 3
) -> float:
    """A GPU's achieved FLOP/s on n x n matmuls, timed on the device with CUDA events.

    Large products reach the tensor cores' sustained rate; a small matmul timed by the host
    in a Python loop measures launch overhead, and a peak measured too low inflates MFU.
    The best of `trials` runs of `reps` back-to-back products, after a warm-up that lets
    clocks and cuBLAS's kernel choice settle. (8192^2 bf16: three 128 MiB matrices,
    about 0.1 s on an H100.)
    """
    with torch.cuda.device(device):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b, out=out)
        best = 0.0
        for _ in range(trials):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            best = max(best, 2 * n**3 * reps / (start.elapsed_time(end) / 1e3))
        del a, b, out
        torch.cuda.empty_cache()  # give the 3 matrices back before the model is built
    return best


def gpu_precision(precision: str) -> str:
    """The hardware table's column for a training precision on a GPU: fp32 matmuls run on
    TF32 tensor cores when PyTorch is allowed to (`torch.set_float32_matmul_precision`)."""
    if precision == "bf16":
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s, how it was obtained) for MFU: a datasheet figure on known GPUs, else measured.

    GPUs are looked up by their exact device name in `pretrain.hardware`. An unknown GPU
    (or a name the table cannot tell apart) is measured on large matmuls with CUDA events,
    and a CPU on square matmuls. A measurement is kept per machine (GPU name; or CPU model,
    device, precision, threads) in `$PRETRAIN_CACHE/peak_flops.json` (default
    ~/.cache/pretrain) as the best seen so far: each start measures briefly and takes the
    higher of the two, so a measurement made on a busy machine does not stick, MFU is
    comparable between runs, and starting is quick.
    """
    if device.type == "cuda":
        kind = gpu_precision(precision)
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        name = torch.cuda.get_device_name(device)
        return gpu_peak_flops(name, kind, lambda: measure_gpu_matmul_flops(device, dtype))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 512 if dtype == torch.bfloat16 and device.type == "cpu" else 1024  # CPU bf16 crawls
    measured = measure_matmul_flops(device, dtype, n=n, seconds=0.25)
    key = f"{_machine()}|{device.type}|{precision}|{torch.get_num_threads()} threads"
    return _best_seen(key, measured), "measured matmul peak"


def gpu_peak_flops(name: str, kind: str, measure: Callable[[], float]) -> tuple[float, str]:
    """(FLOP/s, source) for the GPU named `name` at table precision `kind`: its datasheet
    figure, or, for a GPU the table does not know, `measure()`, kept per GPU name as the
    best seen."""
    card = hardware.from_device_name(name)
    figure = card.peak(kind) if card is not None else None
    if figure is not None:
        return figure, f"{card.name} datasheet, dense {kind}"
    best = _best_seen(f"{name}|cuda|{kind}", measure())
    return best, f"measured {kind} matmul peak ({name!r} is not in pretrain/hardware.py)"


def _best_seen(key: str, measured: float) -> float:
    """The higher of `measured` and the figure cached under `key`, which it then becomes."""
    path = Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain"))
    path = path / "peak_flops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    best = max(measured, known.get(key, 0.0))
    if best > known.get(key, 0.0):
        known[key] = best
        with contextlib.suppress(OSError):  # a read-only home: measure every time
            files.write_json(path, known, durable=False)  # a cache: no fsync
    return best


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


class StepClock:
    """Each training step's wall time, taken without making the host wait for the device.

    On CPU an op has finished when its call returns, so the host clock is exact. On a GPU
    the host only queues work: CUDA events recorded at a step's start and end are stamped
    when the device reaches them, and are read after the next sync, when they have passed.
    A step's time is then the device's (including any wait for the host, e.g. for data).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> float | torch.cuda.Event:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def seconds(start: float | torch.cuda.Event, end: float | torch.cuda.Event) -> float:
        if isinstance(start, float):
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


@dataclass
class PendingStep:
    """A training step whose loss and gradient norm have not been read off the device."""

    step: int
    lr: float
    tokens: int
    data_s: float
    mem_gb: float
    time: float  # wall clock when the host had queued the step
    loss: torch.Tensor  # () mean over ranks
    grad_norm: torch.Tensor  # () global
    started: float | torch.cuda.Event
    ended: float | torch.cuda.Event


def read_pending(steps: list[PendingStep]) -> list[tuple[float, float, float]]:
    """(loss, gradient norm, seconds) of each step, copied to the host in one go: the one
    sync of the batch. Values are exact (float32 -> float64 -> Python float, as `.item()`)."""
    if not steps:
        return []
    device = steps[0].loss.device
    values = [t.detach().to(device, torch.float64) for s in steps for t in (s.loss, s.grad_norm)]
    flat = torch.stack(values).tolist()
    return [
        (flat[2 * i], flat[2 * i + 1], StepClock.seconds(s.started, s.ended))
        for i, s in enumerate(steps)
    ]


class MetricsSink:
    """Console + JSONL + wandb. A no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, config_dict: dict) -> None:
        self.enabled = enabled
        self.cfg = cfg
        run = RunDir(run_dir)
        self.jsonl = _open_append(run.metrics) if enabled and cfg.logging.jsonl else None
        self.wandb = None
        if enabled and cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            import wandb  # heavy; only when asked for

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.run.name,
                dir=str(run.wandb_dir),
                mode=cfg.logging.wandb_mode,
                config=config_dict,
                resume="allow",
                id=_wandb_id(run.wandb_id, cfg.run.name),
            )

    def write(self, record: dict, flush: bool = True) -> None:
        """Append `record`, stamped with wall-clock time (its own `time` if it has one: a
        step record read later than the step ran); `flush=False` leaves it buffered until
        `flush()` (a batch of step records)."""
        if not self.enabled:
            return
        if self.jsonl is not None:  # wall-clock time on every line: goodput, recovery times
            stamp = round(record.get("time", time.time()), 3)
            self.jsonl.write(json.dumps({**record, "time": stamp}) + "\n")
            if flush:
                self.jsonl.flush()
        if self.wandb is not None and "step" in record:
            fields = {
                k: v
                for k, v in record.items()
                if isinstance(v, (int, float)) and k not in ("step", "time")
            }
            self.wandb.log(fields, step=record["step"])

    def flush(self) -> None:
        if self.jsonl is not None:
            self.jsonl.flush()

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


def _wandb_id(path: Path, name: str) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    if not path.exists():
        import uuid

        path.write_text(f"{name}-{uuid.uuid4().hex[:8]}")
    return path.read_text().strip()


def read_metrics(run_dir: Path) -> list[dict]:
    """Every complete record of a run's metrics.jsonl (a line cut short by a kill is skipped)."""
    return read_jsonl(RunDir(run_dir).metrics)


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
        f"mfu {100 * r['mfu']:.1f}% | mem {r['mem_gb']:.2f}GB | eta {fmt_duration(r['eta_s'], compact=True)}"
    )
