"""The config schema: every shipped file loads, typos and bad values are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pretrain.config.load import from_dict, load_config, to_dict
from pretrain.config.schema import Config
from pretrain.errors import ConfigError
from tests.helpers.runs import REPO, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "125m.yaml", "350m.yaml", "1.3b.yaml", "7b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.run.dir == f"runs/{cfg.run.name}"  # interpolation resolved
    assert from_dict(to_dict(cfg)) == cfg  # survives the run directory's round trip


@pytest.mark.parametrize(
    ("name", "params_b"),
    [("125m.yaml", 0.125), ("350m.yaml", 0.35), ("1.3b.yaml", 1.3), ("7b.yaml", 6.7)],
)
def test_size_configs_have_their_advertised_size(name, params_b):
    from pretrain.model import count_params

    n = count_params(load_config(REPO / "configs" / name).model)
    assert abs(n / 1e9 - params_b) / params_b < 0.2, n


def test_overrides_beat_yaml(tmp_path):
    cfg = load_config(
        REPO / "configs/tiny.yaml", ["optim.lr=1e-3", "model.n_layers=3", "run.name=x"]
    )
    assert cfg.optim.lr == 1e-3 and cfg.model.n_layers == 3 and cfg.run.dir == "runs/x"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("model:\n  d_modle: 128\n", "unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
        ("optim:\n  lrr: 1\n", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("modle:\n  d_model: 1\n", "unknown key 'modle' (did you mean 'model'?)"),
        (
            "data:\n  streams:\n    - remote: x\n      proportoin: 1\n",
            "'data.streams[0].proportoin'",
        ),
        ("model:\n  d_model: big\n", "model.d_model"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("model: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.d_model=100", "model.d_model (100) must be divisible by model.n_heads (6)"),
        ("model.n_kv_heads=4", "model.n_heads (6) must be divisible by model.n_kv_heads (4)"),
        ("optim.lr=-1", "optim.lr must be > 0 (got -1.0)"),
        ("optim.beta2=1.5", "optim.beta2 must be in [0, 1)"),
        ("data.seq_len=512", "data.seq_len (512) exceeds model.max_seq_len (256)"),
        ("train.global_batch_size=20", "must be a multiple of train.micro_batch_size (16)"),
        ("model.position=rotary", "model.position must be one of rope, alibi, learned"),
        ("schedule.name=cosin", "(did you mean 'cosine'?)"),
        ("model.rope_scale=0.5", "model.rope_scale must be >= 1"),
        ("model.sliding_window=0", "model.sliding_window must be > 0"),
        ("parallel.strategy=fsdpp", "parallel.strategy must be one of"),
        ("train.max_steps=0", "train.max_steps must be > 0"),
        ("checkpoint.remote=/mnt/ckpts", "checkpoint.remote must be an s3://bucket/prefix URL"),
    ],
)
def test_impossible_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/tiny.yaml", [override])
    assert expected in str(err.value)


def test_async_save_is_refused_for_deepspeed():
    overrides = ["parallel.strategy=zero", "checkpoint.async_save=true"]
    with pytest.raises(ConfigError, match=r"checkpoint\.async_save works with parallel\.strategy"):
        load_config(REPO / "configs/tiny.yaml", overrides)


def test_missing_mandatory_key_is_named(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("run:\n  name: x\n")
    with pytest.raises(ConfigError, match=r"^data.tokenizer is required: set it in the YAML"):
        load_config(path)


def test_learned_positions_message_mentions_the_table():
    with pytest.raises(ConfigError, match="learned position table"):
        load_config(REPO / "configs/tiny.yaml", ["model.position=learned", "data.seq_len=512"])


@pytest.mark.slow
def test_cli_typo_is_one_line_exit_2_no_traceback():
    r = run_cli("train", "configs/tiny.yaml", "optim.lrr=1e-3")
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "config error: command line: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    )
    assert "Traceback" not in r.stderr + r.stdout


def test_cli_config_prints_resolved_config():
    r = run_cli("config", "configs/tiny.yaml", "run.name=demo2", "model.n_layers=3")
    assert r.returncode == 0, r.stderr
    printed = from_dict(__import__("yaml").safe_load(r.stdout))
    assert printed.run.dir == "runs/demo2" and printed.model.n_layers == 3


def test_cli_missing_file():
    r = run_cli("config", "configs/nope.yaml")
    assert (
        r.returncode == 2
        and r.stderr.strip() == "config error: config file not found: configs/nope.yaml"
    )


def test_resume_may_change_how_a_run_executes_but_not_what_it_computes(tmp_path):
    from pretrain.config.load import to_yaml
    from pretrain.rundir import check_same_experiment

    saved = tmp_path / "config.yaml"
    base = load_config(REPO / "configs/tiny.yaml")
    old = yaml.safe_load(to_yaml(base))
    del old["parallel"]["device"]  # a run directory from before the key existed
    saved.write_text(yaml.safe_dump(old))
    for key in ("parallel.loss_chunk_tokens=512", "parallel.device=cpu", "parallel.threads=1"):
        check_same_experiment(load_config(REPO / "configs/tiny.yaml", [key]), saved)
    with pytest.raises(ConfigError, match=r"parallel\.strategy"):
        check_same_experiment(
            load_config(REPO / "configs/tiny.yaml", ["parallel.strategy=ddp"]), saved
        )


def test_renamed_stream_key_still_loads_with_a_warning(tmp_path, caplog):
    """`data.streams[].remote` became `path`: old YAML, overrides and saved run configs load."""
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  tokenizer: t.model\n  streams:\n    - remote: data/mds\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(old)
    assert cfg.data.streams[0].path == "data/mds"
    assert "'data.streams[0].remote' is deprecated: call it 'data.streams[0].path'" in caplog.text
    assert load_config(None, ["data.tokenizer=t", "data.val_streams=[{remote: v}]"]).data.val_streams[0].path == "v"  # fmt: skip
    saved = to_dict(cfg)
    saved["data"]["streams"][0] = {"remote": "data/mds", "local": None}  # a pre-rename config.yaml
    assert from_dict(saved) == cfg
    both = tmp_path / "both.yaml"
    both.write_text("data:\n  tokenizer: t.model\n  streams:\n    - {remote: a, path: b}\n")
    with pytest.raises(ConfigError, match=r"'data.streams\[0\].remote' and 'data.streams\[0\].path' both given"):  # fmt: skip
        load_config(both)
