"""Expert parallelism (`parallel.ep`, pretrain/parallel/expert_parallel.py) on real gloo ranks.

One MoE layer with its experts on 2 ranks gives one process's outputs and gradients. On 4
ranks, ep 2 x dp_shard 2 (experts split over 2 ranks, FSDP-sharded over the other 2)
trains as one process does, with the balance bias, the z-loss, a shared expert and a dense
first block (the aux loss is not here: E x sum f_i P_i of a micro-batch depends on how the
batch is split into micro-batches, which differs between layouts, as in every framework
that takes it per micro-batch; test_moe.py checks it in one process); a rank killed with SIGKILL resumes bit for bit (bias and AdamW
state from the checkpoint), and the checkpoint resumes on 2 ranks without expert
parallelism (DCP reshards the experts). (Checks of the layout: test_moe.py; ZeRO-3's
partitioned build of a MoE model: test_parallel_ranks.py.)
"""

from __future__ import annotations

import json
import random
import shutil
import signal

import pytest

from pretrain.train.metrics import read_metrics
from tests.helpers.runs import REPO, losses_by_step, run_cli, run_torchrun, with_overrides
from tests.test_faults import finish, wait_for_step, worker
from tests.test_parallel import torchrun_train
from tests.test_parallel_tp import start_four

STEPS = 20
MOE = ["model.moe.experts=4", "model.moe.top_k=2", "model.moe.expert_hidden=32",
       "model.moe.shared_experts=1", "model.moe.first_dense=1", "model.moe.balance=bias",
       "model.moe.z_loss_coef=0.001",
       f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_every=10",
       f"schedule.decay_steps={STEPS}", "checkpoint.keep_last=4"]  # fmt: skip
EP2 = ["parallel.strategy=fsdp", "parallel.ep=2", "train.micro_batch_size=4"]


@pytest.mark.torchrun
def test_one_moe_layer_with_experts_on_2_ranks_equals_one_process(tmp_path):
    run_torchrun(2, str(REPO / "tests/helpers/moe_ranks.py"), str(tmp_path))
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["out"] <= 1e-6, seen
        assert seen["counts"][3] > max(seen["counts"][:3])  # uneven splits were exchanged
        for name in ("w1", "w3", "w2", "router"):
            scale = seen.get(f"{name}_scale", 1e-3)
            assert seen[name] <= 1e-6 * scale + 1e-12, (name, seen)


@pytest.mark.torchrun
def test_ep_2_on_4_ranks_trains_like_one_process_resumes_bitwise_and_on_ep_1(
    tiny_overrides, tmp_path
):
    single_dir, ep_dir = tmp_path / "single", tmp_path / "ep2"
    r = run_cli("train", "configs/tiny.yaml", *with_overrides(tiny_overrides, f"run.dir={single_dir}", *MOE))  # fmt: skip
    assert r.returncode == 0, r.stderr
    single = losses_by_step(single_dir)
    assert len(single) == STEPS

    # ep 2 x dp_shard 2, a random rank killed with SIGKILL after step 12 (the last
    # checkpoint is step 10): torchrun restarts the ranks and they resume from it.
    proc = start_four(with_overrides(tiny_overrides, f"run.dir={ep_dir}", *MOE, *EP2), 1)
    wait_for_step(proc, ep_dir, 12, 0)
    victim = worker(proc, random.Random("ep-kill").randint(0, 3), 0)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    code, out = finish(proc)
    assert code == 0 and "resumed from" in out and "experts over EP 2 x 2" in out, out
    # The steps done twice (before the kill and after the resume) logged the same loss,
    # gradient norm and routing, bit for bit.
    by_step: dict[int, list[dict]] = {}
    for record in read_metrics(ep_dir):
        if "loss" in record:
            by_step.setdefault(record["step"], []).append(record)
    redone = [s for s, rs in by_step.items() if len(rs) > 1]
    assert {11, 12} <= set(redone), redone
    keys = ("loss", "grad_norm", "moe_imbalance", "moe_aux_loss", "moe_bias_range")
    for step in redone:
        first, again = by_step[step][0], by_step[step][-1]
        assert {k: first[k] for k in keys} == {k: again[k] for k in keys}, step
    # Like one process, step by step: the loss, the gradient norm over the dense and the
    # expert meshes (clipped to 1 by it), the routing; and the bias moved.
    resumed = losses_by_step(ep_dir)
    assert resumed.keys() == single.keys()
    one = {r["step"]: r for r in read_metrics(single_dir) if "loss" in r}
    for step, loss in single.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5), step
        ep = by_step[step][-1]
        assert ep["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-3), step
        assert ep["moe_imbalance"] == one[step]["moe_imbalance"], step
    assert by_step[STEPS][-1]["moe_bias_range"] > 0

    # The step-10 checkpoint on 2 ranks with the experts whole on each (ep 1, FSDP 2).
    moved = tmp_path / "ep1"
    shutil.copytree(ep_dir, moved)
    for checkpoint in (moved / "checkpoints").glob("step_*"):
        if int(checkpoint.name.removeprefix("step_")) > 10:
            shutil.rmtree(checkpoint)
    r = torchrun_train(2, *with_overrides(tiny_overrides, f"run.dir={moved}", *MOE,
                                          "parallel.strategy=fsdp", "train.micro_batch_size=8"))  # fmt: skip
    assert "step_00000010 (step 10;" in r.stderr, r.stderr[-2000:]
    after = losses_by_step(moved)
    for step, loss in single.items():
        assert after[step] == pytest.approx(loss, rel=1e-5), step
