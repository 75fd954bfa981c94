"""A mixture-of-experts run's routing statistics where a user looks: wandb (each layer's as
flat keys), `pretrain status` (the latest imbalance, its worst layer, the bias range and
aux loss) and `pretrain plot` (imbalance per layer, aux and z losses), from a hand-written
metrics.jsonl, and from a real 10-step run of configs/tiny-moe.yaml (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch.status import format_status, run_status
from pretrain.tools.plot import plot_runs
from pretrain.train.metrics import MetricsSink, moe_fields, read_metrics, wandb_fields
from tests.helpers.runs import run_cli

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_API_KEY": ""}


def step(n: int, moe: list[list[float]] | None = None, layers=(1, 3)) -> dict:
    r = {"step": n, "loss": 8.0 - n / 10, "lr": 1e-3, "grad_norm": 1.0, "tokens": 512 * n,
         "tokens_per_s": 5000.0, "mfu": None, "mem_gb": 0.5, "step_s": 0.1, "time": 1e9 + n}  # fmt: skip
    if moe is not None:
        r.update(moe_fields(moe, list(layers)))
    return r


def write_run(path: Path, records: list[dict], name: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"run:\n  name: {name}\ntrain:\n  max_steps: 30\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Per step: per MoE layer (blocks 1 and 3) [imbalance, aux loss, z loss, bias range].
MOE = {
    10: [[3.5, 1.8, 4.0, 0.01], [2.0, 1.4, 3.0, 0.01]],
    20: [[1.6, 1.2, 3.5, 0.02], [2.2, 1.3, 2.5, 0.02]],
    30: [[1.25, 1.05, 3.0, 0.03], [1.4, 1.1, 2.0, 0.025]],
}


@pytest.fixture
def moe_run(tmp_path) -> Path:
    records = [{"event": "start", "step": 0}, *(step(n, m) for n, m in MOE.items())]
    records.append({"step": 30, "val_loss": 5.0, "eval_s": 0.1})
    return write_run(tmp_path / "moe", records, "moe")


@pytest.fixture
def dense_run(tmp_path) -> Path:
    records = [step(n) for n in (10, 20, 30)] + [{"step": 30, "val_loss": 5.5, "eval_s": 0.1}]
    return write_run(tmp_path / "dense", records, "dense")


def test_wandb_gets_each_moe_layer_as_flat_keys():
    fields = wandb_fields(step(30, MOE[30]))
    assert fields["moe/layer1/imbalance"] == 1.25 and fields["moe/layer3/imbalance"] == 1.4
    assert fields["moe/layer3/aux_loss"] == 1.1 and fields["moe/layer1/z_loss"] == 3.0
    assert fields["moe/layer3/bias_range"] == 0.025
    assert fields["moe_imbalance"] == 1.4 and fields["loss"] == 5.0
    assert "moe_layers" not in fields and "step" not in fields and "time" not in fields
    dense = wandb_fields(step(30))
    assert not any(k.startswith("moe") for k in dense) and dense["loss"] == 5.0


def test_metrics_sink_logs_moe_layers_to_offline_wandb_and_keeps_jsonl(tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    logging = SimpleNamespace(jsonl=True, wandb=True, wandb_mode="offline", wandb_project="t")
    cfg = SimpleNamespace(logging=logging, run=SimpleNamespace(name="moe-sink"))
    sink = MetricsSink(tmp_path, cfg, enabled=True, config_dict={})
    record = step(30, MOE[30])
    sink.write(record)
    sink.close()
    (written,) = read_metrics(tmp_path)
    assert written == record  # metrics.jsonl: the nested moe_layers, as it was
    assert set(written["moe_layers"]) == {"1", "3"}
    # wandb 0.31 offline writes protobuf records; the keys and values are in them as text.
    data = b"".join(p.read_bytes() for p in (tmp_path / "wandb").glob("offline-run-*/*.wandb"))
    for key in ("moe/layer1/imbalance", "moe/layer3/imbalance", "moe/layer3/bias_range"):
        assert key.encode() in data
    assert b"1.25" in data and b"moe_layers" not in data


def test_status_shows_the_latest_moe_routing(moe_run, dense_run):
    s = run_status(moe_run)
    assert s.moe == {"step": 30, "imbalance": 1.4, "worst_layer": 3, "bias_range": 0.03,
                     "aux_loss": pytest.approx(1.075)}  # fmt: skip
    line = next(ln for ln in format_status(s).splitlines() if ln.startswith("moe"))
    assert "imbalance 1.400 (worst block 3) at step 30" in line
    assert "bias range 0.0300" in line and "aux loss 1.0750" in line
    assert run_status(dense_run).moe is None
    assert not any(ln.startswith("moe") for ln in format_status(run_status(dense_run)).splitlines())


def test_status_leaves_out_a_bias_range_of_zero(tmp_path):
    run = write_run(tmp_path / "r", [step(5, [[2.0, 1.5, 3.0, 0.0]], layers=[0])], "none")
    line = next(ln for ln in format_status(run_status(run)).splitlines() if ln.startswith("moe"))
    assert "imbalance 2.000 (worst block 0) at step 5" in line
    assert "bias range" not in line and "aux loss 1.5000" in line


def test_plot_draws_moe_imbalance_per_layer_and_nothing_new_for_dense(moe_run, dense_run, tmp_path):  # fmt: skip
    import matplotlib.image

    summary = plot_runs([moe_run, dense_run], tmp_path / "both.png")
    drawn = summary["moe"]["moe"]
    assert drawn["x"] == [10, 20, 30]
    assert drawn["imbalance"] == {"1": [3.5, 1.6, 1.25], "3": [2.0, 2.2, 1.4]}
    assert drawn["aux_loss"] == pytest.approx([1.6, 1.25, 1.075])
    assert drawn["z_loss"] == pytest.approx([3.5, 3.0, 2.5])
    assert "moe" not in summary["dense"]
    both = matplotlib.image.imread(tmp_path / "both.png")

    dense = plot_runs([dense_run], tmp_path / "dense.png")
    assert "moe" not in dense["dense"]
    alone = matplotlib.image.imread(tmp_path / "dense.png")
    assert both.shape[0] > alone.shape[0] * 1.4  # a third row of panels, only with MoE


def test_plot_leaves_out_aux_and_z_losses_that_are_zero(tmp_path):
    run = write_run(tmp_path / "r", [step(n, [[1.5, 0.0, 0.0, 0.1]], [0]) for n in (1, 2)], "z")
    drawn = plot_runs([run], tmp_path / "p.png")["z"]["moe"]
    assert drawn["imbalance"] == {"0": [1.5, 1.5]}
    assert "aux_loss" not in drawn and "z_loss" not in drawn


@pytest.mark.slow
def test_a_real_tiny_moe_run_reaches_status_plot_and_wandb(tiny_overrides, tmp_path):
    """10 steps of configs/tiny-moe.yaml (the tests' tiny model: 2 blocks, both MoE),
    wandb offline."""
    r = run_cli("train", "configs/tiny-moe.yaml", *tiny_overrides, "train.max_steps=10",
                "checkpoint.every=10", "logging.wandb=true", env=OFFLINE)  # fmt: skip
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    steps = [x for x in read_metrics(run) if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 11))
    last = steps[-1]
    assert set(last["moe_layers"]) == {"0", "1"} and last["moe_imbalance"] >= 1
    assert last["moe_bias_range"] > 0  # balance: bias moved it

    status = run_cli("status", str(run))
    assert status.returncode == 0, status.stderr
    line = next(ln for ln in status.stdout.splitlines() if ln.startswith("moe"))
    assert f"imbalance {last['moe_imbalance']:.3f}" in line and "at step 10" in line

    drawn = plot_runs([run], tmp_path / "p.png")["tiny-moe-shakespeare"]["moe"]
    assert drawn["x"] == list(range(1, 11)) and set(drawn["imbalance"]) == {"0", "1"}
    data = b"".join(p.read_bytes() for p in (run / "wandb").glob("offline-run-*/*.wandb"))
    assert b"moe/layer0/imbalance" in data and b"moe/layer1/bias_range" in data
