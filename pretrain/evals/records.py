"""Task scores in metrics.jsonl: the record the trainer writes and what the readers
(`pretrain status`, `sweep-status`, `plot`) take from it. No torch here: the light commands
import this.

A record: {"step", "eval/core", "eval/TASK" (the task's configured metric),
"eval/TASK/acc", "eval/TASK/acc_norm" (multiple choice), "eval/TASK/centered",
"eval_tasks_s"}. wandb gets the same keys, so its panels group under "eval".
"""

from __future__ import annotations


def metrics_record(step: int, report: dict) -> dict:
    """The flat metrics.jsonl / wandb record of a report: eval/core, eval/TASK (the task's
    configured metric) and eval/TASK/acc, acc_norm, centered."""
    record: dict = {"step": step, "eval/core": report["core"]}
    for name, m in report["tasks"].items():
        record[f"eval/{name}"] = m[m["metric"]]
        for key in ("acc", "acc_norm", "centered"):
            if key in m:
                record[f"eval/{name}/{key}"] = m[key]
    record["eval_tasks_s"] = report["eval_s"]
    return record


def console_line(step: int, max_steps: int, report: dict) -> str:
    scores = " | ".join(f"{n} {m[m['metric']]:.3f}" for n, m in report["tasks"].items())
    return f"step {step:>6}/{max_steps} | eval core {report['core']:.4f} | {scores}"


def task_scores(record: dict) -> dict[str, float]:
    """{task: score} of a metrics record, each by the metric its task reports."""
    out = {}
    for key, value in record.items():
        parts = key.split("/")
        if len(parts) == 2 and parts[0] == "eval" and parts[1] != "core":
            out[parts[1]] = value
    return out


def is_eval_record(record: dict) -> bool:
    return (
        isinstance(record, dict) and "eval/core" in record and isinstance(record.get("step"), int)
    )
