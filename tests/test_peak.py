"""MFU's peak on a CPU: measured within its budget, cached per machine, measured again when
a step beats it, and an MFU above 100% never reported (issue 26: `make demo` printed
`mfu 150%`-`188%` from a peak timed on a busy machine and cached)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from pretrain.train import peak as peak_module
from pretrain.train.metrics import train_line
from pretrain.train.peak import CPU_BUDGET_S, Peak, cpu_key


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_CACHE", str(tmp_path))
    return tmp_path / "peak_flops.json"


def test_cpu_peak_is_measured_in_its_budget_and_cached_per_machine_and_build(cache):
    key = cpu_key(torch.float32)
    assert f"{torch.get_num_threads()} threads|torch {torch.__version__}|torch.float32" in key
    # A figure of another torch build (or thread count) is not this machine's: not reused.
    other = key.replace(torch.__version__, "0.0.1")
    cache.write_text(json.dumps({other: 1e18}))
    start = time.perf_counter()
    first = Peak.of(torch.device("cpu"), "fp32")
    took = time.perf_counter() - start
    assert first.source == "measured matmul peak" and 1e8 < first.flops < 1e18
    # The budget, plus at worst a product of each size up to 1024 (loaded machine: 3x).
    assert took < 3 * CPU_BUDGET_S, took
    assert json.loads(cache.read_text()) == {other: 1e18, key: first.flops}
    cache.write_text(json.dumps({key: 1e18}))  # a better figure seen before on this machine
    assert Peak.of(torch.device("cpu"), "fp32").flops == 1e18


def test_a_step_faster_than_a_low_peak_has_it_measured_again(cache):
    """A peak measured while the machine was busy (here: 1 MFLOP/s) is beaten by a step; the
    rank that logs measures again at once, keeps the better figure (and caches it), and
    then reports a true MFU. A second step beating it soon after is not re-measured."""
    key = cpu_key(torch.float32)
    low = Peak(1e6, "measured matmul peak", key, "float32")
    assert low.mfu(5e8, remeasure=False) is None  # other ranks: no measurement, no figure
    assert low.flops == 1e6 and not cache.exists()
    mfu = low.mfu(5e8)
    assert low.flops > 5e8 and mfu == pytest.approx(5e8 / low.flops) and 0 < mfu <= 1
    assert json.loads(cache.read_text()) == {key: low.flops}
    measured_at, figure = low.remeasured_at, low.flops
    start = time.perf_counter()
    assert low.mfu(1e18) is None  # no CPU does this: the figure would be a lie
    assert time.perf_counter() - start < 0.1 and low.remeasured_at == measured_at
    assert low.flops == figure
    # Past the rate limit, a step beating the peak has it measured again.
    low.remeasured_at -= peak_module.REMEASURE_EVERY_S
    assert low.mfu(1e18) is None and low.remeasured_at > measured_at


def test_an_mfu_above_100_percent_is_never_printed_nor_logged():
    datasheet = Peak(989e12, "H100-SXM datasheet, dense bf16")  # no key: never measured
    assert datasheet.mfu(494.5e12) == 0.5
    assert datasheet.mfu(1.2e15) is None  # a wrong FLOP count or table: not a fact
    record = {"step": 7, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1e4,
              "mem_gb": 1.0, "eta_s": 60.0}  # fmt: skip
    assert "| mfu 42.0% |" in train_line({**record, "mfu": 0.42}, 10)
    for mfu in (None, 1.5, 1.88):
        line = train_line({**record, "mfu": mfu}, 10)
        assert "| mfu n/a |" in line and "%" not in line, line
