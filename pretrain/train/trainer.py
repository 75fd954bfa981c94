"""The training loop: step, accumulate, clip, schedule, evaluate, log, checkpoint, resume.

`Trainer(cfg).fit()` is the whole job. Each piece is a method so tests can drive it step by
step. The loop talks only to the parallel strategy's interface, never to a specific one.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path

import torch

from pretrain import rundir
from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.mirror import CheckpointMirror
from pretrain.config.load import to_dict, to_yaml
from pretrain.config.schema import Config
from pretrain.data.loader import TrainBatches, ValBatches, check_data
from pretrain.errors import ConfigError, TrainingStopped
from pretrain.model import count_params, flops_per_token
from pretrain.parallel import build_strategy
from pretrain.train import process
from pretrain.train.faults import FaultInjection
from pretrain.train.metrics import (
    MetricsSink,
    PendingStep,
    StepClock,
    memory_gb,
    moe_fields,
    read_metrics,
    read_pending,
    train_line,
)
from pretrain.train.optim import lr_at, set_lr
from pretrain.train.peak import Peak, flops_text
from pretrain.train.resilience import (
    Preemption,
    StepVote,
    Watchdog,
    bound_teardown,
    restart_count,
)

log = logging.getLogger("pretrain")


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.strategy = build_strategy(cfg)
        self.strategy.accum_steps  # noqa: B018 - checks the batch sizes against the ranks now
        self.run_dir = process.start(cfg)
        # Data first: anything wrong with it is reported before a model is built. Global
        # rank 0 checks the tokenizer and both splits in one round and tells every rank.
        self.tokenizer, data = check_data(cfg, self.run_dir)
        device, dims = self.strategy.device, self.strategy.dims
        self.train_data = TrainBatches(cfg, self.run_dir, device, data["train"], dims)
        self.val_data = ValBatches(cfg, self.run_dir, device, data["val"], dims)
        self.evaluator = self._evaluator()  # task files are data too: checked before the model
        self.evaluated: set[int] = set()  # steps whose task scores are already in metrics.jsonl
        self.strategy.setup()
        self.device = self.strategy.device
        c = cfg.checkpoint
        self.checkpointer = Checkpointer(  # on the strategy's process group, if any
            rundir.RunDir(self.run_dir).checkpoints,
            c.keep_last,
            mirror=CheckpointMirror(c.remote, c.keep_last, c.remote_min_mb_per_s, c.remote_threads)
            if c.remote
            else None,
        )
        self.sink = MetricsSink(
            self.run_dir, cfg, enabled=self.strategy.rank == 0, config_dict=to_dict(cfg)
        )
        self.step = 0
        self.tokens_seen = 0
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        # Rank 0 looks up or measures the peak (only its MFU is logged) and tells the rest:
        # 512 ranks each timing matmuls and rewriting one cache file in a shared home would
        # add work and contention to every start for a figure nobody reads.
        rank0 = self.strategy.rank == 0
        peak = Peak.of(self.device, cfg.parallel.mixed_precision) if rank0 else None
        self.peak: Peak = self.checkpointer.ranks.broadcast(peak)
        f = cfg.fault
        self.bad_steps = 0  # non-finite steps in a row
        self.pending: list[PendingStep] = []  # steps whose numbers are still on the device
        self.clock = StepClock(self.device)
        self.mean_step_s: float | None = None  # moving average, for the ETA
        self.sync_every_step = False  # True: read every step at once (bench/throughput.py)
        self.preempted = False
        self.injected = FaultInjection.from_env(self.strategy.rank)
        self.preemption = Preemption(f.preempt_signals, self.strategy.rank)
        self.failure: BaseException | None = None  # what ended `fit`, if it did not finish
        self.watchdog: Watchdog | None = None  # started once resumed (a fetch may be long)

    # ------------------------------------------------------------ state
    def train_state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": self.train_data.state_dict(),
        }

    def resume(self) -> bool:
        """Load the latest complete checkpoint in the run directory, if there is one."""
        if not self.cfg.checkpoint.resume:
            return False
        # Rank 0 picks (fetching a newer one from checkpoint.remote, if any); all load it.
        path = self.checkpointer.resume_point()
        if path is None:
            return False
        # e.g. one fetched onto a fresh node: same experiment? Rank 0 reads its config; every
        # rank gets the verdict, so all stop together instead of the others hanging in load.
        refused = None
        if self.strategy.rank == 0:
            try:
                rundir.check_same_experiment(self.cfg, path / rundir.RunDir.config.name)
            except ConfigError as e:
                refused = str(e)
        refused = self.checkpointer.ranks.broadcast(refused)
        if refused:
            raise ConfigError(refused)
        state = self.checkpointer.load(path, self.strategy.load)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_data.load_state_dict(state["data"])
        # Only rank 0 reads metrics (the others need not read the whole file on a shared FS)
        # and tells the rest which later steps' task scores it holds: the resumed run redoes
        # those steps bit for bit, so scoring them again would only write a duplicate.
        last, evaluated = _logged_steps(self.run_dir) if self.strategy.rank == 0 else (0, set())
        self.evaluated = {s for s in self.checkpointer.ranks.broadcast(evaluated) if s >= self.step}
        lost = max(last - self.step, 0)
        self.sink.write(
            {
                "event": "resume",
                "step": self.step,
                "checkpoint": path.name,
                "steps_lost": lost,
                "restart": restart_count(),
            }
        )
        log.info(
            "resumed from %s (step %d; %d logged steps after it are redone)", path, self.step, lost
        )
        return True

    def save(self) -> Path:
        start = time.perf_counter()
        path = self.checkpointer.save(
            self.step,
            self.train_state(),
            self._write_model,
            {rundir.RunDir.config.name: to_yaml(self.cfg)},
        )
        seconds = time.perf_counter() - start  # with async_save, only the blocking part
        self.sink.write(
            {"event": "checkpoint", "step": self.step, "checkpoint": path.name, "save_s": seconds}
        )
        return path

    def _write_model(self, folder: Path):
        pending = self.strategy.save(folder)
        self.injected.maybe_slow_save(self.step)
        return pending

    # ------------------------------------------------------------ steps
    def train_step(self) -> dict:
        """One optimizer step; returns its metrics record. Reading it is a host sync: `fit`
        queues steps (`_step`) and reads them in batches (`_read_steps`) instead."""
        self._step()
        records, stop = self._read_steps()
        if stop is not None:
            raise stop
        return records[-1]

    def _step(self) -> None:
        """One optimizer step, queued: its loss and gradient norm stay on the device."""
        s, cfg = self.strategy, self.cfg
        started = self.clock.mark()
        self.injected.maybe_hang(self.step + 1)
        lr = lr_at(self.step, cfg.optim.lr, cfg.schedule, cfg.train.max_steps)
        set_lr(s.optimizer, lr)
        data_s = 0.0

        def next_batch(_: int) -> torch.Tensor:
            nonlocal data_s
            t0 = time.perf_counter()
            tokens = self.train_data.next().to(self.device, non_blocking=True)  # (B, T + 1)
            data_s += time.perf_counter() - t0
            return tokens

        poison = self.injected.poisoned(self.step + 1)
        loss = s.forward_backward(next_batch, s.accum_steps, poison=poison)
        grad_norm = s.step(cfg.optim.grad_clip)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        loss = s.reduce(loss, over="dp")  # a scalar all-reduce, queued
        ended = self.clock.mark()
        self.pending.append(
            PendingStep(
                step=self.step,
                lr=lr,
                tokens=self.tokens_seen,
                data_s=data_s,
                mem_gb=memory_gb(self.device),
                time=time.time(),
                loss=loss,
                grad_norm=grad_norm,
                started=started,
                ended=ended,
                moe=s.moe_stats,
            )
        )

    def _read_steps(self) -> tuple[list[dict], TrainingStopped | None]:
        """The pending steps' records, read off the device in one sync, in step order; up
        to the step at which too many non-finite steps stop the run, and then that stop."""
        steps, self.pending = self.pending, []
        records, max_steps = [], self.cfg.train.max_steps
        for p, (loss, grad_norm, step_s, moe) in zip(steps, read_pending(steps), strict=True):
            tokens_per_s = self.tokens_per_step / step_s
            flops = self.flops_per_token * tokens_per_s
            record = {
                "step": p.step,
                "loss": loss,
                "lr": p.lr,
                "grad_norm": grad_norm,
                "tokens": p.tokens,
                "tokens_per_s": tokens_per_s,
                # None (null in metrics.jsonl) rather than above 1; rank 0 re-measures
                "mfu": self.peak.mfu(flops / self.strategy.world_size, self.strategy.rank == 0),
                "mem_gb": p.mem_gb,
                "step_s": step_s,
                "data_s": p.data_s,
            }
            if moe is not None:
                record.update(moe_fields(moe, self.cfg.model.moe_layers()))
            stop = self._check_finite(record)
            m = self.mean_step_s
            self.mean_step_s = step_s if m is None else 0.9 * m + 0.1 * step_s
            record["eta_s"] = self.mean_step_s * (max_steps - p.step)
            record["time"] = p.time
            records.append(record)
            if stop is not None:
                return records, stop
        return records, None

    def _check_finite(self, record: dict) -> TrainingStopped | None:
        """A non-finite loss or gradient norm means the update was skipped (every strategy
        skips it; every rank reads the same reduced values, so all count alike). Too many in
        a row stop the run: returns the error to raise once the record is written."""
        if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
            self.bad_steps = 0
            return None
        self.bad_steps += 1
        record["skipped"] = True
        log.warning(
            "step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row)",
            record["step"],
            record["loss"],
            record["grad_norm"],
            self.bad_steps,
        )
        limit = self.cfg.fault.max_bad_steps
        if self.bad_steps <= limit:
            return None
        last = self.checkpointer.latest()
        return TrainingStopped(
            f"{self.bad_steps} non-finite steps in a row at step {record['step']} "
            f"(fault.max_bad_steps={limit}); the last good checkpoint is "
            f"{last.name if last else 'none'}; lower optim.lr or check the data, then rerun"
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        model = self.strategy.model
        model.eval()
        total, n = torch.zeros((), device=self.device), 0
        # eval_batches counts micro-batches over all data ranks: the same at any layout.
        per_rank = max(1, self.cfg.train.eval_batches // self.strategy.dp_size)
        for tokens in self.val_data.batches(per_rank):
            total += self.strategy.loss(tokens.to(self.device))
            n += 1
            if self.watchdog is not None:
                self.watchdog.beat()
        model.train()
        return self.strategy.reduce(total / max(n, 1), over="dp").item()

    def _evaluator(self):
        """The downstream tasks' `Evaluator`, when training scores them (eval.every or
        eval.at_checkpoint with eval.tasks)."""
        if not self.cfg.eval.in_training:
            return None
        from pretrain.checkpoint.ranks import Ranks
        from pretrain.evals.evaluator import Evaluator

        max_len, s = self.cfg.model.max_seq_len, self.strategy
        return Evaluator(self.cfg.eval, self.tokenizer, max_len, Ranks.current(), s.device, s.dims)

    def _tasks_due(self, step: int, save: bool) -> bool:
        e = self.cfg.eval
        if self.evaluator is None or step in self.evaluated:
            return False
        return bool(e.every and (step % e.every == 0 or step == self.cfg.train.max_steps)) or (
            e.at_checkpoint and save
        )

    @torch.no_grad()
    def evaluate_tasks(self) -> dict | None:
        """Score the downstream tasks (every rank takes part); rank 0 logs and returns the
        report, the other ranks None."""
        from pretrain.evals.records import console_line, metrics_record

        model, chunk = self.strategy.model, self.cfg.parallel.loss_chunk_tokens
        model.eval()

        def forward(inputs: torch.Tensor, targets: torch.Tensor, planned: int) -> torch.Tensor:
            return self.strategy.forward(
                inputs, targets, loss_chunk_tokens=chunk, scores=True, planned_tokens=planned
            )

        beat = self.watchdog.beat if self.watchdog is not None else (lambda: None)
        report = self.evaluator.run(forward, beat)
        model.train()
        self.evaluated.add(self.step)
        if report is not None:
            self.sink.write(metrics_record(self.step, report))
            self.sink.console(console_line(self.step, self.cfg.train.max_steps, report))
        return report

    # ------------------------------------------------------------ the job
    def fit(self) -> dict:
        """`_fit`, noting an error that ends it, so that `close` aborts instead of draining."""
        try:
            return self._fit()
        except BaseException as e:
            self.failure = e
            raise

    def _fit(self) -> dict:
        """Resume, then train to train.max_steps with evaluations, logs and checkpoints on
        the way; returns the last step's record.

        The host reads numbers off the device only at sync points (every train.log_every
        steps, the first and last, evaluations, checkpoints, a preemption); in between,
        steps queue up and the device never waits for the host. Sync points depend only on
        the step, so every rank reads, counts non-finite steps and stops at the same step,
        and a checkpoint is only saved after its steps were checked. Preemption and the
        commit of a background save are agreed one step late by a `StepVote`.
        """
        cfg, t = self.cfg, self.cfg.train
        self.resume()
        self.sink.write({"event": "start", "step": self.step, "restart": restart_count()})
        self._announce()
        f = cfg.fault
        self.watchdog = Watchdog(
            f.watchdog_s,
            rundir.RunDir(self.run_dir).stacks,
            self.strategy.rank,
            self.preemption,
            f.preempt_grace_s,
            f.requeue_exit_code,
        )
        if self.step >= t.max_steps:
            log.info("run already complete at step %d (train.max_steps=%d)", self.step, t.max_steps)
            return {}
        # An attribute, not a local: the vote's buffer must outlive the process group
        # (StepVote), also when an error ends this loop.
        self.vote = vote = StepVote(self.device, self.strategy.world_size)
        every, record = cfg.checkpoint.every, {}
        if self.step and self._tasks_due(self.step, bool(every and self.step % every == 0)):
            self.evaluate_tasks()  # resumed from a preemption's save made before its scores
        while self.step < t.max_steps:
            self._step()
            self.watchdog.beat()
            step = self.step
            if self.sync_every_step:  # as before deferred syncs: agree at once, every step
                self.checkpointer.commit_if_written(self.strategy.any_rank)
                preempted = self.strategy.any_rank(self.preemption.requested)
            else:
                preempted = vote.collect()  # cast at the previous step
                self.checkpointer.commit_if_written(vote.any_write_running)
            if preempted:
                self.preemption.agreed()  # every rank saves at this boundary
            evaluate = step % t.eval_every == 0 or step == t.max_steps
            save = bool(every and step % every == 0) or step == t.max_steps
            log_step = step % t.log_every == 0 or step == 1
            if log_step or evaluate or save or preempted or self.sync_every_step:
                record = self._log_steps()
            if evaluate:
                start = time.perf_counter()
                with self.watchdog.busy():  # bounded by watchdog_s, not the vote's bound
                    val = self.evaluate()
                record["val_loss"] = val
                self.sink.write(
                    {"step": step, "val_loss": val, "eval_s": time.perf_counter() - start}
                )
                self.sink.console(f"step {step:>6}/{t.max_steps} | val_loss {val:.4f}")
            if self._tasks_due(step, save) and not preempted:  # a preemption saves at once
                with self.watchdog.busy():
                    self.evaluate_tasks()
            if preempted:
                self._save_for_preemption()
                return record
            if save:
                with self.watchdog.busy():  # a synchronous save may outlast the vote's bound
                    self.save()
                vote.write_started()
                self.watchdog.beat()
            if not self.sync_every_step:
                vote.cast(self.preemption.requested)
        vote.collect()  # the last step's vote, which every rank cast
        self.checkpointer.wait()  # commit a background save still in flight
        return record

    def _log_steps(self) -> dict:
        """Read the pending steps (one sync), write their records (console: log steps) and
        return the last; after the record of a step that stops the run, raise the stop."""
        t = self.cfg.train
        records, stop = self._read_steps()
        for r in records:
            self.sink.write(r, flush=False)
            if r["step"] % t.log_every == 0 or r["step"] in (1, t.max_steps):
                self.sink.console(train_line(r, t.max_steps))
        self.sink.flush()
        if stop is not None:
            raise stop
        return records[-1]

    def _save_for_preemption(self) -> None:
        p = self.preemption
        p.agreed()  # every rank saves now: a later signal (torchrun's stop) changes nothing
        why = f"{p.signal_name} on this rank" if p.requested else "a signal on another rank"
        log.warning("preempted (%s): saving step %d, then exiting to be requeued", why, self.step)
        self.save()
        self.checkpointer.wait()
        p.saved_step = self.step  # the grace may still run out while it uploads
        self.sink.write({"event": "preempted", "step": self.step, "restart": restart_count()})
        self.preempted = True

    def close(self, exiting: bool = False) -> None:
        """End the process's part in the run. After an error (`fit` noted it) the process
        groups are aborted first, so peers blocked in a collective with this rank learn at
        once (and their stop is no preemption); after training they are drained. The
        watchdog keeps watching until the last upload and the logs are done; then, in a
        process that is `exiting` (the CLI), a timer bounds the rest (`bound_teardown`), up
        to the process's very end. After an error no upload is waited for: a manifest-less
        upload is never read, and peers learn of the failure only once this process exits."""
        if self.failure is not None:
            self.strategy.abort(_one_line(self.failure))
        if self.watchdog is not None:
            self.watchdog.steps_ended()  # no vote bound while closing
            self.watchdog.beat()  # the last upload counts as progress, like a save
        self.preemption.restore()
        if self.checkpointer.mirror is not None and self.failure is None:
            beat = self.watchdog.beat if self.watchdog else lambda: None
            self.checkpointer.mirror.wait(beat)
        self.sink.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        if exiting and self.cfg.fault.watchdog_s:
            bound_teardown()
        # streaming datasets hold shared memory until they are collected: free it now, not
        # at interpreter shutdown, when the multiprocessing resource tracker complains.
        del self.train_data, self.val_data
        gc.collect()
        self.strategy.close()

    def _announce(self) -> None:
        cfg, s = self.cfg, self.strategy
        tp, ranks = s.dims.tp, f"{s.world_size} ranks"
        ranks = ranks if tp == 1 else f"{s.dp_size} data ranks x tp {tp}"
        self.sink.console(
            f"run {cfg.run.name} in {self.run_dir} | {count_params(cfg.model) / 1e6:.2f}M params | "
            f"{self.flops_per_token / 1e6:.1f} MFLOP/token | "
            f"peak {flops_text(self.peak.flops)} per rank ({self.peak.source}) | "
            f"{s.accum_steps} micro-batches/step x {ranks} | from step {self.step}"
        )


def _one_line(error: BaseException) -> str:
    """`error` as "Type: first line of its message", for the peers' failure notice."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _logged_steps(run_dir: Path) -> tuple[int, set[int]]:
    """(the last step with a training record, the steps with task scores) in metrics.jsonl."""
    from pretrain.evals.records import is_eval_record

    records = read_metrics(run_dir)
    last = max((r["step"] for r in records if "loss" in r), default=0)
    return last, {r["step"] for r in records if is_eval_record(r)}
