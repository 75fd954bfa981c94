"""`pretrain status RUN_DIR`: what a run is doing, from its directory alone (and squeue
for SLURM jobs): state, step, last checkpoint, losses, restarts, and a mixture-of-experts run's routing
(the latest step's load imbalance, its worst layer, the expert bias range, the aux loss)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.spec import read_history, read_spec, require_run
from pretrain import files
from pretrain.checkpoint.folders import checkpoint_step
from pretrain.errors import REQUEUE_EXIT_CODE
from pretrain.evals.records import is_eval_record, task_scores
from pretrain.rundir import RunDir
from pretrain.train.metrics import read_metrics


@dataclass
class RunStatus:
    run_dir: Path
    name: str
    state: str  # new | queued | running | preempted | failed | finished
    step: int
    max_steps: int
    checkpoint: str | None
    loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    best_val_step: int | None
    core: float | None  # downstream tasks' aggregate at the last scored step (eval/core)
    tasks: dict[str, float]  # each task's score there
    tasks_step: int | None
    best_core: float | None
    best_core_step: int | None
    restarts: int  # starts of the training after the first (torchrun restarts, requeues, resumes)
    exit_code: int | None  # the last launcher's exit code, when it has exited
    job: str | None  # "ID (SLURM STATE)" for a submitted run
    moe: dict | None = None  # the latest MoE step's routing (`moe_status`); None: dense

    def row(self) -> dict:
        return {
            "state": self.state,
            "step": f"{self.step}/{self.max_steps}",
            "loss": _fmt(self.loss),
            "val_loss": _fmt(self.val_loss),
            "best_val": _fmt(self.best_val_loss),
            "core": _fmt(self.core),
            "restarts": str(self.restarts),
        }


def run_status(run_dir: str | Path) -> RunStatus:
    run = RunDir(require_run(run_dir))
    run_dir = run.path
    cfg = run.read_config()
    max_steps = int(cfg.get("train", {}).get("max_steps", 0))
    metrics = read_metrics(run_dir)
    losses = [r for r in metrics if "loss" in r]
    vals = [r for r in metrics if "val_loss" in r and "step" in r]
    scored = [r for r in metrics if is_eval_record(r)]
    best_core = max(scored, key=lambda r: r["eval/core"]) if scored else None
    starts = [r for r in metrics if r.get("event") == "start"]
    history = read_history(run_dir)
    exits = [h for h in history if h.get("event") == "exit"]
    spec = read_spec(run_dir)
    complete = run.complete_checkpoints()
    checkpoint = complete[0].name if complete else None
    last_saved = checkpoint_step(complete[0]) if complete else 0
    job_state = _slurm_state(spec.job_id) if spec and spec.job_id else None

    last_event = next((r.get("event") for r in reversed(metrics) if "event" in r), None)
    if any(files.owner(lock) for lock in run.locks()):
        state = "running"
    elif job_state in ("PENDING", "REQUEUED", "CONFIGURING", "REQUEUE_HOLD"):
        state = "queued"
    elif job_state in ("RUNNING", "COMPLETING"):
        state = "running"
    elif max_steps and last_saved >= max_steps:
        state = "finished"
    elif last_event == "preempted" or (exits and exits[-1].get("exit_code") == _requeue(cfg)):
        state = "preempted"
    elif not metrics and not exits:
        state = "new"
    else:
        state = "failed"
    best = min(vals, key=lambda r: r["val_loss"]) if vals else None
    return RunStatus(
        run_dir=run_dir,
        name=str(cfg.get("run", {}).get("name", run_dir.name)),
        state=state,
        step=max([last_saved] + [r["step"] for r in losses]),
        max_steps=max_steps,
        checkpoint=checkpoint,
        loss=losses[-1]["loss"] if losses else None,
        val_loss=vals[-1]["val_loss"] if vals else None,
        best_val_loss=best["val_loss"] if best else None,
        best_val_step=best["step"] if best else None,
        core=scored[-1]["eval/core"] if scored else None,
        tasks=task_scores(scored[-1]) if scored else {},
        tasks_step=scored[-1]["step"] if scored else None,
        best_core=best_core["eval/core"] if best_core else None,
        best_core_step=best_core["step"] if best_core else None,
        restarts=max(len(starts) - 1, 0),
        exit_code=exits[-1].get("exit_code") if exits else None,
        job=f"{spec.job_id} ({job_state or 'not in squeue'})" if spec and spec.job_id else None,
        moe=moe_status(losses),
    )


def moe_status(steps: list[dict]) -> dict | None:
    """The routing of the latest step record with MoE fields (metrics.py's `moe_fields`):
    its step, worst imbalance and the block that has it, bias range and mean aux loss
    (None where the record lacks them); None for a dense run."""
    last = next((r for r in reversed(steps) if "moe_imbalance" in r), None)
    if last is None:
        return None
    layers = last.get("moe_layers") or {}
    worst = max(layers, key=lambda i: layers[i].get("imbalance", 0), default=None)
    return {
        "step": last["step"],
        "imbalance": last["moe_imbalance"],
        "worst_layer": int(worst) if worst is not None else None,
        "bias_range": last.get("moe_bias_range"),
        "aux_loss": last.get("moe_aux_loss"),
    }


def moe_line(m: dict) -> str:
    """`pretrain status`'s MoE line: imbalance 1.214 (worst block 3) at step 300 | ..."""
    where = f" (worst block {m['worst_layer']})" if m["worst_layer"] is not None else ""
    text = f"imbalance {m['imbalance']:.3f}{where} at step {m['step']}"
    if m["bias_range"]:  # 0 without the balance bias
        text += f" | bias range {m['bias_range']:.4f}"
    if m["aux_loss"] is not None:
        text += f" | aux loss {m['aux_loss']:.4f}"
    return text


def format_status(s: RunStatus) -> str:
    lines = [
        ("run", f"{s.name} ({s.run_dir})"),
        ("state", s.state + (f" (last exit {s.exit_code})" if s.exit_code is not None else "")),
        ("step", f"{s.step} / {s.max_steps}"),
        ("checkpoint", s.checkpoint or "none"),
        ("loss", _fmt(s.loss)),
        ("val loss", _fmt(s.val_loss) + (
            f" (best {_fmt(s.best_val_loss)} at step {s.best_val_step})" if s.best_val_step else ""
        )),
        ("restarts", str(s.restarts)),
    ]  # fmt: skip
    if s.core is not None:
        scores = "".join(f" | {name} {value:.4f}" for name, value in s.tasks.items())
        best = f" (best {_fmt(s.best_core)} at step {s.best_core_step})"
        lines.insert(5, ("tasks", f"core {_fmt(s.core)} at step {s.tasks_step}{best}{scores}"))
    if s.moe is not None:
        lines.insert(-1, ("moe", moe_line(s.moe)))
    if s.job:
        lines.append(("slurm job", s.job))
    return "\n".join(f"{key:<11} {value}" for key, value in lines)


def table(rows: list[dict]) -> str:
    """Rows of equal keys as an aligned text table."""
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    out = ["  ".join(k.ljust(widths[k]) for k in keys)]
    out += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(line.rstrip() for line in out)


def _slurm_state(job_id: str) -> str | None:
    if not shutil.which("squeue"):
        return None
    r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    states = r.stdout.split()
    return states[0] if r.returncode == 0 and states else None


def _requeue(cfg: dict) -> int:
    return int(cfg.get("fault", {}).get("requeue_exit_code", REQUEUE_EXIT_CODE))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
