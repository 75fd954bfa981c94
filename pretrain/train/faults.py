"""Test fault injection: `PRETRAIN_FAULTS` (never set in real runs) makes a training process
produce a NaN loss, hang, fail, or pause mid-checkpoint at given steps, so tests can prove
the behaviour of `resilience` (preemption, watchdog, error exits, non-finite steps) with real
processes."""

from __future__ import annotations

import logging
import os
import time

from pretrain.train.resilience import restart_count

log = logging.getLogger("pretrain")


class FaultInjection:
    """Injected faults for tests, from `PRETRAIN_FAULTS`, e.g. `nan@5,6 hang@7:1 slowsave@10`.

    - `nan@S[,S...]`: the loss of step S is NaN on rank 0.
    - `hang@S:R`: rank R sleeps forever inside step S (first attempt only).
    - `raise@S:R`: rank R raises an error at the start of step S (first attempt only), while
      the other ranks go on into the step's collectives and wait for it there.
    - `slowsave@S`: the checkpoint of step S pauses 30 s once its model files are written,
      before the rest and the commit (first attempt only): a window to kill it mid-save.
    - `steptime@T`: every step takes at least T more seconds (a sleep; numerics unchanged),
      so that a test can signal or kill a job mid-run.
    """

    def __init__(self, spec: str | None, rank: int) -> None:
        self.nan_steps: set[int] = set()
        self.hang: tuple[int, int] | None = None
        self.fail: tuple[int, int] | None = None
        self.slow_save_step: int | None = None
        self.step_sleep = 0.0
        self.rank = rank
        for item in (spec or "").split():
            kind, _, where = item.partition("@")
            if kind == "nan":
                self.nan_steps |= {int(s) for s in where.split(",")}
            elif kind in ("hang", "raise"):
                step, _, r = where.partition(":")
                if kind == "hang":
                    self.hang = (int(step), int(r or 0))
                else:
                    self.fail = (int(step), int(r or 0))
            elif kind == "slowsave":
                self.slow_save_step = int(where)
            elif kind == "steptime":
                self.step_sleep = float(where)
            else:
                raise ValueError(f"PRETRAIN_FAULTS: unknown fault {item!r}")

    @classmethod
    def from_env(cls, rank: int) -> FaultInjection:
        return cls(os.environ.get("PRETRAIN_FAULTS"), rank)

    def poisoned(self, step: int) -> bool:
        """Whether step `step` (1-based, the one being computed) has a NaN loss here."""
        return step in self.nan_steps and self.rank == 0

    def maybe_hang(self, step: int) -> None:
        """The step-time sleep, and the hang or error injected at step `step`, if any."""
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.fail == (step, self.rank) and restart_count() == 0:
            raise RuntimeError(f"PRETRAIN_FAULTS: rank {self.rank} fails in step {step}")
        if self.hang == (step, self.rank) and restart_count() == 0:
            log.warning("PRETRAIN_FAULTS: rank %d hangs in step %d", self.rank, step)
            while True:
                time.sleep(3600)

    def maybe_slow_save(self, step: int) -> None:
        if self.slow_save_step == step and restart_count() == 0:
            log.warning("PRETRAIN_FAULTS: checkpoint %d pauses before its commit", step)
            time.sleep(30)
