"""Throughput, MFU and memory, and the sinks metrics go to: console, JSONL, wandb.

Only rank 0 writes. `metrics.jsonl` gets one JSON object per line: training lines carry
`step` and `loss`, validation lines `step` and `val_loss`, events an `event` name. Floats
are written with Python's shortest round-trip repr, so the file holds the exact loss.

Reading a number off a GPU makes the host wait until the device has done everything queued
before it, and the device then idles while the host queues the next kernels. So a step's
loss and gradient norm stay on the device as a `PendingStep`, and the trainer reads a batch
of them with one copy (`read_pending`) every `train.log_every` steps, or before an
evaluation or checkpoint; each step still gets its own line, with its own time (`StepClock`).
MFU's denominator, and when an MFU is reported at all, are `pretrain.train.peak`'s.

`pretrain status` reads metrics.jsonl through this module in a process that must start in a
fraction of a second, so torch is imported only inside the functions that touch tensors.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.progress import fmt_duration
from pretrain.rundir import RunDir

if TYPE_CHECKING:
    import torch


def memory_gb(device: torch.device) -> float:
    """Peak memory: allocated GPU memory, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


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
            import torch

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
    # (MoE layers, 4): imbalance, aux loss, z loss, bias range (`Strategy.moe_stats`).
    moe: torch.Tensor | None = None


MOE_STATS = ("imbalance", "aux_loss", "z_loss", "bias_range")


def read_pending(steps: list[PendingStep]) -> list[tuple[float, float, float, list | None]]:
    """(loss, gradient norm, seconds, MoE statistics per layer or None) of each step,
    copied to the host in one go: the one sync of the batch. Values are exact (float32 ->
    float64 -> Python float, as `.item()`)."""
    if not steps:
        return []
    import torch

    device = steps[0].loss.device
    values = []
    for s in steps:
        values += [s.loss.detach().reshape(1), s.grad_norm.detach().reshape(1)]
        if s.moe is not None:
            values.append(s.moe.detach().flatten())
    flat = torch.cat([v.to(device, torch.float64) for v in values]).tolist()
    out, at = [], 0
    for s in steps:
        moe = None
        if s.moe is not None:
            rows, cols = s.moe.shape
            moe = [flat[at + 2 + r * cols : at + 2 + (r + 1) * cols] for r in range(rows)]
        out.append((flat[at], flat[at + 1], StepClock.seconds(s.started, s.ended), moe))
        at += 2 + (s.moe.numel() if s.moe is not None else 0)
    return out


def moe_fields(stats: list[list[float]], layers: list[int]) -> dict:
    """A step record's MoE fields from its per-layer statistics: the worst imbalance and
    bias range, the mean aux and z losses over the MoE layers, and each layer's own (keyed
    by block index)."""
    rows = zip(layers, stats, strict=True)
    per_layer = {str(i): dict(zip(MOE_STATS, row, strict=True)) for i, row in rows}
    n = len(stats)
    return {
        "moe_imbalance": max(r[0] for r in stats),
        "moe_aux_loss": sum(r[1] for r in stats) / n,
        "moe_z_loss": sum(r[2] for r in stats) / n,
        "moe_bias_range": max(r[3] for r in stats),
        "moe_layers": per_layer,
    }


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
            self.wandb.log(wandb_fields(record), step=record["step"])

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


def wandb_fields(record: dict) -> dict:
    """What wandb gets of a record: its top-level numbers (but `step` and `time`), and each
    MoE layer's statistics as flat keys, `moe/layer3/imbalance` (wandb charts flat keys;
    metrics.jsonl keeps the nested `moe_layers`)."""
    fields = {
        k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")
    }
    for layer, stats in (record.get("moe_layers") or {}).items():
        for name, value in stats.items():
            if isinstance(value, (int, float)):
                fields[f"moe/layer{layer}/{name}"] = value
    return fields


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
        f"mfu {mfu_text(r['mfu'])} | mem {r['mem_gb']:.2f}GB | eta {fmt_duration(r['eta_s'], compact=True)}"
    )


def mfu_text(mfu: float | None) -> str:
    """An MFU for the console: `n/a` where none can be true (None, or above 100%: a peak
    measured too low, see `pretrain.train.peak`), never a figure above 100%."""
    return "n/a" if mfu is None or mfu > 1 else f"{100 * mfu:.1f}%"
