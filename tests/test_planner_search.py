"""`pretrain plan CONFIG --search` (pretrain/planner/search.py): layouts planned on shallow
copies against full traces, the meshes skipped and why, the search against planning every
layout of its grid, and the overrides it prints pasted back into a plain plan."""

from __future__ import annotations

import json
import re

import pytest

from pretrain.config.load import load_config
from pretrain.errors import ConfigError
from pretrain.planner import Cluster, plan
from pretrain.planner.cli import main as plan_main
from pretrain.planner.estimate import Assumptions
from pretrain.planner.search import (
    AC_LEVELS,
    Layout,
    grid,
    plan_shallow,
    search,
)
from pretrain.planner.trace import fresh_dtensor_caches
from tests.helpers.runs import REPO

TINY = REPO / "configs" / "tiny.yaml"
# A model whose traces are quick (fake tensors: width costs nothing, ops do) and deep enough
# for the shallow copies (2 and 4 blocks; 4 and 8 for checkpointing every 2nd block).
BASE = [
    "model.vocab_size=4096", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4",
    "model.n_layers=6", "model.max_seq_len=512", "data.seq_len=512",
    "parallel.strategy=fsdp", "eval.every=0",
    "train.global_batch_size=16", "train.micro_batch_size=2",
]  # fmt: skip
# Wide enough that an L4's 22 GiB is short: micro-batches and checkpointing trade off.
WIDE = [
    "model.d_model=2048", "model.n_heads=16", "model.n_kv_heads=4", "model.n_layers=8",
    "model.vocab_size=32768", "model.max_seq_len=4096", "data.seq_len=4096",
    "parallel.strategy=fsdp", "eval.every=0", "train.micro_batch_size=1",
    "parallel.activation_checkpointing=full",
]  # fmt: skip


def config(*extra: str):
    return load_config(TINY, [*BASE, *extra])


def assumptions(cluster: Cluster) -> Assumptions:
    return Assumptions().for_node(cluster.card, cluster.gpus_per_node)


@pytest.mark.parametrize(
    "extra",
    [
        ("parallel.tp=2", "parallel.dp_replicate=2", "parallel.activation_checkpointing=full"),
        ("parallel.tp=2", "parallel.activation_checkpointing=every", "model.n_layers=9"),
        ("eval.tasks=[{path: never-read.jsonl}]", "eval.every=5", "eval.batch_size=8"),
    ],
    ids=["hsdp-tp2-full", "tp2-every2", "eval-in-training"],
)
def test_shallow_copies_plan_what_the_full_trace_plans(extra):
    cluster = Cluster.of(2, 2, "H100")
    cfg = config(*extra)
    shallow, upper = plan_shallow(cfg, cluster, assumptions(cluster))
    fresh_dtensor_caches()
    full = plan(cfg, cluster, assumptions(cluster))
    assert upper is None  # the copies' peak holds every block's activations: exact
    assert shallow.total_bytes == pytest.approx(full.total_bytes, rel=1e-9)
    assert shallow.memory == pytest.approx(full.memory, rel=1e-9)
    assert shallow.step_time_s == pytest.approx(full.step_time_s, rel=1e-9)
    assert shallow.flops_per_step == full.flops_per_step
    assert shallow.trace.counts.comm_calls == full.trace.counts.comm_calls


@pytest.mark.slow
def test_where_a_deeper_model_peaks_elsewhere_the_fit_is_judged_on_an_upper_bound():
    # 8B's width at tp 8 with full checkpointing: a block keeps 16 MiB (its input), the
    # unsharded gradients of the vocabulary-sized embedding and head far more, so the
    # copies peak while those are reduced and the full model where all block inputs are held
    cluster = Cluster.of(2, 8, "H100")
    cfg = load_config(
        REPO / "configs" / "llama3-8b.yaml",
        ["parallel.tp=8", "model.n_layers=16", "train.global_batch_size=4"],
    )
    a = assumptions(cluster)
    shallow, upper = plan_shallow(cfg, cluster, a)
    fresh_dtensor_caches()
    full = plan(cfg, cluster, a)
    assert shallow.total_bytes < full.total_bytes <= upper  # the bound holds, the line not
    assert upper < 1.1 * full.total_bytes
    assert shallow.step_time_s == pytest.approx(full.step_time_s, rel=1e-9)


def test_plans_in_one_process_do_not_reuse_a_torn_down_mesh():
    # DTensor caches by mesh shape: without fresh caches, the third plan failed with
    # "Could not resolve the process group" (the second's groups, gone).
    cluster = Cluster.of(2, 4, "H100")
    layouts = [
        ("parallel.tp=4", "parallel.dp_replicate=-1", "parallel.dp_shard=1"),
        ("parallel.dp_replicate=-1", "parallel.dp_shard=1"),
        ("parallel.tp=2", "parallel.dp_replicate=-1", "parallel.dp_shard=2"),
    ]
    a = assumptions(cluster)
    first = [plan_shallow(config("model.n_layers=2", *x), cluster, a)[0] for x in layouts]
    again = plan_shallow(config("model.n_layers=2", *layouts[0]), cluster, a)[0]
    assert again.step_time_s == first[0].step_time_s
    assert again.total_bytes == first[0].total_bytes


def test_meshes_that_cannot_hold_the_batch_or_the_model_are_skipped_with_reasons():
    cluster = Cluster.of(2, 8, "H100")
    cfg = load_config(
        REPO / "configs" / "llama3-70b.yaml",
        ["train.global_batch_size=8", "model.n_kv_heads=4"],
    )
    meshes, skipped = grid(cfg, cluster, assumptions(cluster))
    reasons = "\n".join(skipped)
    assert "tp=8: model.n_kv_heads=4 does not divide by parallel.tp=8" in reasons
    assert "tp=1: global batch 8 cannot be split evenly over its 16 data-parallel" in reasons
    assert re.search(r"model state alone 14\d\.\d GiB > 79\.1 GiB \(a copy over 8 ranks", reasons)
    assert sum(skipped.values()) == 2 + 2 + 2  # tp 8 and tp 1 both ways; HSDP of 8 at tp 4, 2
    # FSDP over all 16 ranks is left, at tp 4 and 2, with the micro-batches the batch allows
    assert [(m.tp, m.dp_replicate, m.dp_shard, mbs) for m, mbs in meshes] == [
        (4, 1, 4, [1, 2]),
        (2, 1, 8, [1]),
    ]


def test_the_best_layout_printed_plans_faster_alone_than_the_config(capsys):
    # `pretrain plan --search`, then a plain `pretrain plan` of its #1's overrides pasted
    # after the same command, and of the config as it is
    config_args = [str(TINY), *BASE, "train.global_batch_size=2", "train.micro_batch_size=1",
                   "parallel.activation_checkpointing=full"]  # fmt: skip
    cluster = ["--nodes", "2", "--gpus-per-node", "1", "--gpu-type", "H100"]  # FSDP and HSDP
    assert plan_main([*config_args, *cluster, "--search", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    first = re.search(r"^ 1 +([\d,]+) .*\n   (.*)$", out, re.M)
    searched = float(first[1].replace(",", ""))
    printed = first[2].split()
    assert all(re.fullmatch(r"[a-z_]+\.[a-z_]+=[\w-]+", o) for o in printed)
    assert re.search(r"checkpointing full\): [\d,]+ tokens/s.*: [1-9] of the \d layouts kept", out)

    def planned(*extra: str) -> dict:
        assert plan_main([*config_args, *extra, *cluster, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    alone, current = planned(*printed), planned()
    assert alone["fits"]
    assert alone["tokens_per_s"] == pytest.approx(searched, abs=1)
    assert alone["tokens_per_s"] > current["tokens_per_s"]
    pasted = load_config(config_args[0], [*config_args[1:], *printed])
    assert Layout.of(pasted, 2).overrides(pasted) == []


@pytest.mark.slow
def test_the_search_keeps_what_planning_every_layout_of_its_grid_keeps():
    # Every layout of every mesh planned in this process; per mesh and micro-batch, the
    # least checkpointing that fits is what the search (in 2 worker processes) keeps, with
    # the same figures, and nothing it skipped as known not to fit does fit.
    cluster = Cluster.of(1, 2, "L4")
    cfg = load_config(TINY, [*WIDE, "train.global_batch_size=4"])
    a = assumptions(cluster)
    s = search(cfg, cluster, a, jobs=2)
    meshes, _ = grid(cfg, cluster, a)
    expected = {}
    for mesh, mbs in meshes:
        for m in mbs:
            for ac in AC_LEVELS:
                layout = Layout(mesh.tp, mesh.dp_replicate, mesh.dp_shard, m, ac)
                p, upper = plan_shallow(load_config(TINY, [*WIDE, "train.global_batch_size=4",
                                                           *layout.settings()]), cluster, a)  # fmt: skip
                if max(p.total_bytes, upper or 0) <= p.capacity_bytes:
                    expected[layout.key] = p.tokens_per_s
                    break
    assert {r.layout.key: r.tokens_per_s for r in s.kept} == pytest.approx(expected, rel=1e-9)
    assert len(s.probed) < sum(len(mbs) * len(AC_LEVELS) for _, mbs in meshes)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--search", "--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--search", "--top", "0"], "--top must be >= 1, got 0"),
        (["--search", "--json"], "--search prints a table; it has no --json form"),
    ],
)
def test_search_flags_are_checked(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_main([str(TINY), *BASE, *flags])
