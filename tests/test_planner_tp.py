"""The planner on tensor-parallel and HSDP layouts of the fsdp strategy.

- The collectives of a step traced on a fake process group equal, call for call and byte
  for byte, what this file derives by hand from the model's shape, per kind and per
  process group (tp: `tp` consecutive ranks; dp_shard: `tp` ranks apart; dp_replicate:
  dp_shard x tp ranks apart), and the tp group is priced on NVLink and not overlapped.
  (The traced collectives of each layout below, op by op with their shapes, were checked
  once against those of real gloo ranks running the same step: equal.)
- The planned peak of rank 0 is within 5% of what 4 real gloo ranks allocate, for
  tp 2 x dp_shard 2 and HSDP 2 x 2.
"""

from __future__ import annotations

import functools
import json
from collections import Counter

import pytest

from pretrain.config.load import load_config
from pretrain.planner.trace import fake_world, trace_step
from tests.helpers.runs import REPO, run_torchrun

CONFIG = REPO / "configs/tiny.yaml"
# d_model 64 (SwiGLU hidden 192), 2 blocks, 4 query heads of 16, 32-token sequences, 2
# sequences a micro-batch, 2 micro-batches a step; every tensor split evenly (no padding).
MODEL = [
    "parallel.strategy=fsdp", "model.vocab_size=512", "model.d_model=64", "model.n_layers=2",
    "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32", "data.seq_len=32",
    "train.micro_batch_size=2", "eval.tasks=[]",
]  # fmt: skip

# name -> (ranks, overrides): the layouts whose collectives are derived below.
LAYOUTS = {
    # tied embedding (the root's FSDP group), one loss chunk, no recomputation
    "tp2": (4, ["parallel.tp=2"]),
    # untied head (its own FSDP group), 4 loss chunks, every block recomputed, bf16
    "tp2-untied-full-bf16": (4, ["parallel.tp=2", "model.tie_embeddings=false",
                                 "parallel.loss_chunk_tokens=16",
                                 "parallel.activation_checkpointing=full",
                                 "parallel.mixed_precision=bf16"]),
    "tp4": (8, ["parallel.tp=4", "model.n_kv_heads=4"]),
    "hsdp2x2-tp2": (8, ["parallel.tp=2", "parallel.dp_replicate=2",
                        "model.tie_embeddings=false", "parallel.loss_chunk_tokens=32",
                        "parallel.activation_checkpointing=full"]),
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "parallel.mixed_precision=bf16"]),
    # no tp: the untied head's group, gathered and reduced as real ranks do
    "fsdp2-untied-chunks": (2, ["model.tie_embeddings=false", "parallel.loss_chunk_tokens=16"]),
}  # fmt: skip


@functools.cache
def traced(layout: str):
    world, extra = LAYOUTS[layout]
    probe = load_config(CONFIG, [*MODEL, *extra])
    dp = world // probe.parallel.tp
    cfg = load_config(CONFIG, [*MODEL, *extra, f"train.global_batch_size={2 * 2 * dp}"])
    with fake_world(world):
        trace = trace_step(cfg, world)
    assert trace.accum == 2
    return trace, cfg, world


class Expected:
    """Calls and bytes sent by one rank, per (kind, group size, stride), as the trace keys
    them: a ring all-gather or reduce-scatter of a B-byte buffer on n ranks sends
    B (n-1)/n, an all-reduce twice that."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()

    def add(self, kind: str, n: int, stride: int, calls: int, buffer: int) -> None:
        if n == 1 or calls == 0:
            return
        twice = 2 if kind == "all_reduce" else 1
        self.calls[(kind, n, stride)] += calls
        self.bytes[(kind, n, stride)] += calls * (buffer * twice * (n - 1) // n)


def expected_step(cfg, world: int) -> Expected:
    """The collectives of one optimizer step of 2 micro-batches, from the model's shape."""
    m, p = cfg.model, cfg.parallel
    tp, replicas = p.tp, p.dp_replicate
    shard = world // tp // replicas
    B, T, d, L, V, h = cfg.train.micro_batch_size, cfg.data.seq_len, m.d_model, m.n_layers, m.vocab_size, m.hidden_dim  # fmt: skip
    tokens = B * T
    act = 2 if p.mixed_precision == "bf16" else 4  # activations, and weights as used
    reduce = 4  # FSDP reduces gradients in fp32
    chunk = p.loss_chunk_tokens
    chunks = -(-tokens // chunk) if 0 < chunk < tokens else 1
    recompute = p.activation_checkpointing == "full"
    untied = not m.tie_embeddings
    e = Expected()

    for _ in range(2):  # micro-batches: every one gathers and reduces (no deferred sync)
        # --- tensor parallelism, on the tp group: consecutive ranks
        seq = tokens * d * act  # the whole (B, T, d) sequence
        e.add(
            "all_gather", tp, 1,
            2 * L + 1  # forward: each block's attention and MLP input, the final norm's output
            + 2 * L + 1  # backward: the gradient of each row-parallel output's and of the
            # embedding's reduce-scatter
            + 2 * L * recompute,  # recomputed blocks gather their inputs again
            seq,
        )  # fmt: skip
        e.add(
            "reduce_scatter", tp, 1,
            1 + 2 * L  # forward: the embedding's and each row-parallel projection's output
            + 2 * L  # backward: the gradient of each block input's gather
            # Recomputation reduces the attention's output again but not the MLP's:
            # torch.utils.checkpoint stops recomputing once every saved tensor is back, and
            # nothing after the MLP's down projection was saved.
            + L * recompute,
            seq,
        )  # fmt: skip
        # The gradient of the final norm's gather is no reduce-scatter: the head takes its
        # input replicated (ColwiseParallel, input Replicate), so its input's gradient is a
        # partial sum all-reduced whole, a chunk at a time (twice a reduce-scatter's bytes),
        # and the norm's Replicate -> Shard(1) in backward is then a local slice.
        e.add("all_reduce", tp, 1, chunks, tokens // chunks * d * act)
        # loss_parallel: the max, the sum of exponentials and the target's logit, each an
        # fp32 float per token, per chunk; again when several chunks are recomputed
        loss_rounds = 2 if chunks > 1 else 1
        e.add("all_reduce", tp, 1, 3 * chunks * loss_rounds, tokens // chunks * 4)
        # the norms' weights are replicated over tp (SequenceParallel): their gradients are
        # partial sums, all-reduced before FSDP reduces them
        e.add("all_reduce", tp, 1, 2 * L + 1, d * act)

        # --- FSDP over the data-parallel dimensions: each group's tp-local parameters
        block = (
            2 * d  # the two norms
            + (m.n_heads + 2 * m.kv_heads) * m.head_dim * d // tp  # q, k, v: column-parallel
            + d * m.n_heads * m.head_dim // tp  # out: row-parallel
            + 3 * d * h // tp  # w1, w3 column-, w2 row-parallel
        )
        embedding = V // tp * d
        # Untied: groups of their own, the embedding, and the final norm with the head (one
        # module call a micro-batch with all its loss chunks: gathered once and kept through
        # its backward, reshard_after_forward=False). Tied: the root's group holds the
        # embedding and the final norm.
        untied_groups = [(embedding, 2), (embedding + d, 1)]
        groups = untied_groups if untied else [(embedding + d, 2)]
        groups += [(block, 2)] * L  # gathered for forward and again for backward
        for numel, gathers in groups:
            e.add("all_gather", shard, tp, gathers, numel * act)
            e.add("reduce_scatter", shard, tp, 1, numel * reduce)
            # HSDP: the reduced shards are all-reduced over the replicas
            e.add("all_reduce", replicas, shard * tp, 1, numel // shard * reduce)

    # --- clipping: every parameter's norm, one fp32 float each, reduced over the
    # dimensions its gradient is split on: dp_shard, then tp (two calls, not one)
    params = 2 + untied + 9 * L
    e.add("all_reduce", shard, tp, 1, params * 4)
    e.add("all_reduce", tp, 1, 1, params * 4)
    return e


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter", "all_reduce"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_traced_collectives_of_a_step_are_the_arithmetic_of_the_model(layout, kind):
    trace, cfg, world = traced(layout)
    counts, want = trace.counts, expected_step(cfg, world)
    got = {k: (counts.group_calls[k], counts.group_bytes[k]) for k in counts.group_calls}
    wanted = {k: (want.calls[k], want.bytes[k]) for k in want.calls}
    assert {k: v for k, v in got.items() if k[0] == kind} == {
        k: v for k, v in wanted.items() if k[0] == kind
    }
    assert counts.comm_bytes[kind] == sum(want.bytes[k] for k in want.bytes if k[0] == kind)


def test_tp_traffic_is_on_nvlink_and_in_the_critical_path():
    """On 2 DGX H100 nodes, tp 2 x dp_shard 8: the tp groups are 2 consecutive ranks, on
    NVLink; the dp_shard groups, 2 ranks apart, span both nodes and share the NICs with the
    other tp rank's group. TP's gathers feed the next matmul at once, so their time is
    exposed in full, while FSDP's hides behind compute."""
    from pretrain.hardware import by_name
    from pretrain.planner.counters import OpCounts
    from pretrain.planner.estimate import Assumptions, fabric, rates, step_time

    h100 = by_name("H100")
    world = fabric(h100, 16, 8, Assumptions())
    nvlink = 0.75 * h100.link_gb_s * 1e9 / 2
    tp_group, dp_group = world.over(2, 1), world.over(8, 2)
    assert (tp_group.nodes, tp_group.bytes_s) == (1, pytest.approx(nvlink))
    assert (dp_group.nodes, dp_group.bytes_s) == (2, pytest.approx(0.75 * 400e9 / 2))

    def counts(n: int, stride: int) -> OpCounts:
        c = OpCounts(op_costs=[(10**15, 0)])  # a second of compute or so
        c.add_comm("all_gather", 10**9, 2, n, stride, calls=10)
        return c

    r = Assumptions()
    rate = rates(h100, "bf16", r)
    tp_only = step_time(counts(2, 1), counts(2, 1), OpCounts(), 1, 4, rate, world, 16, r, tp=2)
    assert tp_only.comm_s > 0 and tp_only.exposed_comm_s == pytest.approx(tp_only.comm_s)
    dp_only = step_time(counts(8, 2), counts(8, 2), OpCounts(), 1, 4, rate, world, 16, r, tp=2)
    assert dp_only.exposed_comm_s == pytest.approx(dp_only.comm_s / 5)  # one block's share


def test_tp_ranks_split_the_step_flops_and_no_global_shape_op_is_counted():
    """tp 2 over 4 ranks reads the samples of 2 data-parallel ranks, like fsdp over 2: each
    rank runs exactly half the FLOPs. (DTensor learns an output's shape by running the op
    once on global-shape fake tensors, the first time it meets a sharding; counted, those
    charged the traced first micro-batch, and every untraced one like it, with whole-model
    matmuls: +8% of the FLOPs of an 8B step at tp 2.)"""
    tp, _, _ = traced("tp2")
    cfg = load_config(CONFIG, [*MODEL, "train.global_batch_size=8"])
    with fake_world(2):
        fsdp = trace_step(cfg, 2)
    for part in ("micro", "last", "optimizer"):
        assert 2 * getattr(tp, part).flops == getattr(fsdp, part).flops, part


# ------------------------------------------------------------------ memory on real ranks
SMALL = [
    "model.vocab_size=4096", "model.d_model=128", "model.n_layers=4", "model.n_heads=4",
    "model.n_kv_heads=2", "model.max_seq_len=128", "data.seq_len=128",
    "train.micro_batch_size=4", "train.global_batch_size=16", "parallel.strategy=fsdp",
]  # fmt: skip
MEMORY_CASES = {
    # 2 micro-batches of 4 x 128 tokens per data-parallel rank; configs/tiny.yaml scores
    # tasks between steps: the eval forward (4 x 128 tokens, logits gathered) is held too
    "tp2": ["parallel.tp=2", "eval.batch_size=4"],
    # recomputation and 4 loss chunks under loss_parallel, bf16 (no eval forward: gloo's
    # gathers of logit chunks keep copies of their own for a while, at random)
    "tp2-full-bf16": ["parallel.tp=2", "parallel.activation_checkpointing=full",
                      "parallel.mixed_precision=bf16", "parallel.loss_chunk_tokens=128",
                      "eval.tasks=[]"],
    "hsdp2x2": ["parallel.dp_replicate=2", "eval.tasks=[]"],
}  # fmt: skip
TOLERANCE = 0.05
MiB = 2**20


@pytest.mark.torchrun
def test_planned_peak_of_tp_and_hsdp_is_within_5_percent_of_4_real_ranks(tmp_path):
    """Each case's real step on 4 gloo ranks (tests/helpers/memory_ranks.py: two steps,
    torch's CPU allocator counting every thread's blocks; one launch for all) against the
    peak the planner traces for rank 0."""
    cases = [f"{name}:" + ",".join([*SMALL, *extra]) for name, extra in MEMORY_CASES.items()]
    run_torchrun(
        4, "tests/helpers/memory_ranks.py", tmp_path, CONFIG, *cases,
        env={"OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    reports, misses = [], []
    for name, extra in MEMORY_CASES.items():
        ranks = [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in range(4)]
        cfg = load_config(CONFIG, [*SMALL, *extra])
        with fake_world(4):
            plan = trace_step(cfg, 4)
        reports.append(
            f"{name}: planned {plan.step_peak_bytes / MiB:.2f} MiB ("
            + ", ".join(f"{k} {v / MiB:.2f}" for k, v in plan.memory.items())
            + f"), eval {plan.eval_peak_bytes / MiB:.2f}; rank 0 held "
            + ", ".join(f"{k} {v / MiB:.2f}" for k, v in ranks[0].items() if k != "seconds")
        )
        real = ranks[0]["peak_step2"]
        assert real > ranks[0]["after_step1"] > 0, reports[-1]
        if abs(plan.step_peak_bytes - real) / real > TOLERANCE:
            misses.append(f"{name}: step {plan.step_peak_bytes / MiB:.2f} vs {real / MiB:.2f}")
        if cfg.eval.in_training:
            real = ranks[0]["peak_eval"]
            if abs(plan.eval_peak_bytes - real) / real > TOLERANCE:
                misses.append(f"{name}: eval {plan.eval_peak_bytes / MiB:.2f} vs {real / MiB:.2f}")
    print("\n".join(reports))
    assert not misses, "\n".join([*misses, *reports])
