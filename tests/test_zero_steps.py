"""The ZeRO strategy's steps, on one CPU rank (DeepSpeed in a process of its own,
tests/helpers/zero_steps.py): a micro-batch's backward reads nothing back to the host, and
a non-finite loss under ZeRO-3 skips the step, as every strategy does, instead of needing
a check of its own on every micro-batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.helpers.runs import REPO

TINY = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.max_seq_len=64", "data.seq_len=16", "parallel.device=cpu",
        "parallel.strategy=zero", "train.global_batch_size=4", "train.micro_batch_size=2"]  # fmt: skip


def test_zero3_micro_batches_read_nothing_and_a_nan_step_is_skipped(tmp_path):
    """In fp32, where DeepSpeed has no loss scaler to find the overflow."""
    out = tmp_path / "steps.json"
    overrides = [*TINY, "parallel.zero_stage=3", "parallel.mixed_precision=fp32"]
    subprocess.run([sys.executable, REPO / "tests/helpers/zero_steps.py", out, *overrides],
                   cwd=REPO, check=True, timeout=600)  # fmt: skip
    steps = json.loads(out.read_text())
    # No host read in any micro-batch's backward (each was a wait on the GPU: the loss
    # check's .item() and, on several ranks, its all-reduce's).
    assert [s["backward_reads"] for s in steps] == [[0, 0]] * 3
    # The step reads the norm once, inside DeepSpeed (to skip a non-finite step); the norm
    # it hands back stays on the device for the trainer's batched read.
    assert [sum(s["step_reads"].values()) for s in steps] == [1, 1, 1], steps
    ok, nan, after = steps
    assert ok["changed"] == nan["params"] and after["changed"] == nan["params"]
    assert nan["changed"] == 0 and math.isinf(nan["grad_norm"])  # skipped: no weight moved
    assert math.isfinite(after["grad_norm"])  # and the next step is clean
