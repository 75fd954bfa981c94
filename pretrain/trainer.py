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
import torch.nn.functional as F

from pretrain import runtime
from pretrain.checkpoint import Checkpointer
from pretrain.config import Config, to_dict, to_yaml
from pretrain.data import TrainBatches, ValBatches
from pretrain.data_check import check_tokenizer
from pretrain.metrics import MetricsSink, memory_gb, peak_flops, read_metrics, train_line
from pretrain.mirror import CheckpointMirror
from pretrain.model import count_params, flops_per_token
from pretrain.optim import lr_at, set_lr
from pretrain.parallel import build_strategy
from pretrain.resilience import (
    Faults,
    Preemption,
    TrainingStopped,
    Watchdog,
    restart_count,
)

log = logging.getLogger("pretrain")


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.strategy = build_strategy(cfg)
        self.strategy.accum_steps  # noqa: B018 - checks the batch sizes against the ranks now
        self.run_dir = runtime.start(cfg, rank=self.strategy.rank)
        # Data first: anything wrong with it is reported before a model is built.
        self.tokenizer = check_tokenizer(cfg)
        self.train_data = TrainBatches(cfg, self.run_dir)
        self.val_data = ValBatches(cfg, self.run_dir)
        self.strategy.setup()
        self.device = self.strategy.device
        c = cfg.checkpoint
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            c.keep_last,
            self.strategy.rank,
            self.strategy.barrier,
            CheckpointMirror(c.remote, c.keep_last) if c.remote else None,
        )
        self.sink = MetricsSink(
            self.run_dir, cfg, enabled=self.strategy.rank == 0, config_dict=to_dict(cfg)
        )
        self.step = 0
        self.tokens_seen = 0
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops, self.peak_source = peak_flops(self.device, cfg.parallel.mixed_precision)
        f = cfg.fault
        self.bad_steps = 0  # non-finite steps in a row
        self.preempted = False
        self.faults = Faults.from_env(self.strategy.rank)
        self.preemption = Preemption(f.preempt_signals)
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
        self.checkpointer.fetch()  # a newer checkpoint in checkpoint.remote, if any
        path = self.checkpointer.latest()
        if path is None:
            return False
        if self.strategy.rank == 0:  # e.g. one fetched onto a fresh node: same experiment?
            runtime.check_same_experiment(self.cfg, path / "config.yaml")
        state = self.checkpointer.load(path, self.strategy.load)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_data.load_state_dict(state["data"])
        last = _last_logged_step(self.run_dir)
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
            {"config.yaml": to_yaml(self.cfg)},
        )
        seconds = time.perf_counter() - start  # with async_save, only the blocking part
        self.sink.write(
            {"event": "checkpoint", "step": self.step, "checkpoint": path.name, "save_s": seconds}
        )
        return path

    def _write_model(self, folder: Path):
        pending = self.strategy.save(folder)
        self.faults.maybe_slow_save(self.step)
        return pending

    # ------------------------------------------------------------ steps
    def train_step(self) -> dict:
        s, cfg = self.strategy, self.cfg
        start = time.perf_counter()
        self.faults.maybe_hang(self.step + 1)
        lr = lr_at(self.step, cfg.optim.lr, cfg.schedule, cfg.train.max_steps)
        set_lr(s.optimizer, lr)
        accum = s.accum_steps
        loss_sum = torch.zeros((), device=self.device)
        data_s = 0.0
        for i in range(accum):
            t0 = time.perf_counter()
            tokens = self.train_data.next().to(self.device, non_blocking=True)  # (B, T + 1)
            data_s += time.perf_counter() - t0
            loss = self.faults.loss(self.step + 1, self.loss(tokens))
            s.backward(loss / accum, last=i == accum - 1)
            loss_sum += loss.detach()
        grad_norm = s.step(cfg.optim.grad_clip)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        loss = s.reduce_mean(loss_sum / accum).item()
        elapsed = time.perf_counter() - start
        tokens_per_s = self.tokens_per_step / elapsed
        record = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * s.world_size),
            "mem_gb": memory_gb(self.device),
            "step_s": elapsed,
            "data_s": data_s,
        }
        self._check_finite(record)
        return record

    def _check_finite(self, record: dict) -> None:
        """A non-finite loss or gradient norm means the update was skipped (every strategy
        skips it; every rank sees the same reduced values). Too many in a row stop the run."""
        if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
            self.bad_steps = 0
            return
        self.bad_steps += 1
        record["skipped"] = True
        log.warning(
            "step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row)",
            self.step,
            record["loss"],
            record["grad_norm"],
            self.bad_steps,
        )
        limit = self.cfg.fault.max_bad_steps
        if self.bad_steps > limit:
            self.sink.write(record)
            last = self.checkpointer.latest()
            raise TrainingStopped(
                f"{self.bad_steps} non-finite steps in a row at step {self.step} "
                f"(fault.max_bad_steps={limit}); the last good checkpoint is "
                f"{last.name if last else 'none'}; lower optim.lr or check the data, then rerun"
            )

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        logits = self.strategy.forward(inputs)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    @torch.no_grad()
    def evaluate(self) -> float:
        model = self.strategy.model
        model.eval()
        total, n = torch.zeros((), device=self.device), 0
        # eval_batches counts micro-batches over all ranks: the same samples at any world size.
        per_rank = max(1, self.cfg.train.eval_batches // self.strategy.world_size)
        for tokens in self.val_data.batches(per_rank):
            total += self.loss(tokens.to(self.device))
            n += 1
            if self.watchdog is not None:
                self.watchdog.beat()
        model.train()
        return self.strategy.reduce_mean(total / max(n, 1)).item()

    # ------------------------------------------------------------ the job
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.resume()
        self.sink.write({"event": "start", "step": self.step, "restart": restart_count()})
        self._announce()
        f = cfg.fault
        self.watchdog = Watchdog(
            f.watchdog_s,
            self.run_dir / "stacks",
            self.strategy.rank,
            self.preemption,
            f.preempt_grace_s,
            f.requeue_exit_code,
        )
        if self.step >= t.max_steps:
            log.info("run already complete at step %d (train.max_steps=%d)", self.step, t.max_steps)
            return {}
        record: dict = {}
        mean_step_s = None
        while self.step < t.max_steps:
            record = self.train_step()
            self.watchdog.beat()
            self.checkpointer.commit_if_written(self.strategy.any_rank)
            mean_step_s = (
                record["step_s"]
                if mean_step_s is None
                else 0.9 * mean_step_s + 0.1 * record["step_s"]
            )
            record["eta_s"] = mean_step_s * (t.max_steps - self.step)
            self.sink.write(record)
            if self.step % t.log_every == 0 or self.step in (1, t.max_steps):
                self.sink.console(train_line(record, t.max_steps))
            if self.step % t.eval_every == 0 or self.step == t.max_steps:
                start = time.perf_counter()
                val = self.evaluate()
                record["val_loss"] = val
                self.sink.write(
                    {"step": self.step, "val_loss": val, "eval_s": time.perf_counter() - start}
                )
                self.sink.console(f"step {self.step:>6}/{t.max_steps} | val_loss {val:.4f}")
            every = cfg.checkpoint.every
            if self.strategy.any_rank(self.preemption.requested):
                self._save_for_preemption()
                return record
            if (every and self.step % every == 0) or self.step == t.max_steps:
                self.save()
                self.watchdog.beat()
        self.checkpointer.wait()  # commit a background save still in flight
        return record

    def _save_for_preemption(self) -> None:
        p = self.preemption
        why = f"{p.signal_name} on this rank" if p.requested else "a signal on another rank"
        log.warning("preempted (%s): saving step %d, then exiting to be requeued", why, self.step)
        self.save()
        self.checkpointer.wait()
        self.sink.write({"event": "preempted", "step": self.step, "restart": restart_count()})
        self.preempted = True

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.preemption.restore()
        if self.checkpointer.mirror is not None:
            self.checkpointer.mirror.wait()  # finish the last upload
        self.sink.close()
        # streaming datasets hold shared memory until they are collected: free it now, not
        # at interpreter shutdown, when the multiprocessing resource tracker complains.
        del self.train_data, self.val_data
        gc.collect()
        self.strategy.close()

    def _announce(self) -> None:
        cfg = self.cfg
        self.sink.console(
            f"run {cfg.run.name} in {self.run_dir} | {count_params(cfg.model) / 1e6:.2f}M params | "
            f"{self.flops_per_token / 1e6:.1f} MFLOP/token | peak {self.peak_flops / 1e9:.1f} GFLOP/s "
            f"({self.peak_source}) | {self.strategy.accum_steps} micro-batches/step x {self.strategy.world_size} ranks | "
            f"from step {self.step}"
        )


def _last_logged_step(run_dir: Path) -> int:
    return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0)
