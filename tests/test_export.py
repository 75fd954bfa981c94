"""`pretrain export --hf`: transformers loads the export and reproduces our logits, for the
demo model's architecture, a 2-rank sharded checkpoint and a multi-file export; models
transformers cannot represent are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.errors import ConfigError
from pretrain.model.config import ModelConfig
from pretrain.tools.export import export_hf, hf_config
from pretrain.tools.generate import load_model
from tests.helpers.runs import run_cli, with_overrides

transformers = pytest.importorskip("transformers")


def assert_same_logits(run_or_checkpoint: Path, export: Path) -> None:
    ours, cfg = load_model(run_or_checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    theirs.eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.max_seq_len),
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits
    assert a.shape == b.shape
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_the_demo_model_exports_and_transformers_reproduces_its_logits(
    tiny_overrides, dataset, tmp_path
):
    """configs/tiny.yaml's model (d_model 192, 4 layers, 6 query / 2 kv heads, tied
    embeddings), trained a few steps on the test data, through the real CLI."""
    run = tmp_path / "run"
    r = run_cli("train", "configs/tiny.yaml", f"run.dir={run}", f"data.tokenizer={dataset['tokenizer']}",
                f"data.streams=[{{path: {dataset['mds']}}}]", "data.seq_len=64",
                "model.vocab_size=512", "model.max_seq_len=64", "train.max_steps=3",
                "train.micro_batch_size=8", "train.eval_every=3", "checkpoint.every=3",
                "eval.every=0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hf"
    r = run_cli("export", str(run), "--hf", str(out))
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (6, 2)
    assert config["tie_word_embeddings"] is True
    assert_same_logits(run, out)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    from pretrain.data.tokenizer import Tokenizer

    ours = Tokenizer(dataset["tokenizer"])
    text = "  To be, or not to be: that is the question.\n\tWhat's 1234 + ünïcödé? 🙂"
    assert tok.encode(text) == ours.encode(text)
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.torchrun
def test_a_sharded_checkpoint_exports_to_several_files(tiny_overrides, tmp_path, reference):
    """The 2-rank FSDP reference run's sharded checkpoint, untied embeddings and biases
    are not needed: written as 3+ safetensors files with an index."""
    run = reference("fsdp", tiny_overrides)
    out = tmp_path / "hf"
    files = export_hf(run, out, max_shard_bytes=100_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json") in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert_same_logits(run, out)


@pytest.mark.slow
def test_biases_untied_head_and_rope_scaling_export(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = with_overrides(tiny_overrides, "model.bias=true", "model.tie_embeddings=false",
                               "model.rope_scale=2.0", "train.max_steps=2", "checkpoint.every=2")  # fmt: skip
    r = run_cli("train", "configs/tiny.yaml", *overrides)
    assert r.returncode == 0, r.stderr
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["attention_bias"] and config["rope_scaling"]["factor"] == 2.0
    assert_same_logits(run, tmp_path / "hf")


def test_what_transformers_cannot_represent_is_refused():
    for change, says in [
        ({"position": "alibi"}, "model.position=alibi"),
        ({"position": "learned"}, "model.position=learned"),
        ({"norm": "layernorm"}, "model.norm=layernorm"),
        ({"mlp": "gelu"}, "model.mlp=gelu"),
        ({"sliding_window": 8, "bias": True}, "has no biases"),
    ]:
        with pytest.raises(ConfigError, match=says):
            hf_config(ModelConfig(**change), torch.float32, 1, 2)


@pytest.mark.slow
def test_a_sliding_window_model_exports_as_mistral(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = with_overrides(tiny_overrides, "model.sliding_window=8", "train.max_steps=2",
                               "checkpoint.every=2")  # fmt: skip
    r = run_cli("train", "configs/tiny.yaml", *overrides)
    assert r.returncode == 0, r.stderr
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["sliding_window"] == 8
    assert_same_logits(run, tmp_path / "hf")  # 64 positions: the window matters


def test_export_refuses_what_is_not_a_checkpoint(tmp_path):
    r = run_cli("export", str(tmp_path), "--hf", str(tmp_path / "out"))
    assert r.returncode == 2 and "neither a checkpoint folder" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
