"""The planner's per-rank peak memory against what real ranks allocate.

For each strategy (single, ddp, fsdp, zero stages 1-3), with and without activation
checkpointing, the planner traces one step of a small config on 2 fake ranks
(`trace_step`), and real ranks (torchrun, gloo; one process for single) take two steps of
the same config while torch's profiler records every CPU allocation
(tests/helpers/memory_ranks.py). The planned peak of rank 0 must be within 10% of the
peak live bytes rank 0 had in its steady second step. Both count tensor memory only, so a
miss is a category the planner leaves out or gets wrong: a failure prints the planner's
categories next to what the rank held after its build, after step 1 and at its peaks.

The config is small enough that all ten 2-rank cases run in one torchrun launch in
about half a minute on 2 cores, and big enough that weights, gradients and optimizer state
(~20 MiB under ddp) and activations (~50 MiB without checkpointing) both weigh in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.config.load import load_config
from pretrain.planner.trace import fake_world, trace_step
from tests.helpers.memory_ranks import counting_all_threads, measure
from tests.helpers.runs import REPO, STRATEGIES, made_once, run_torchrun

pytestmark = pytest.mark.torchrun

CONFIG = REPO / "configs/tiny.yaml"
SMALL = [
    "model.vocab_size=4096", "model.d_model=128", "model.n_layers=4", "model.n_heads=4",
    "model.n_kv_heads=2", "model.max_seq_len=128", "data.seq_len=128",
    "train.micro_batch_size=4", "train.global_batch_size=16",  # 2 micro-batches on 2 ranks
]  # fmt: skip
RANKS = 2
TOLERANCE = 0.10
CHECKPOINTING = ("none", "full")
MiB = 2**20

CASES = [(name, ac) for name in ("single", *STRATEGIES) for ac in CHECKPOINTING]


def overrides(name: str, ac: str) -> list[str]:
    strategy = ["parallel.strategy=single"] if name == "single" else STRATEGIES[name]
    return [*SMALL, *strategy, f"parallel.activation_checkpointing={ac}"]


def case_arg(name: str, ac: str) -> str:
    """A case as memory_ranks.py takes it: `name:key=value,...`."""
    return f"{name}-{ac}:" + ",".join(overrides(name, ac))


def measure_ranks(folder: Path) -> None:
    """Every 2-rank case, in one launch (a case's strategy reuses the process group)."""
    cases = [case_arg(name, ac) for name in STRATEGIES for ac in CHECKPOINTING]
    run_torchrun(
        RANKS, "tests/helpers/memory_ranks.py", folder, CONFIG, *cases,
        env={"OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ranks_folder(tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "plan_memory_ranks", measure_ranks)


def measured(name: str, ac: str, request) -> list[dict]:
    """What each real rank held (memory_ranks.py's `Window.summary`)."""
    if name == "single":  # one process: this one, with one thread as each rank has
        cfg = load_config(CONFIG, overrides(name, ac))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # 2 threads on 2 busy cores: 20x slower
        try:
            with torch.random.fork_rng(devices=[]), counting_all_threads():
                result, strategy = measure(cfg)
            strategy.close()
        finally:
            torch.set_num_threads(threads)
        return [result]
    folder = request.getfixturevalue("ranks_folder") / f"{name}-{ac}"
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(RANKS)]


def planned(name: str, ac: str):
    cfg = load_config(CONFIG, overrides(name, ac))
    world = 1 if name == "single" else RANKS
    with fake_world(world):
        return trace_step(cfg, world)


def explain(name: str, ac: str, plan, ranks: list[dict]) -> str:
    """The planner's categories and what each rank held, in MiB, one line each."""
    cats = ", ".join(f"{k} {v / MiB:.2f}" for k, v in plan.memory.items())
    lines = [f"{name} AC={ac}: planned {plan.peak_bytes / MiB:.2f} MiB ({cats})"]
    for r, m in enumerate(ranks):
        phases = ", ".join(
            f"{k} {m[k] / MiB:.2f}"
            for k in ("after_build", "peak_step1", "after_step1", "peak_step2", "freed_unseen")
        )
        ratio = plan.peak_bytes / m["peak_step2"]
        lines.append(
            f"  rank {r} measured {m['peak_step2'] / MiB:.2f} MiB ({phases}), ratio {ratio:.3f}"
        )
    return "\n".join(lines)


@pytest.mark.parametrize(("name", "ac"), CASES)
def test_planned_peak_is_within_10_percent_of_measured(name, ac, request):
    ranks = measured(name, ac, request)
    plan = planned(name, ac)
    report = explain(name, ac, plan, ranks)
    print(report)
    peak = ranks[0]["peak_step2"]
    # The real step held the model and more than a micro-batch's activations: a real peak.
    assert peak > ranks[0]["after_step1"] > 0, report
    assert abs(plan.peak_bytes - peak) / peak <= TOLERANCE, report
