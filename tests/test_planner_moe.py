"""The planner on mixture-of-experts models: a MoE config plans on the fake process group
(routing forced balanced), its parameters in all and active a token are count_params's,
the traced grouped matmuls' FLOPs are hand arithmetic's and a per-expert loop's (torch's
own mm formulas), expert parallelism's all-to-all bytes are hand arithmetic's, the experts'
memory per rank follows ep and FSDP sharding, and the published sizes of OLMoE-1B-7B and
Qwen3-30B-A3B come out of the same arithmetic."""

from __future__ import annotations

import pytest
import torch

from pretrain.config.load import load_config
from pretrain.hardware import lookup
from pretrain.model import count_params
from pretrain.model.flops import flops_per_token
from pretrain.planner import Cluster, plan
from pretrain.planner import counters as counters_module
from pretrain.planner.cli import report
from pretrain.planner.counters import grouped_mm_flop
from pretrain.planner.estimate import Assumptions, fabric
from pretrain.planner.moe import ep_degrees
from tests.helpers.runs import REPO, TINY_MODEL

aten = torch.ops.aten
E, K, H, D, SEQ, MB = 8, 2, 96, 64, 64, 2  # experts, top_k, expert width, d_model, ...
MOE = [
    *TINY_MODEL,
    f"model.moe.experts={E}",
    f"model.moe.top_k={K}",
    f"model.moe.expert_hidden={H}",
    f"data.seq_len={SEQ}",
    f"train.micro_batch_size={MB}",
    "train.global_batch_size=16",
    "parallel.loss_chunk_tokens=64",
    "parallel.strategy=fsdp",
    "parallel.mixed_precision=bf16",
]


def moe_cfg(*extra: str):
    return load_config(REPO / "configs" / "tiny-moe.yaml", [*MOE, *extra])


def planned(cfg, ranks: int):
    return plan(cfg, Cluster.of(1, ranks, "H100"))


def grouped_flops_of(cfg, ranks: int, monkeypatch) -> tuple[object, int]:
    """(the plan, the FLOPs the trace charged to aten._grouped_mm)."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(grouped_mm_flop(*args, **kwargs))
        return seen[-1]

    monkeypatch.setitem(counters_module.FLOP_FORMULAS, aten._grouped_mm, spy)
    p = planned(cfg, ranks)
    return p, sum(seen)


def test_moe_plan_counts_params_and_grouped_gemm_flops(monkeypatch):
    """2 ranks, accumulation 4: the traced micro-batches' grouped-matmul FLOPs are 3 matmuls x 2 M d
    h x 3 passes (forward, input and weight gradients) a MoE block, M the rank's token
    copies; the whole traced step equals the analytic 6 N_active + attention (+ SDPA's
    recompute), and a per-expert loop of matmuls (torch's own formulas) counts the same."""
    cfg = moe_cfg()
    p, grouped = grouped_flops_of(cfg, 2, monkeypatch)
    m = cfg.model
    assert p.trace.experts.model_params == count_params(m)
    assert p.trace.accum == 4  # of which the first and the last are traced
    rows = 2 * MB * SEQ * K  # this rank's token copies in the 2 traced micro-batches
    assert grouped == 3 * 2 * rows * D * H * 3 * m.n_layers
    expected = p.analytic_flops_per_step + p.attention_recompute_flops
    assert p.trace.counts.model_flops == pytest.approx(expected, rel=1e-9)
    tokens = cfg.train.global_batch_size * SEQ / 2
    assert p.analytic_flops_per_step == flops_per_token(m, SEQ) * tokens  # active params
    assert flops_per_token(m, SEQ) < 6 * count_params(m)  # far below the total's 6N
    assert 0 < p.mfu < 1

    loop = moe_cfg("model.moe.grouped_mm=loop")
    p_loop, none = grouped_flops_of(loop, 2, monkeypatch)
    assert none == 0
    assert p_loop.trace.counts.flops == p.trace.counts.flops

    text = "\n".join(report(p))
    total, active = count_params(m) / 1e9, count_params(m, active=True) / 1e9
    assert f"parameters {total:.3f} B in all, {active:.3f} B active a token" in text
    assert "routing planned balanced" in text


@pytest.mark.parametrize("ac, passes", [("none", 4), ("full", 6)])
def test_all_to_all_bytes_are_hand_arithmetic(ac, passes):
    """ep 2 on 2 ranks: each all-to-all sends the half of the rank's token copies (N x top_k
    rows of d_model bf16) bound for the other rank; dispatch and combine, forward and
    backward, per MoE block and micro-batch (full checkpointing: the recomputed forward
    exchanges again); all on the ep group of 2 consecutive ranks."""
    cfg = moe_cfg("parallel.ep=2", f"parallel.activation_checkpointing={ac}")
    p = planned(cfg, 2)
    per_call = MB * SEQ * K * D * 2 // 2  # rows x d x bf16 bytes x (ep-1)/ep
    calls = passes * cfg.model.n_layers * p.trace.accum
    counts = p.trace.counts
    assert counts.comm_calls["all_to_all"] == calls
    assert counts.comm_bytes["all_to_all"] == calls * per_call
    assert counts.group_bytes[("all_to_all", 2, 1)] == calls * per_call
    assert "token all-to-all over ep 2 ranks" in "\n".join(report(p))


def test_expert_memory_per_rank_follows_ep_and_fsdp():
    """4 ranks: the experts' shards (weights, gradients, AdamW's moments: 4 + 4 + 8 bytes a
    parameter) are the experts over the 4 ranks of the shard group whatever ep is (ep
    splits experts, FSDP the rest of the group); what ep halves is a block's experts
    gathered for compute (E / ep of them, bf16)."""
    experts = 3 * E * D * H  # a block's
    layers = moe_cfg().model.n_layers
    seen = {}
    for ep in (1, 2, 4):
        e = planned(moe_cfg(f"parallel.ep={ep}", "train.micro_batch_size=1"), 4).trace.experts
        assert (e.ep, e.experts, e.shard_ranks) == (ep, E, 4 // ep)
        assert e.params == e.grads == 4 * experts * layers // 4
        assert e.optimizer == 2 * e.params
        assert e.gathered == experts // ep * 2
        seen[ep] = e
    assert seen[1].gathered == 2 * seen[2].gathered == 4 * seen[4].gathered


def test_all_to_all_time_on_the_ep_groups_link():
    """In a node, at the GPU link; across nodes, the share for other nodes at a G-th of the
    node's NICs (each GPU exchanges at once); one hop's latency a call; exposed in full."""
    a = Assumptions()
    card = lookup("H100", "--gpu-type")
    net = fabric(card, 16, 8, a)
    link = card.link_gb_s * 1e9 / 2 * a.link_efficiency
    sent = 2**30
    in_node = net.over(8, 1)
    assert net.all_to_all_bytes_s(in_node, sent) == pytest.approx(sent / link)
    assert in_node.latency_s("all_to_all") == pytest.approx((8.4 + 3.4) * 1e-6)
    across = net.over(16, 1)
    nic = net.node_net_bytes_s / 8 * a.link_efficiency  # 400 Gb/s a GPU on a DGX
    assert nic == pytest.approx(50e9 * a.link_efficiency)
    away = sent * 8 / 15  # of 15 peers, 8 on the other node
    assert net.all_to_all_bytes_s(across, sent) == pytest.approx(away / nic)
    assert across.latency_s("all_to_all") == pytest.approx((8.4 + 9.6) * 1e-6)


def test_ep_degrees():
    cfg = moe_cfg()
    assert ep_degrees(cfg, 16, 8) == [8, 4, 2, 1]
    assert ep_degrees(cfg, 6, 8) == [2, 1]  # divisors of both 6 and 8 experts
    assert ep_degrees(load_config(REPO / "configs" / "tiny.yaml", TINY_MODEL), 8, 8) == [1]


def moe_params(layers, d, q, kv, experts, k, h, vocab) -> tuple[int, int]:
    """(total, active) parameters of a MoE transformer by hand: attention (q and output
    projections q wide, k and v kv wide), the router, the experts (3 d h each), two norms a
    block, the final norm, untied embedding and head."""
    per_block = d * (2 * q + 2 * kv) + experts * d + 2 * d
    rest = 2 * vocab * d + d
    total = layers * (per_block + experts * 3 * d * h) + rest
    return total, layers * (per_block + k * 3 * d * h) + rest


@pytest.mark.parametrize(
    "config, real, published",
    [
        # OLMoE-1B-7B: 16 x (d 2048, MHA 16 x 128, 64 experts of 1024, top 8), V 50304
        ("olmoe-1b-7b", (16, 2048, 2048, 2048, 64, 8, 1024, 50304), (6.9, 1.3)),
        # Qwen3-30B-A3B: 48 x (d 2048, 32 q heads and 4 kv of 128, 128 experts of 768,
        # top 8), V 151936; our config: 16 q heads (head size is d_model / n_heads)
        ("qwen3-30b-a3b", (48, 2048, 4096, 512, 128, 8, 768, 151936), (30.5, 3.3)),
    ],
)
def test_published_sizes(config, real, published):
    """count_params of the shipped config is the hand count of its shape, and the hand count
    of the published shape gives the published sizes (billions, to their one decimal)."""
    m = load_config(REPO / "configs" / f"{config}.yaml", []).model
    ours = moe_params(
        m.n_layers, m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim,
        m.moe.experts, m.moe.top_k, m.expert_hidden, m.vocab_size,
    )  # fmt: skip
    assert ours == (count_params(m), count_params(m, active=True))
    total, active = moe_params(*real)
    # within 0.06B: OLMoE rounds (1.28B active: "1.3B"), Qwen truncates (3.35B: "3.3B")
    assert (total / 1e9, active / 1e9) == pytest.approx(published, abs=0.06)


@pytest.mark.parametrize(
    "ac, precision", [("none", "fp32"), ("full", "fp32"), ("none", "bf16")], ids=str
)
def test_planned_peak_is_the_real_allocators_in_one_process(ac, precision):
    """One process (single strategy), as test_planner_memory.py measures it: the planned
    peak against the live bytes torch's profiler saw in a real second step, within 2%. The
    real router is not balanced, but without ep every rank runs all experts on its own
    top_k copies, so the rows (and the memory) are the same: fp32 runs one matmul per
    expert, bf16 the grouped matmuls."""
    from pretrain.planner.trace import fake_world, trace_step
    from tests.helpers.memory_ranks import measure_in_this_process

    cfg = load_config(
        REPO / "configs" / "tiny-moe.yaml",
        [
            "model.vocab_size=4096", "model.d_model=128", "model.n_layers=4",
            "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=128",
            "data.seq_len=128", "train.micro_batch_size=4", "train.global_batch_size=8",
            "model.moe.experts=8", "model.moe.expert_hidden=128", "eval.every=0",
            "parallel.strategy=single", f"parallel.activation_checkpointing={ac}",
            f"parallel.mixed_precision={precision}",
        ],
    )  # fmt: skip
    with fake_world(1):
        planned_peak = trace_step(cfg, 1).step_peak_bytes
    result = measure_in_this_process(cfg)
    assert planned_peak == pytest.approx(result["peak_step2"], rel=0.02)
