"""The planner (`pretrain plan CONFIG ...`): FLOPs against torch's counter on a real step,
memory categories against arithmetic, the fix search, the launch-time fit check and its
errors. Planned-vs-measured memory on real ranks is in test_planner_memory.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pretrain.__main__ import main as pretrain_main
from pretrain.config.load import load_config, with_overrides
from pretrain.errors import CONFIG_OR_DATA_ERROR, ConfigError
from pretrain.model import Transformer, count_params
from pretrain.parallel.single import SingleStrategy
from pretrain.planner import Cluster, plan
from pretrain.planner.fit import find_fix
from pretrain.planner.trace import fake_world, trace_step, train_step
from tests.helpers.runs import REPO, TINY_MODEL

aten = torch.ops.aten
SMALL = [
    *TINY_MODEL,
    "data.seq_len=64",
    "train.micro_batch_size=4",
    "train.global_batch_size=16",
    "parallel.loss_chunk_tokens=64",
]


def small(*extra: str):
    return load_config(REPO / "configs" / "tiny.yaml", [*SMALL, *extra])


def traced(cfg, world: int = 1):
    with fake_world(world):
        return trace_step(cfg, world)


# ------------------------------------------------------------------ FLOPs
def real_step_flops(cfg) -> int:
    """FLOPs of one real optimizer step as torch's FlopCounterMode counts them, with the
    CPU flash-attention kernel (not in torch's registry) given torch's own SDPA formulas."""
    strategy = SingleStrategy(cfg)
    strategy.setup()
    t = cfg.train
    accum = strategy.accum_steps
    batches = [
        torch.randint(cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1))
        for _ in range(accum)
    ]
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None,
        **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a,
        out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    }  # fmt: skip
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        train_step(strategy, batches, cfg)
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("parallel.activation_checkpointing=full", "model.n_kv_heads=2"),
        ("parallel.loss_chunk_tokens=16", "model.position=alibi"),
    ],
    ids=["plain", "checkpointed-gqa", "chunked-loss-alibi"],
)
def test_traced_flops_match_torch_flop_counter_on_a_real_step(extra):
    cfg = small(*extra)
    real = real_step_flops(cfg)
    planned = traced(cfg).counts.flops
    assert real > 0
    assert abs(planned - real) / real < 0.01, (planned, real)


def test_traced_model_flops_match_the_analytic_count():
    """Without recomputation, the trace is 6N + 12 L d S per token (model.flops) plus what
    torch charges SDPA's backward for recomputing QK^T; checkpointing only adds recompute."""
    cfg = small("model.n_kv_heads=2")
    p = plan(cfg, Cluster.of(1, 1, "H100"))
    expected = p.analytic_flops_per_step + p.attention_recompute_flops
    assert abs(p.model_flops_per_step - expected) / expected < 0.01
    checkpointed = plan(with_overrides(cfg, ["parallel.activation_checkpointing=full"]),
                        Cluster.of(1, 1, "H100"))  # fmt: skip
    assert checkpointed.trace.counts.recompute_flops > 0.2 * p.flops_per_step
    assert checkpointed.model_flops_per_step == pytest.approx(p.model_flops_per_step, rel=0.01)


# ------------------------------------------------------------------ memory
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_model_state_is_the_model_over_the_ranks(strategy):
    """On 8 fake ranks each holds 1/8 of the fp32 weights and 2/8 of the AdamW moments."""
    name, stage = ("zero", 3) if strategy == "zero3" else (strategy, 3)
    cfg = small(f"parallel.strategy={name}", f"parallel.zero_stage={stage}",
                "train.global_batch_size=32", "train.micro_batch_size=1")  # fmt: skip
    n = count_params(cfg.model)
    with torch.device("meta"):
        buffers = sum(b.numel() * 4 for b in Transformer(cfg.model).buffers())  # replicated
    state = traced(cfg, 8).model_state
    assert state["params"] == pytest.approx(4 * n / 8 + buffers, rel=0.02)
    assert state["optimizer"] == pytest.approx(8 * n / 8, rel=0.05)


def test_checkpointing_and_smaller_micro_batches_lower_activations():
    base = traced(small("model.n_layers=8")).memory
    ckpt = traced(small("model.n_layers=8", "parallel.activation_checkpointing=full")).memory
    half = traced(small("model.n_layers=8", "train.micro_batch_size=2")).memory
    assert ckpt["activations"] < 0.3 * base["activations"]  # 8 blocks' inputs + one block
    assert half["activations"] == pytest.approx(base["activations"] / 2, rel=0.15)
    assert base["params"] == ckpt["params"] == half["params"]


def test_a_recomputed_loss_chunk_is_counted_as_logits_at_the_peak():
    """With a large vocabulary the step peaks in backward while a loss chunk is recomputed
    (the head projects it itself, `OutputHead.logits`, no module call): its fp32 logits,
    their softmax and gradient, about 4 chunk x V x 4 bytes, are the logits / loss
    category, not activations. (Left untracked, the category read 0 at the peak.)"""
    chunk_logits = 64 * 4096 * 4  # fp32
    memory = traced(small("model.vocab_size=4096", "parallel.loss_chunk_tokens=64")).memory
    assert 3 * chunk_logits < memory["logits_loss"] < 5 * chunk_logits
    assert memory["activations"] < memory["logits_loss"]


def test_ddp_counts_gradient_buckets_and_one_all_reduce_per_step():
    cfg = small("parallel.strategy=ddp")
    n = count_params(cfg.model)
    t = traced(cfg, 2)
    assert t.memory["comm_buffers"] == 4 * n  # the buckets: a copy of every gradient
    assert t.accum == 2
    assert not t.micro.comm_bytes  # no_sync: the first micro-batch sends nothing
    assert t.last.comm_bytes["all_reduce"] == pytest.approx(4 * n, rel=0.01)  # 2 (n-1)/n


# ------------------------------------------------------------------ fixes and errors
def test_a_config_that_does_not_fit_gets_the_smallest_fix_that_does():
    """Activations of a 4-layer d_model 2048 model at micro-batch 16 overflow an L4 under
    DDP; the search offers checkpointing first, and its plan fits."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "model.d_model=2048", "model.n_heads=16", "model.n_layers=4", "model.vocab_size=32000",
        "model.max_seq_len=2048", "data.seq_len=2048", "train.micro_batch_size=16",
        "train.global_batch_size=128", "parallel.strategy=ddp",
    ])  # fmt: skip
    cluster = Cluster.of(1, 8, "L4")
    planned = plan(cfg, cluster)
    assert not planned.fits
    fix = find_fix(cfg, cluster, planned=planned)
    assert fix is not None and fix.plan.fits
    assert fix.overrides == ("parallel.activation_checkpointing=full",)
    assert fix.nodes == 1


def test_an_eval_batch_larger_than_the_step_is_planned_and_fails_the_fit_check():
    """Training that scores tasks runs eval forwards of eval.batch_size x max_seq_len tokens
    between steps: here 8M tokens against a step of 4 x 64, far past an L4 while the step
    needs little. The plan holds that forward's peak (no task file is read), the fit check
    fails on it, and the fix is an eval batch no larger than the training micro-batch."""
    from pretrain.planner.cli import as_json, gib, report
    from pretrain.planner.fit import require_fit

    rows, width = 4096, 2048
    cfg = small(
        "model.d_model=256", f"model.max_seq_len={width}", "eval.every=100",
        "eval.tasks=[{path: never-read.jsonl}]", f"eval.batch_size={rows}",
        "parallel.loss_chunk_tokens=2097152",  # 4 chunks: the trace stays short
    )  # fmt: skip
    l4 = Cluster.of(1, 1, "L4")
    p = plan(cfg, l4)
    t = p.trace
    # one fp32 MLP intermediate of the whole eval batch is alive at the eval's peak
    assert t.eval_memory["activations"] >= rows * width * cfg.model.hidden_dim * 4
    assert t.step_peak_bytes < 2**30 < p.capacity_bytes < t.eval_peak_bytes == p.peak_bytes
    assert not p.fits
    text = "\n".join(report(p))
    (line,) = [line for line in text.splitlines() if "eval forward peak" in line]
    assert gib(t.eval_peak_bytes) in line and f"eval.batch_size {rows} x" in line
    assert "DOES NOT FIT" in text
    out = as_json(p, None)
    assert out["eval_peak_bytes"] == t.eval_peak_bytes and out["fits"] is False
    assert out["step_peak_bytes"] == t.step_peak_bytes == sum(out["memory_bytes"].values())
    with pytest.raises(ConfigError, match=r"does not fit: .* smallest fix: eval\.batch_size=1 \("):
        require_fit(cfg, l4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu-type", "H900"], "--gpu-type 'H900' is not a GPU type"),
        (["--gpus-per-node", "0"], "--gpus-per-node must be a whole number >= 1"),
        (["--nodes", "3", "parallel.strategy=fsdp"], "train.global_batch_size (16) must be a"),
        (["--gpus-per-node", "2", "parallel.strategy=single"], "parallel.strategy=single runs"),
        (["model.d_modle=3"], "d_modle"),
    ],
)
def test_bad_input_is_one_line(args, message, capsys):
    code = pretrain_main(
        ["plan", str(REPO / "configs" / "tiny.yaml"), "--gpus-per-node", "1", *args]
    )
    err = capsys.readouterr().err
    assert code == CONFIG_OR_DATA_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_cluster_rejects_unknown_types_in_one_line():
    with pytest.raises(ConfigError, match=r"known: .*H100"):
        Cluster.of(1, 8, "TPUv5")


@pytest.mark.slow
def test_plan_of_70b_on_512_ranks(capsys):
    """The shipped Llama-3 70B config on 64 nodes of 8 H100s: each rank holds 1/512 of the
    fp32 weights and twice that in AdamW moments; bf16 all-gathers of every weight twice
    (forward, and again in backward after resharding) and fp32 reduce-scatters once."""
    from pretrain.planner.cli import main

    assert main([str(REPO / "configs" / "llama3-70b.yaml"), "--nodes", "64",
                 "--gpus-per-node", "8", "--gpu-type", "H100", "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    n = count_params(load_config(REPO / "configs" / "llama3-70b.yaml").model)
    assert out["fits"] and out["total_bytes"] < out["capacity_bytes"]
    assert out["memory_bytes"]["params"] == pytest.approx(4 * n / 512, rel=0.01)
    assert out["memory_bytes"]["optimizer"] == pytest.approx(8 * n / 512, rel=0.01)
    assert out["comm_bytes_per_step"]["all_gather"] == pytest.approx(
        2 * 2 * n * 511 / 512, rel=0.01
    )
    assert out["comm_bytes_per_step"]["reduce_scatter"] == pytest.approx(
        4 * n * 511 / 512, rel=0.01
    )
    assert 0.05 < out["mfu"] < 0.8


# ------------------------------------------------------------------ the launch-time check
TOO_BIG_FOR_L4 = [
    "model.d_model=2048", "model.n_heads=16", "model.n_layers=4", "model.vocab_size=32000",
    "model.max_seq_len=2048", "data.seq_len=2048", "train.micro_batch_size=16",
    "train.global_batch_size=128", "parallel.strategy=ddp",
]  # fmt: skip


def pretrain_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain", *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip


@pytest.mark.torchrun  # starts `pretrain launch` (refused before torchrun starts)
def test_launch_refuses_a_config_that_will_not_fit_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    r = pretrain_cli(
        "launch", str(REPO / "configs" / "tiny.yaml"), *TOO_BIG_FOR_L4, f"run.dir={run_dir}",
        "--nproc-per-node", "8", "--gpu-type", "L4",
    )  # fmt: skip
    assert r.returncode == CONFIG_OR_DATA_ERROR, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "does not fit" in line and "GiB of a L4" in line
    assert "smallest fix: parallel.activation_checkpointing=full" in line
    assert "--no-fit-check" in line
    assert not run_dir.exists()  # refused before anything was written


def test_submit_checks_fit_and_no_fit_check_skips_it(tmp_path, capsys):
    args = ["submit", str(REPO / "configs" / "tiny.yaml"), *TOO_BIG_FOR_L4,
            f"run.dir={tmp_path / 'run'}", "--gpus-per-node", "8", "--dry-run"]  # fmt: skip
    assert pretrain_main([*args, "--gpu-type", "L4"]) == CONFIG_OR_DATA_ERROR
    err = capsys.readouterr().err
    assert "does not fit" in err and len(err.strip().splitlines()) == 1
    assert pretrain_main([*args, "--gpu-type", "L4", "--no-fit-check"]) == 0
    script = capsys.readouterr().out
    # the job's launchers do not plan again at every (re)start
    assert "--no-fit-check" in script.split("-m pretrain launch", 1)[1]
    assert pretrain_main([*args, "--gpu-type", "H100"]) == 0
    out = capsys.readouterr().out
    assert "fit check: " in out and "GiB on 1 x 8 H100-SXM" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_gpu_type_from_slurm_gres():
    from launch.fitcheck import card_named, gres_gpu_type

    assert gres_gpu_type(["gpu:h100:8(S:0-1)"]) == "h100"
    assert gres_gpu_type(["gpu:8", "gpu:a100:4"]) == "a100"
    assert gres_gpu_type(["gpu:8"]) is None
    assert card_named("h100", "partition gpu's type").name == "H100-SXM"
    with pytest.raises(ConfigError, match=r"'mi999' is not a GPU type .* --gpu-type"):
        card_named("mi999", "partition gpu's type")


# ------------------------------------------------------------------ DeepSpeed's estimators
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_model_state_against_deepspeeds_estimators(stage):
    """DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs` (no offload) count per rank:
    16-bit weights (2N at stage 2, 2N/g at stage 3) and, per parameter of the rank's
    partition, 4 bytes of fp32 master weights, 8 of AdamW moments and the gradients: 6
    bytes at stage 2 (2 16-bit + 4 fp32, stage_1_and_2.py's comment on its "18"), 4 at
    stage 3 (its offload branches move 16 bytes of the 18 to the CPU: master, moments and
    fp32 gradients); stage 3 adds 4 x the largest layer, the working set of gathered
    weights. The traced step holds the weights and optimizer state the estimators count, to
    5%. Its gradients differ by design: DeepSpeed 0.19.8 casts the partition's gradients
    to fp32 for the step with no 16-bit copy left beside them, and keeps its reduce
    buckets besides, which the real allocator confirms (test_planner_memory.py's bf16 cases
    agree with the plan, not with the estimator)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = small(
        "parallel.strategy=zero", f"parallel.zero_stage={stage}", "model.d_model=256",
        "model.n_layers=4", "parallel.mixed_precision=bf16", "train.micro_batch_size=1",
        "train.global_batch_size=64", "parallel.deepspeed.data_types.grad_accum_dtype=bf16",
        "parallel.deepspeed.communication_data_type=bf16",
    )  # fmt: skip
    n, g = count_params(cfg.model), 8
    high = traced(cfg, g).high_water
    m = cfg.model
    largest = max(m.vocab_size * m.d_model, m.hidden_dim * m.d_model)
    if stage == 2:
        estimate = estimate_zero2_model_states_mem_needs(n, g, 1, cpu_offload=False)[1]
        working_set = 0
    else:
        estimate, working_set = estimate_zero3_model_states_mem_needs(
            n, largest, g, 1, cpu_offload=False, cpu_offload_params=False
        )[1:]
    estimated_gradients = (6 if stage == 2 else 4) * n / g
    weights_and_optimizer = high["params"] + high["optimizer"]
    assert weights_and_optimizer == pytest.approx(
        estimate - working_set - estimated_gradients, rel=0.05
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_reduces_and_steps_once_per_step_at_any_accumulation(stage):
    """The trace runs 2 of a step's micro-batches; DeepSpeed must still reach its
    accumulation boundary in the last one when the step has 4: stage 1's gradient
    reduction and every stage's optimizer step (and its all-gather of the updated weights
    at stages 1 and 2) happen once per step, as many at accumulation 4 as at 2."""
    zero = ["parallel.strategy=zero", f"parallel.zero_stage={stage}", "train.micro_batch_size=1"]
    two = traced(small(*zero, "train.global_batch_size=4"), 2)
    four = traced(small(*zero, "train.global_batch_size=8"), 2)
    assert (two.accum, four.accum) == (2, 4)
    for t in (two, four):
        assert t.optimizer.ops > 0  # AdamW over the rank's partition, not nothing
        assert sum(t.last.comm_bytes.values()) > 0  # the gradients leave the rank
    assert four.optimizer.ops == two.optimizer.ops
    assert four.optimizer.op_costs == two.optimizer.op_costs
    assert four.optimizer.comm_bytes == two.optimizer.comm_bytes
    assert four.last.comm_bytes == two.last.comm_bytes
    assert sum(four.optimizer.comm_bytes.values()) > 0  # the updated weights (1, 2), a norm
    # the whole step: two more micro-batches like the first (which sends at stages 2 and 3)
    for kind in four.counts.comm_bytes | two.counts.comm_bytes:
        extra = four.counts.comm_bytes[kind] - two.counts.comm_bytes[kind]
        assert extra == 2 * four.micro.comm_bytes[kind], kind


def test_slower_links_and_matmuls_lengthen_the_step():
    """Between nodes a collective runs at the network port; on one node, at NVLink."""
    from pretrain.planner.estimate import Assumptions

    cfg = small("parallel.strategy=fsdp", "train.global_batch_size=16", "train.micro_batch_size=1",
                "model.d_model=1024", "model.n_heads=8", "model.vocab_size=8192",
                "model.max_seq_len=1024", "data.seq_len=1024")  # fmt: skip
    two_nodes = Cluster.of(2, 8, "H100")
    fast = plan(cfg, two_nodes)
    slow_net = plan(cfg, two_nodes, Assumptions(nic_gbit_s=25))
    slow_mm = plan(cfg, two_nodes, Assumptions(matmul_efficiency=0.3))
    one_node = plan(with_overrides(cfg, ["train.global_batch_size=8"]), Cluster.of(1, 8, "H100"))
    assert slow_net.time.comm_s > 4 * fast.time.comm_s
    assert slow_net.step_time_s > fast.step_time_s
    assert slow_mm.time.compute_s > fast.time.compute_s
    assert one_node.time.comm_s < fast.time.comm_s  # the same bytes per rank, over NVLink


def test_a_zero_plan_leaves_the_process_as_it_found_it(monkeypatch):
    """`pretrain launch` plans in the process whose environment its ranks inherit, and
    plans may follow one another (fix search, tests): DeepSpeed's CPU accelerator setting,
    LOCAL_RANK and ZeRO-3's replacement of F.linear must not outlive the plan."""
    import os

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    linear = torch.nn.functional.linear
    traced(small("parallel.strategy=zero", "parallel.zero_stage=3",
                 "train.global_batch_size=32", "train.micro_batch_size=1"), 8)  # fmt: skip
    assert "DS_ACCELERATOR" not in os.environ and "LOCAL_RANK" not in os.environ
    assert torch.nn.functional.linear is linear
