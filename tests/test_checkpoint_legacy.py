"""Checkpoints of the earlier fused q/k/v layout (one `attn.qkv` per layer, its rows q, then
k, then v; pretrain/checkpoint/legacy.py) still resume, export and generate, as the same
checkpoint saved in the split layout does. The fused checkpoints are made here, from the
state of a model trained two steps (`fused_layout`); fsdp, hsdp and ddp load a sharded one
on 2 ranks (tests/helpers/checkpoint_ranks.py)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pretrain.checkpoint.legacy import FusedQKVLoadPlanner, fused_qkv_planner
from pretrain.config.load import load_config, to_yaml
from pretrain.parallel import build_strategy
from tests.helpers.checkpoint_ranks import TINY, fused_layout
from tests.helpers.runs import REPO, run_torchrun

# Biases, and one kv head: q is 64 rows of the fused 96, k and v 16 each.
MODEL = [*TINY, "model.bias=true", "model.n_kv_heads=1"]


def built(dataset, *extra: str):
    cfg = load_config(REPO / "configs/tiny.yaml", [*MODEL, f"data.tokenizer={dataset['tokenizer']}", *extra])  # fmt: skip
    strategy = build_strategy(cfg)
    strategy.setup()
    return strategy


def train_step(strategy, tokens: torch.Tensor) -> float:
    loss = strategy.forward(tokens[:, :-1], tokens[:, 1:])
    strategy.backward(loss)
    strategy.step(1.0)
    return loss.item()


def flat(state: dict) -> dict:
    """Every tensor of a {"model", "optim"} state by one name, and the param groups."""
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for key, states in state["optim"]["state"].items():
        out |= {f"optim.{key}.{k}": v for k, v in states.items()}
    return {**out, "groups": state["optim"]["param_groups"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, dataset) -> dict:
    """A model trained two steps, saved in both layouts (each folder with its config.yaml),
    its state then, and the losses of two more steps."""
    root = tmp_path_factory.mktemp("layouts")
    strategy = built(dataset)
    tokens = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        train_step(strategy, tokens)
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in flat(strategy.checkpoint_state()).items()}  # fmt: skip
    for name in ("split", "fused"):
        (root / name).mkdir()
        (root / name / "config.yaml").write_text(to_yaml(strategy.cfg))
    strategy.save(root / "split")
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(fused_layout(strategy.checkpoint_state()), checkpoint_id=root / "fused")
    losses = [train_step(strategy, tokens) for _ in range(2)]
    return {"root": root, "state": state, "tokens": tokens, "losses": losses}


def test_the_fused_checkpoint_is_of_the_earlier_layout(saved):
    keys = dcp.FileSystemReader(str(saved["root"] / "fused")).read_metadata().state_dict_metadata
    assert "model.layers.1.attn.qkv.bias" in keys and "model.layers.1.attn.q_proj.bias" not in keys
    assert keys["model.layers.0.attn.qkv.weight"].size == torch.Size([96, 64])
    assert "optim.state.layers.0.attn.qkv.weight.exp_avg_sq" in keys
    assert isinstance(fused_qkv_planner(saved["root"] / "fused"), FusedQKVLoadPlanner)
    assert fused_qkv_planner(saved["root"] / "split") is None  # DCP's own load, unchanged


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_the_fused_layout_resumes_with_the_same_weights_moments_and_losses(saved, dataset, layout):
    resumed = built(dataset)
    resumed.load(saved["root"] / layout)
    state = flat(resumed.checkpoint_state())
    assert state.keys() == saved["state"].keys()
    assert state.pop("groups") == saved["state"]["groups"]  # the split names, the same lrs
    different = [k for k, v in state.items() if not torch.equal(v, saved["state"][k])]
    assert different == []
    assert float(state["optim.layers.1.attn.v_proj.weight.step"]) == 2.0
    assert state["optim.layers.0.attn.k_proj.bias.exp_avg"].abs().sum() > 0
    assert [train_step(resumed, saved["tokens"]) for _ in range(2)] == saved["losses"]


def test_a_fused_checkpoint_of_another_head_layout_is_refused(saved, dataset):
    other = built(dataset, "model.n_kv_heads=2")  # q 64, k 32, v 32 rows: not 96
    # DCP raises the ranks' errors as a CheckpointException, a BaseException
    with pytest.raises(BaseException, match=r"does not split into this model's q/k/v rows"):
        other.load(saved["root"] / "fused")


def test_the_fused_layout_exports_as_the_split_one(saved, tmp_path):
    from safetensors.torch import load_file

    from pretrain.tools.export import export_hf

    exports = {}
    for layout in ("fused", "split"):
        export_hf(saved["root"] / layout, tmp_path / layout)
        exports[layout] = load_file(tmp_path / layout / "model.safetensors")
    fused, split = exports["fused"], exports["split"]
    assert fused.keys() == split.keys()
    assert {"model.layers.1.self_attn.k_proj.bias", "model.layers.0.self_attn.v_proj.weight"} <= set(split)  # fmt: skip
    assert all(torch.equal(fused[k], split[k]) for k in split)
    q = saved["state"]["model.layers.1.attn.q_proj.weight"]
    assert torch.equal(fused["model.layers.1.self_attn.q_proj.weight"], q)
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 1)


def test_generate_and_eval_load_the_fused_layout(saved):
    from pretrain.tools.generate import generate, load_model

    models = {layout: load_model(saved["root"] / layout)[0] for layout in ("fused", "split")}
    fused, split = models["fused"].state_dict(), models["split"].state_dict()
    assert fused.keys() == split.keys() and all(torch.equal(fused[k], split[k]) for k in split)
    assert torch.equal(fused["layers.0.attn.v_proj.weight"], saved["state"]["model.layers.0.attn.v_proj.weight"])  # fmt: skip
    prompt = saved["tokens"][0, :8].tolist()
    runs = [generate(m, prompt, max_new_tokens=6, temperature=0) for m in models.values()]
    assert runs[0] == runs[1] and len(runs[0]) == 6


@pytest.mark.torchrun
def test_fsdp_hsdp_and_ddp_resume_from_a_sharded_fused_checkpoint(tmp_path):
    """2 ranks: the fused checkpoint is sharded 48/48 rows (q spans both shards); each rank
    reads its rows of q, k and v into its shards (fsdp) or whole copies (hsdp, ddp)."""
    out = tmp_path / "out"
    out.mkdir()
    run_torchrun(2, "tests/helpers/checkpoint_ranks.py", "fused", out, tmp_path / "root")
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        for name, q_rows in (("fsdp", 32), ("hsdp", 64), ("ddp", 64)):
            assert report[name] == {"keys": True, "different": [], "groups": True, "q_rows": q_rows}
    files = {p.name for p in (tmp_path / "root" / "fused").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp"} <= files  # written by both ranks
