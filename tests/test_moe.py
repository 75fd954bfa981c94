"""Mixture of experts in one process (pretrain/model/moe.py): dropless routing, grouped
matmuls against the per-expert loop, the auxiliary losses as gradients only, routing
counted once under activation checkpointing, the balance bias, parameter counts, and the
config's one-line refusals. Expert parallelism on real ranks: test_parallel_ep.py."""

from __future__ import annotations

import pytest
import torch

from pretrain.config.load import load_config
from pretrain.errors import ConfigError
from pretrain.model import Transformer, count_params, flops_per_token
from pretrain.model.config import ModelConfig, MoEConfig
from pretrain.model.moe import MoE, MoEStep, balance_step


def moe_config(**moe) -> ModelConfig:
    settings = {"experts": 4, "top_k": 2, "expert_hidden": 32, **moe}
    return ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                       moe=MoEConfig(**settings))  # fmt: skip


def swiglu(x, w1, w3, w2):
    return (torch.nn.functional.silu(x @ w1) * (x @ w3)) @ w2


@pytest.mark.parametrize("mode", ["grouped", "loop"])
def test_every_token_forced_onto_one_expert_gets_that_experts_exact_output(mode):
    """Dropless: a router biased so that all 512 tokens pick expert 2 (top 1) sends every
    one of them there, at any load, and each gets expert 2's SwiGLU (weight 1)."""
    torch.manual_seed(0)
    layer = Transformer(moe_config(top_k=1, grouped_mm=mode)).layers["0"].mlp
    assert isinstance(layer, MoE)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))
    x = torch.randn(4, 128, 32)
    y = layer(x)
    assert layer.last[0].tolist() == [0, 0, 512, 0]  # no token lost, none capped
    e = layer.experts
    expected = swiglu(x, e.w1[2], e.w3[2], e.w2[2])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_grouped_matmuls_and_the_per_expert_loop_agree_in_outputs_and_gradients():
    torch.manual_seed(0)
    model = Transformer(moe_config(shared_experts=1, shared_gate=True))
    tokens = torch.randint(0, 128, (2, 33))
    grads = {}
    for mode in ("grouped", "loop"):
        for layer in model.moe_layers():
            layer.experts.mode = mode
        model.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["grouped"][0], grads["loop"][0])
    for name, grad in grads["grouped"][1].items():
        torch.testing.assert_close(grad, grads["loop"][1][name], rtol=1e-5, atol=1e-7)


def test_the_aux_and_z_losses_add_gradients_but_not_their_value_to_the_loss():
    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))
    results = {}
    for name, settings in {"plain": dict(balance="none"),
                           "aux": dict(balance="both", aux_loss_coef=0.1, z_loss_coef=0.01)}.items():  # fmt: skip
        torch.manual_seed(0)
        model = Transformer(moe_config(**settings))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        router = model.layers["0"].mlp.router.weight.grad.clone()
        results[name] = (loss.detach(), router, model.take_moe_step())
    assert torch.equal(results["plain"][0], results["aux"][0])  # the cross-entropy, exactly
    assert not torch.allclose(results["plain"][1], results["aux"][1])  # the router learns
    step = results["aux"][2]
    assert step.micro_batches == 1 and all(a > 0.9 for a in step.aux)  # E x sum f P >= ~1
    with torch.no_grad():  # evaluation adds nothing to the step's statistics
        model.eval()
        model(tokens[:, :-1], tokens[:, 1:])
    assert model.take_moe_step() is None


def test_a_checkpointed_block_counts_its_routing_once_and_gives_the_same_gradients():
    from types import SimpleNamespace

    from pretrain.parallel.parallelize import parallelize

    tokens = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(2))
    seen = {}
    for mode in ("none", "full"):
        torch.manual_seed(0)
        model = Transformer(moe_config(balance="both", z_loss_coef=0.01))
        p = SimpleNamespace(activation_checkpointing=mode, activation_checkpointing_every=1,
                            compile=False)  # fmt: skip
        parallelize(model, p)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        step = model.take_moe_step()
        grads = {n.replace("._checkpoint_wrapped_module", ""): q.grad for n, q in model.named_parameters()}  # fmt: skip
        seen[mode] = (torch.stack(step.counts), grads)
    counts = seen["full"][0]
    assert counts.sum(1).tolist() == [2 * 32 * 2] * 2  # tokens x top_k per layer, not twice
    assert torch.equal(counts, seen["none"][0])
    for name, grad in seen["none"][1].items():
        torch.testing.assert_close(seen["full"][1][name], grad)


def test_the_bias_moves_each_expert_towards_the_mean_load_by_the_same_step_everywhere():
    torch.manual_seed(0)
    model = Transformer(moe_config(bias_update_rate=0.01))
    layers = model.moe_layers()
    step = MoEStep()
    for layer in layers:  # one micro-batch's routing, as a forward leaves it
        layer.last = (torch.tensor([10.0, 0.0, 4.0, 6.0]), torch.tensor(1.5), torch.tensor(2.0))
    step.add(layers)
    summed = []

    def reduce_sum(t):  # two data-parallel ranks that routed alike
        summed.append(t.shape)
        return 2 * t

    stats = balance_step(layers, step, reduce_sum, ranks=2)
    assert summed == [(2, 6)]  # one all-reduce for every layer's counts and losses
    bias = layers[0].router.expert_bias
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.01, -0.01]))
    # imbalance = max / mean = 20 / 10; aux, z: means over ranks; range 0.02
    torch.testing.assert_close(stats[0], torch.tensor([2.0, 1.5, 2.0, 0.02]))
    off = Transformer(moe_config(balance="aux")).moe_layers()[0]
    off.update_bias(torch.tensor([10.0, 0.0, 4.0, 6.0]))
    assert not off.router.expert_bias.any()


def test_total_and_active_parameters_and_flops_count_the_experts_a_token_uses():
    cfg = moe_config(shared_experts=1, shared_gate=True, first_dense=1)
    model = Transformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    d, h, e = 32, 32, 4
    per_expert, dense_mlp = 3 * d * h, 3 * d * cfg.hidden_dim
    routed_unused = (e - 2) * per_expert  # block 1's experts a token does not go through
    assert count_params(cfg) - count_params(cfg, active=True) == routed_unused
    assert model.layers["0"].mlp.w1.weight.shape == (cfg.hidden_dim, d)  # first_dense
    active_moe = e * d + d + 3 * per_expert  # router, gate, 2 routed + 1 shared
    dense = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=64))  # fmt: skip
    assert flops_per_token(cfg, 64) - flops_per_token(dense.cfg, 64) == 6 * (active_moe - dense_mlp)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.moe.experts=4", "model.moe.top_k=5"], "model.moe.top_k=5 exceeds model.moe.experts=4"),
        (["model.moe.experts=4", "model.mlp=gelu"], "model.moe needs model.mlp=swiglu (got gelu)"),
        (["model.moe.experts=4", "model.moe.first_dense=4"], "leave no MoE block among the 4"),
        (["model.moe.experts=4", "model.moe.score=relu"], "model.moe.score must be one of softmax, sigmoid"),
        (["parallel.ep=2"], "parallel.ep=2 splits experts: set model.moe.experts"),
        (["model.moe.experts=4", "parallel.ep=2", "parallel.strategy=ddp"], "needs parallel.strategy=fsdp (got ddp); ddp trains a MoE model with parallel.ep=1"),
        (["model.moe.experts=6", "parallel.ep=4", "parallel.strategy=fsdp"], "model.moe.experts=6 does not divide by parallel.ep=4"),
        (["model.moe.experts=4", "parallel.tp=2", "parallel.strategy=fsdp"], "parallel.tp=2 with model.moe is not supported yet"),
    ],
)  # fmt: skip
def test_a_moe_setting_that_cannot_work_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_ep_must_divide_the_shard_group_it_borrows_from():
    from pretrain.parallel.dims import ParallelDims

    cfg = load_config("configs/tiny.yaml", ["model.moe.experts=8", "parallel.ep=4",
                                            "parallel.strategy=fsdp", "parallel.dp_replicate=2"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^parallel.ep=4 does not divide parallel.dp_shard=3"):
        ParallelDims.resolve(cfg.parallel, 6)
    dims = ParallelDims.resolve(cfg.parallel, 16)
    assert (dims.dp_shard, dims.ep, dims.expert_names) == (8, 4, ("dp_replicate", "efsdp", "ep"))
    assert dims.describe() == "HSDP: 2 replicas x 8 shards (experts over EP 4 x 2)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_in_bf16_the_chosen_expert_kernel_agrees_with_the_per_expert_loop():
    """Whichever kernel the probe picks on this GPU (grouped_mm needs a recent card), its
    bf16 outputs and gradients follow the per-expert loop's within bf16's precision."""
    from pretrain.model.moe import grouped_mm_runs

    torch.manual_seed(0)
    layer = Transformer(moe_config()).layers["0"].mlp.to("cuda", torch.bfloat16)
    x = torch.randn(4, 256, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for mode in ("auto", "loop"):
        layer.experts.mode = mode
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.float().square().mean().backward()
        results[mode] = (y.float(), layer.experts.w1.grad.float(), x.grad.float())
    print("grouped_mm runs:", grouped_mm_runs(x.device, torch.bfloat16))
    for a, b in zip(results["auto"], results["loop"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_the_bias_alone_balances_a_router_that_prefers_one_expert():
    """A router, frozen, whose weights send nearly every token to expert 0 (and one more):
    with the bias on, 100 steps of updates bring the load's max / mean under 1.3 and it
    stays there; with it off it stays at 2 (top 2 of 4: the most one expert can take)."""
    seen = {}
    for balance in ("bias", "none"):
        torch.manual_seed(0)
        layer = Transformer(moe_config(balance=balance, bias_update_rate=0.01)).moe_layers()[0]
        with torch.no_grad():
            layer.router.weight[0] += 0.05  # inputs of positive mean: expert 0 first
        x = torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(3)) + 0.5
        imbalance = []
        for _ in range(200):
            with torch.no_grad():
                layer(x)
            counts = layer.last[0]
            layer.update_bias(counts)
            imbalance.append((counts.max() / counts.mean()).item())
        seen[balance] = (imbalance[0], max(imbalance[100:]))
    assert seen["bias"][0] > 1.9 and seen["bias"][1] < 1.3, seen
    assert seen["none"][1] > 1.9, seen


@pytest.mark.parametrize("experts, placement, local", [(8, 1, (8, 192 // 16, 64)), (32, 0, (2, 192, 64))])  # fmt: skip
def test_fsdp_shards_the_experts_evenly_over_its_ranks(experts, placement, local):
    """Over 16 ranks (ep 1): 8 experts by dim 1 (by dim 0, FSDP's default, 8 ranks would
    hold a whole expert each and 8 none), every rank 1/16 of each; 32 by expert, 2 each."""
    from torch.distributed.tensor import DTensor, Shard

    from pretrain.planner.build import build_for_plan
    from pretrain.planner.trace import fake_world

    cfg = load_config("configs/tiny.yaml", ["parallel.strategy=fsdp", f"model.moe.experts={experts}",
                                            "model.moe.expert_hidden=64"])  # fmt: skip
    with fake_world(16):
        _, meta, _ = build_for_plan(cfg, 16)
        w1 = meta.layers["0"].mlp.experts.w1
        assert isinstance(w1, DTensor) and w1.placements == (Shard(placement),)
        assert w1.to_local().shape == local
