"""`Evaluator`: the configured tasks, prepared once per process, scored on demand by the
trainer (every `eval.every` steps, at checkpoints) or by `pretrain eval`.

Preparation (read on rank 0, prompts, tokens, the global batch plan) happens at start-up,
not at every evaluation. An evaluation is forwards only, one all-reduce of per-request
numbers, and rank 0's arithmetic. The aggregate `core` is the mean over tasks of the
centred score (acc - chance) / (1 - chance), as nanochat's CORE metric: 0 is chance, 1 is
perfect, whatever the number of choices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pretrain.config.schema import EvalConfig
from pretrain.evals.scoring import Encoded, Forward, batches, encode, merge, score, task_metrics
from pretrain.evals.tasks import Request, Task, read_tasks

if TYPE_CHECKING:  # importing pretrain.parallel costs 0.8 s: the strategies
    from pretrain.parallel.dims import ParallelDims


def padded(forward: Forward, multiple: int) -> Forward:
    """`forward` on batches right-padded to a length that `multiple` divides (unscored
    positions, target -1): sequence parallelism splits each sequence evenly over the tp
    ranks. Causal attention: no earlier position sees the padding."""

    def run(inputs, targets, planned):
        import torch.nn.functional as F

        pad = -inputs.shape[1] % multiple
        if pad:
            inputs, targets = F.pad(inputs, (0, pad), value=0), F.pad(targets, (0, pad), value=-1)
        return forward(inputs, targets, planned)

    return run


class Evaluator:
    def __init__(
        self,
        cfg: EvalConfig,
        tokenizer,
        max_len: int,
        ranks=None,
        device="cpu",
        dims: ParallelDims | None = None,
    ) -> None:
        """`dims`: the run's parallel degrees. The tp consecutive ranks of a tensor-parallel
        group run each forward together: they score the same batches, and only the first
        of them counts its results. None: every rank scores batches of its own."""
        self.cfg, self.ranks, self.device = cfg, ranks, device
        self.rank = ranks.rank if ranks is not None else 0
        self.world = ranks.world_size if ranks is not None else 1
        self.dims = dims
        self.tasks: list[Task] = read_tasks(cfg.tasks, ranks)
        self.requests: list[list[Request]] = [t.requests() for t in self.tasks]
        self.encoded: list[Encoded] = []
        self.spans: list[tuple[int, int]] = []  # each task's requests in `encoded`
        for task, requests in zip(self.tasks, self.requests, strict=True):
            start = len(self.encoded)
            self.encoded += encode(tokenizer, task, requests, max_len)
            self.spans.append((start, len(self.encoded)))
        self.plan = batches(self.encoded, cfg.batch_size)
        self.pad_id = tokenizer.eos_id

    @property
    def sequences(self) -> int:
        return len(self.encoded)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) - 1 for e in self.encoded)

    def run(self, forward: Forward, beat: Callable[[], None] = lambda: None, samples: bool = False):
        """Score every task; on rank 0 the report (None elsewhere):
        {"core", "tasks": {name: {acc[, acc_norm], chance, centered, n, metric}}, "eval_s"}
        and with `samples`, each task's per-request [loglik, greedy] in request order."""
        start = time.perf_counter()
        tp = self.dims.tp if self.dims is not None else 1
        dp_rank, dp = self.rank // tp, self.world // tp  # tp consecutive ranks per dp rank
        forward = forward if tp == 1 else padded(forward, tp)
        mine = score(forward, self.encoded, self.plan, dp_rank, dp, self.pad_id, self.device, beat)
        if self.rank % tp:  # the group's first rank holds the same results
            mine = {}
        results = merge(mine, len(self.encoded), self.world, self.device)
        if self.rank != 0:
            return None
        tasks = {}
        for task, requests, (a, b) in zip(self.tasks, self.requests, self.spans, strict=True):
            m = task_metrics(task, requests, results[a:b])
            tasks[task.name] = {**m, "metric": task.metric}
            if samples:
                tasks[task.name]["samples"] = [
                    {"example": r.example, "loglik": ll, "greedy": g}
                    for r, (ll, g) in zip(requests, results[a:b], strict=True)
                ]
        core = sum(t["centered"] for t in tasks.values()) / len(tasks)
        return {"core": core, "tasks": tasks, "eval_s": time.perf_counter() - start}
