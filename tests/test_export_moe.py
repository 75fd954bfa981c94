"""`pretrain export --hf` of a mixture-of-experts model: each routing maps to the
transformers decoder that routes alike (pretrain/tools/export_moe.py), which loads the
export and reproduces our logits; what none can represent is refused, naming the setting,
with nothing written; `pretrain generate` and `pretrain eval` run on a MoE checkpoint.

The checkpoints are made here, not trained: a random tiny MoE model (router and expert
weights scaled up so that routing decides the logits, a random expert bias where routing
uses one) saved as training saves it (DCP, config.yaml beside it)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from pretrain.__main__ import main as pretrain_main
from pretrain.config.load import load_config, to_yaml
from pretrain.errors import ConfigError
from pretrain.model.config import ModelConfig, MoEConfig
from pretrain.model.transformer import Transformer
from pretrain.tools.export import export_hf, hf_config
from tests.helpers.runs import REPO, TINY_MODEL
from tests.test_export import assert_same_logits

transformers = pytest.importorskip("transformers")

# 3 blocks, 4 experts of width 32, 2 per token (with TINY_MODEL: d_model 64, 4/2 heads).
MOE = ["model.n_layers=3", "model.moe.experts=4", "model.moe.top_k=2",
       "model.moe.expert_hidden=32", "model.mlp_hidden=96"]  # fmt: skip


def moe_checkpoint(root: Path, dataset: dict, *overrides: str) -> tuple[Path, Transformer]:
    """A random MoE model of configs/tiny-moe.yaml with TINY_MODEL, MOE and `overrides`,
    saved as RUN/checkpoints/step_00000001; returns the checkpoint and the model."""
    cfg = load_config(REPO / "configs/tiny-moe.yaml", [
        *TINY_MODEL, *MOE, f"run.dir={root / 'run'}", f"data.tokenizer={dataset['tokenizer']}",
        f"data.streams=[{{path: {dataset['mds']}}}]", *overrides,
    ])  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # not all ones: a misplaced norm weight shows
                p.add_(0.2 * torch.randn_like(p))
            elif "router" in name or "experts" in name or "shared" in name:
                p.normal_(0, 0.15)
        for i in cfg.model.moe_layers():
            router = model.layers[str(i)].mlp.router
            if cfg.model.moe.balance in ("bias", "both"):
                router.expert_bias.normal_(0, 0.5)
    checkpoint = root / "run" / "checkpoints" / "step_00000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.yaml").write_text(to_yaml(cfg))
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=checkpoint)
    return checkpoint, model


def bias_decides_routing(model: Transformer) -> None:
    """Our logits change when the expert bias is dropped: an export without it would
    fail assert_same_logits."""
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))  # fmt: skip
    routers = [model.layers[str(i)].mlp.router for i in model.cfg.moe_layers()]
    with torch.no_grad():
        biased = model(tokens)
        kept = [r.expert_bias.clone() for r in routers]
        for r in routers:
            r.expert_bias.zero_()
        unbiased = model(tokens)
        for r, b in zip(routers, kept, strict=True):
            r.expert_bias.copy_(b)
    assert (biased - unbiased).abs().max() > 1e-2


CASES = {  # name: (overrides, model_type, config keys that must say so)
    "mixtral": (
        ["model.moe.balance=aux", "model.moe.routed_scale=1.5", "model.rope_scale=2.0"],
        "mixtral",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32},
    ),
    "mixtral-sliding-window": (
        ["model.moe.balance=none", "model.sliding_window=8", "model.tie_embeddings=false"],
        "mixtral",
        {"sliding_window": 8},
    ),
    "qwen2-moe-gated-shared": (
        [
            "model.moe.balance=aux",
            "model.moe.shared_experts=2",
            "model.moe.shared_gate=true",
            "model.moe.norm_topk=false",
            "model.moe.first_dense=1",
        ],
        "qwen2_moe",
        {"shared_expert_intermediate_size": 64, "norm_topk_prob": False, "mlp_only_layers": [0]},
    ),
    "qwen2-moe-every-2": (
        ["model.moe.balance=none", "model.moe.every=2", "model.moe.routed_scale=2.0"],
        "qwen2_moe",
        {"decoder_sparse_step": 2, "shared_expert_intermediate_size": 0},
    ),
    "ernie-softmax-bias": (
        ["model.moe.balance=bias", "model.moe.every=2", "model.moe.routed_scale=0.5"],
        "ernie4_5_moe",
        {"moe_layer_interval": 2, "moe_num_shared_experts": 0},
    ),
    "ernie-shared-bias": (
        [
            "model.moe.balance=both",
            "model.moe.shared_experts=1",
            "model.moe.first_dense=1",
            "model.tie_embeddings=false",
        ],
        "ernie4_5_moe",
        {"moe_layer_start_index": 1, "moe_num_shared_experts": 1},
    ),
    "glm4-moe-sigmoid-bias-shared": (
        [
            "model.moe.score=sigmoid",
            "model.moe.balance=bias",
            "model.moe.shared_experts=1",
            "model.moe.first_dense=1",
            "model.moe.routed_scale=2.5",
            "model.rope_scale=2.0",
        ],
        "glm4_moe",
        {"first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "n_shared_experts": 1},
    ),
    "glm4-moe-sigmoid-unnormalised": (
        ["model.moe.score=sigmoid", "model.moe.balance=aux", "model.moe.norm_topk=false"],
        "glm4_moe",
        {"norm_topk_prob": False, "n_shared_experts": 0},
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_moe_model_exports_and_transformers_reproduces_its_logits(case, dataset, tmp_path):
    overrides, model_type, says = CASES[case]
    checkpoint, model = moe_checkpoint(tmp_path, dataset, *overrides)
    if model.cfg.moe.balance in ("bias", "both"):
        bias_decides_routing(model)
    out = tmp_path / "hf"
    export_hf(checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type
    assert {k: config[k] for k in says} == says
    assert_same_logits(checkpoint, out)


def refused(**moe) -> str:
    """The error of exporting a MoE model with these model.moe settings (and model ones)."""
    model = {k: moe.pop(k) for k in ("bias", "sliding_window") if k in moe}
    m = ModelConfig(moe=MoEConfig(experts=4, **moe), **model)
    with pytest.raises(ConfigError) as e:
        hf_config(m, torch.float32, 1, 2)
    message = str(e.value)
    assert "\n" not in message and message.startswith("cannot export to transformers: ")
    return message


def test_softmax_with_the_expert_bias_needs_norm_topk():
    assert "model.moe.norm_topk=false with model.moe.balance=bias" in refused(norm_topk=False)


def test_softmax_with_ungated_shared_experts_needs_norm_topk():
    says = refused(balance="aux", shared_experts=1, norm_topk=False)
    assert "model.moe.norm_topk=false with model.moe.shared_experts=1" in says


def test_a_gated_shared_expert_cannot_take_the_expert_bias():
    says = refused(balance="both", shared_experts=1, shared_gate=True)
    assert says.startswith("cannot export to transformers: model.moe.balance=both with model.moe.shared_gate=true")  # fmt: skip


def test_a_nonzero_expert_bias_left_in_the_checkpoint_counts():
    """balance=aux, but the checkpoint's bias is nonzero (resumed after balance=bias)."""
    m = ModelConfig(moe=MoEConfig(experts=4, balance="aux", shared_experts=1, shared_gate=True))
    with pytest.raises(ConfigError, match=r"a nonzero router\.expert_bias in the checkpoint"):
        hf_config(m, torch.float32, 1, 2, expert_bias=True)
    assert hf_config(m, torch.float32, 1, 2, expert_bias=False)["model_type"] == "qwen2_moe"


def test_sigmoid_with_a_shared_gate_is_refused():
    assert "model.moe.shared_gate=true with model.moe.score=sigmoid" in refused(
        score="sigmoid", shared_experts=1, shared_gate=True
    )


def test_sigmoid_with_every_is_refused():
    assert "model.moe.every=2 with model.moe.score=sigmoid" in refused(score="sigmoid", every=2)


def test_sigmoid_with_one_expert_is_refused():
    m = ModelConfig(moe=MoEConfig(experts=1, top_k=1, score="sigmoid"))
    with pytest.raises(ConfigError, match=r"model\.moe\.experts=1 with model\.moe\.score=sigmoid"):
        hf_config(m, torch.float32, 1, 2)


def test_biases_with_moe_are_refused():
    assert "model.bias=true with model.moe" in refused(bias=True, balance="aux")


def test_a_sliding_window_outside_mixtral_is_refused():
    says = refused(sliding_window=8, balance="bias")
    assert "model.sliding_window=8 with this model.moe (it would export as Ernie 4.5 MoE" in says


def test_a_refused_export_writes_nothing(dataset, tmp_path, capsys):
    """The command's own main(), in this process: exit 2, one line, no folder."""
    checkpoint, _ = moe_checkpoint(tmp_path, dataset, "model.moe.norm_topk=false")
    assert pretrain_main(["export", str(checkpoint), "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "to transformers: model.moe.norm_topk=false" in err, err
    assert not (tmp_path / "hf").exists()


def test_generate_and_eval_run_on_a_moe_checkpoint(dataset, tmp_path, capsys):
    """The commands' own main(), in this process."""
    checkpoint, _ = moe_checkpoint(tmp_path, dataset, "model.moe.shared_experts=1")
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "8", "--device", "cpu", "--seed", "1"]
    assert pretrain_main(["generate", str(checkpoint), *args]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    tasks = tmp_path / "choice.jsonl"
    lines = [{"query": f"Is {i} odd?", "choices": [" yes", " no"], "gold": 1 - i % 2} for i in range(4)]  # fmt: skip
    tasks.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = tmp_path / "report.json"
    assert (
        pretrain_main(["eval", str(checkpoint), "--tasks", str(tasks), "--out", str(report)]) == 0
    )
    scored = json.loads(report.read_text())
    assert scored["step"] == 1 and scored["tasks"]["choice"]["n"] == 4
