"""MFU's denominator, and the rule that an MFU is reported only when it can be true.

An MFU is only as true as its peak. Known GPUs have a datasheet figure (`pretrain.hardware`);
a CPU, or a GPU the table does not know, is measured at start-up. A CPU measured while other
processes share its cores comes out low, and `make demo` once printed `mfu 150%`-`188%` for
most steps from a 61 GFLOP/s peak timed on a busy machine and cached. So here:

- a CPU measurement is the best of many single products over several matrix sizes, within a
  time budget (about a second): a product another process interrupted loses to one it did
  not, and a many-core CPU reaches its rate only on large matrices;
- the best figure seen is cached in `$PRETRAIN_CACHE/peak_flops.json` (default
  ~/.cache/pretrain) under a key of what decides it (CPU model, CPUs this process may use,
  torch threads, torch version, dtype; or GPU name), so a figure from another machine, thread
  count or torch build is not reused, and a start on a busy machine keeps the better figure;
- when a step runs faster than the peak, the peak was measured low: `Peak.mfu` measures
  again (CPU only, at most once every `REMEASURE_EVERY_S`) and keeps the higher figure;
- an MFU still above 1 is not a fact but a wrong peak (or FLOP count): `Peak.mfu` returns
  None, which the console prints as `mfu n/a`, metrics.jsonl holds as null and wandb skips.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import files, hardware

log = logging.getLogger("pretrain")

CPU_SIZES = (256, 512, 1024, 2048, 4096)  # square matmul sizes, tried smallest first
CPU_ALWAYS = 1024  # sizes up to this one are tried whatever the budget
CPU_BUDGET_S = 1.0  # a first measurement on this machine, and each re-measurement
CPU_RECHECK_S = 0.2  # at a start where the cache has a figure for this machine already
REMEASURE_EVERY_S = 600.0  # a CPU run whose steps beat the peak measures again this rarely


def measure_matmul_flops(
    dtype: torch.dtype = torch.float32, budget_s: float = CPU_BUDGET_S
) -> float:
    """This CPU's best FLOP/s on one square matmul, over `CPU_SIZES`, in about `budget_s`.

    Each size is timed product by product on the host (exact on a CPU: an op has finished
    when its call returns) and its fastest product kept, so a product slowed by another
    process does not count. Each size gets an equal share of the time left, and at least a
    warm-up and one timed product. Sizes up to `CPU_ALWAYS` are always tried: on a loaded
    machine every product waits for a time slice of each torch thread (40 ms each seen
    here), so small sizes run far below the peak and say nothing of a larger one. A larger
    size is tried while 2 of its products (8x the last size's each) fit in the time left.
    """
    deadline, best, last_s = time.perf_counter() + budget_s, 0.0, 0.0
    for i, n in enumerate(CPU_SIZES):
        left = deadline - time.perf_counter()
        if n > CPU_ALWAYS and 2 * 8 * last_s > left:
            break
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up: thread pool, packing buffers, first touch
        size_deadline = time.perf_counter() + left / (len(CPU_SIZES) - i)
        last_s = float("inf")
        while True:
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            done = time.perf_counter()
            last_s = min(last_s, done - t)
            if done >= size_deadline:
                break
        best = max(best, 2 * n**3 / last_s)
    return best


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


def gpu_peak_flops(name: str, kind: str, measure: Callable[[], float]) -> tuple[float, str]:
    """(FLOP/s, source) for the GPU named `name` at table precision `kind`: its datasheet
    figure, or, for a GPU the table does not know, `measure()`, kept per GPU name as the
    best seen."""
    card = hardware.from_device_name(name)
    figure = card.peak(kind) if card is not None else None
    if figure is not None:
        return figure, f"{card.name} datasheet, dense {kind}"
    best = best_seen(f"{name}|cuda|{kind}|torch {torch.__version__}", measure())
    return best, f"measured {kind} matmul peak ({name!r} is not in pretrain/hardware.py)"


@dataclass
class Peak:
    """One rank's peak FLOP/s, where it came from, and how to measure it again (CPU only).

    Plain data, so rank 0 can measure it and broadcast it to the others. A GPU is not
    measured again mid-run: its measurement is timed on the device (another process cannot
    stretch it), and three 8192^2 matrices may not fit beside a model.
    """

    flops: float
    source: str
    key: str | None = None  # the cache key of a CPU measurement; None: not measured again
    dtype: str = "float32"  # the measured matmuls' dtype
    remeasured_at: float | None = None  # time.monotonic() of the last re-measurement
    warned: bool = False  # the MFU-not-reported warning was given

    @classmethod
    def of(cls, device: torch.device, precision: str) -> Peak:
        """The peak of `device` for training at `precision` ("fp32" | "bf16")."""
        if device.type == "cuda":
            kind = gpu_precision(precision)
            dtype = torch.bfloat16 if kind == "bf16" else torch.float32
            name = torch.cuda.get_device_name(device)
            return cls(*gpu_peak_flops(name, kind, lambda: measure_gpu_matmul_flops(device, dtype)))
        dtype = "bfloat16" if precision == "bf16" else "float32"
        key = cpu_key(getattr(torch, dtype))
        # A machine seen before gets a short look only: the cached figure is its best so
        # far, and a step that beats it has it measured again at full length.
        budget = CPU_RECHECK_S if key in _read_cache() else CPU_BUDGET_S
        measured = measure_matmul_flops(getattr(torch, dtype), budget)
        return cls(best_seen(key, measured), "measured matmul peak", key, dtype)

    def mfu(self, achieved: float, remeasure: bool = True) -> float | None:
        """`achieved` FLOP/s (one rank's) over the peak; None where that would exceed 1.

        A step faster than a measured peak means the peak was measured low: with
        `remeasure` (the rank that logs), it is measured again, at most once every
        `REMEASURE_EVERY_S`, and the best figure kept (here and in the cache).
        """
        now = time.monotonic()
        if (
            achieved > self.flops
            and remeasure
            and self.key is not None
            and (self.remeasured_at is None or now - self.remeasured_at >= REMEASURE_EVERY_S)
        ):
            before = self.flops
            self.flops = max(
                before, best_seen(self.key, measure_matmul_flops(getattr(torch, self.dtype)))
            )
            self.remeasured_at = time.monotonic()
            log.info(
                "a step ran at %s per rank, above the measured peak %s: measured again in %.1f s, "
                "peak now %s",
                flops_text(achieved), flops_text(before), self.remeasured_at - now, flops_text(self.flops),
            )  # fmt: skip
        if achieved <= self.flops:
            return achieved / self.flops
        if remeasure and not self.warned:
            self.warned = True
            log.warning(
                "MFU not reported (mfu n/a, null in metrics.jsonl): steps run at %s per rank, "
                "above the peak %s (%s), which must then be low (measured while the machine "
                "was busy?)%s",
                flops_text(achieved), flops_text(self.flops), self.source,
                f"; it is measured again at most every {REMEASURE_EVERY_S:.0f} s"
                if self.key else "",
            )  # fmt: skip
        return None


def flops_text(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def cpu_key(dtype: torch.dtype) -> str:
    """What decides a CPU's matmul rate: the model, the CPUs this process may run on,
    torch's threads, its build (oneDNN / MKL kernels change between versions) and dtype."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count()
    threads = torch.get_num_threads()
    return f"{_cpu_model()}|{cpus} cpus|{threads} threads|torch {torch.__version__}|{dtype}"


def best_seen(key: str, measured: float) -> float:
    """The higher of `measured` and the figure cached under `key`, which it then becomes."""
    known = _read_cache()
    best = max(measured, known.get(key, 0.0))
    if best > known.get(key, 0.0):
        known[key] = best
        with contextlib.suppress(OSError):  # a read-only home: measure every time
            files.write_json(_cache_path(), known, durable=False)  # a cache: no fsync
    return best


def _cache_path() -> Path:
    root = Path(os.environ.get("PRETRAIN_CACHE", Path.home() / ".cache" / "pretrain"))
    return root / "peak_flops.json"


def _read_cache() -> dict[str, float]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
