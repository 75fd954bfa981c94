"""`pretrain plot`: loss curves of synthetic runs (resumed, killed mid-line) to a real PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pretrain.errors import ConfigError
from pretrain.tools.plot import main, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train(step: int, loss: float, batch_tokens: int = 1024) -> dict:
    return {
        "step": step,
        "loss": loss,
        "lr": 1e-3 * min(1.0, step / 4),
        "grad_norm": 1.0,
        "tokens": step * batch_tokens,
        "tokens_per_s": 5000.0 + 10 * step,
        "mfu": 0.1,
        "mem_gb": 0.5,
        "time": 1000.0 + step,
        "step_s": 0.2,
    }


def write_run(path: Path, name: str | None, lines: list, tail: str = "") -> Path:
    path.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in lines) + tail
    (path / "metrics.jsonl").write_text(text)
    if name is not None:
        (path / "config.yaml").write_text(f"run:\n  name: {name}\n  dir: {path}\n")
    return path


@pytest.fixture
def runs(tmp_path):
    """Run `a` resumed from a step-4 checkpoint (steps 5-6 and the step-6 eval re-logged with
    other values); run `b` with twice the batch, killed in the middle of its last line."""
    a = [{"event": "start", "step": 0}]
    a += [train(s, 10.0 - s) for s in range(1, 7)]
    a += [{"step": 4, "val_loss": 6.5, "eval_s": 0.1}, {"step": 6, "val_loss": 4.9, "eval_s": 0.1}]
    a += [{"event": "preempted", "step": 6}, {"event": "resume", "step": 4}]
    a += [train(5, 4.25), train(6, 3.75), {"step": 6, "val_loss": 3.5, "eval_s": 0.1}]
    a += [train(s, 10.0 - s - 0.5) for s in range(7, 9)]
    b = [{"event": "start", "step": 0}, *[train(s, 8.0 - 0.5 * s, 2048) for s in range(1, 9)]]
    b += [{"step": 8, "val_loss": 4.2, "eval_s": 0.1}]
    tail = json.dumps(train(9, 0.5, 2048))[:40]  # a kill mid-write: no closing brace
    return write_run(tmp_path / "ra", "a", a), write_run(tmp_path / "rb", "b", b, tail)


def pixels_near(image: np.ndarray, hex_color: str, tol: float = 0.08) -> int:
    rgb = np.array([int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < tol).sum())


def test_plot_draws_the_last_record_of_each_step_of_every_run(runs, tmp_path, capsys):
    import matplotlib.image

    ra, rb = runs
    out = tmp_path / "figs" / "nested" / "loss.png"  # the parent folders do not exist yet
    assert main([str(ra), str(rb), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: 2 runs (a, b)"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temp file left
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 500 and image.shape[1] > 800

    summary = plot_runs([ra, rb], tmp_path / "again.png")
    assert list(summary) == ["a", "b"]
    a, b = summary["a"], summary["b"]
    assert (a["train"], a["val"]) == (8, 2)  # steps 5, 6 and the step-6 eval counted once
    assert (b["train"], b["val"]) == (8, 1)  # the cut-short step 9 skipped
    assert a["x"] == list(range(1, 9)) and b["x"] == list(range(1, 9))
    assert a["loss"][4:6] == [4.25, 3.75]  # the re-logged values, not 5.0 and 4.0
    assert a["loss"][:4] == [9.0, 8.0, 7.0, 6.0] and a["loss"][6:] == [2.5, 1.5]
    assert b["loss"] == [8.0 - 0.5 * s for s in range(1, 9)]
    assert (a["val_x"], a["val_loss"]) == ([4.0, 6.0], [6.5, 3.5])
    assert (b["val_x"], b["val_loss"]) == ([8.0], [4.2])

    assert a["color"] != b["color"]
    counts = [pixels_near(image, run["color"]) for run in (a, b)]
    assert min(counts) > 300, counts  # far more than the legend's short sample lines


def test_x_tokens_puts_the_runs_on_tokens_trained(runs, tmp_path):
    ra, rb = runs
    summary = plot_runs([ra, rb], tmp_path / "tok.svg", x="tokens")
    assert summary["a"]["x"] == [1024.0 * s for s in range(1, 9)]
    assert summary["b"]["x"] == [2048.0 * s for s in range(1, 9)]
    assert summary["a"]["val_x"] == [4096.0, 6144.0]  # tokens of the step each eval followed
    assert (tmp_path / "tok.svg").read_text().lstrip().startswith("<?xml")


def test_labels_fall_back_to_the_folder_and_are_made_unique(tmp_path):
    lines = [train(s, 5.0 / s) for s in range(1, 4)]
    one = write_run(tmp_path / "x" / "one", "same", lines)
    two = write_run(tmp_path / "y" / "two", "same", lines)
    bare = write_run(tmp_path / "bare", None, lines)
    summary = plot_runs([one, two, bare], tmp_path / "l.png")
    assert list(summary) == ["same (one)", "same (two)", "bare"]
    assert len({s["color"] for s in summary.values()}) == 3
    summary = plot_runs([one, two], tmp_path / "l.png", labels=["lr=1e-3", "lr=3e-3"])
    assert list(summary) == ["lr=1e-3", "lr=3e-3"]
    with pytest.raises(ConfigError, match="unique labels"):
        plot_runs([one, two], tmp_path / "l.png", labels=["x", "x"])


def test_bad_input_is_a_config_error(runs, tmp_path):
    ra, _ = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    events_only = write_run(tmp_path / "events", "e", [{"event": "start", "step": 0}])
    events_only.joinpath("metrics.jsonl").write_text('{"event": "start", "step": 0}\n{"step": 1')
    for bad in (empty, events_only, tmp_path / "missing"):
        with pytest.raises(ConfigError, match=r"no training metrics \(metrics.jsonl\) to plot"):
            main([str(ra), str(bad), "--out", str(tmp_path / "o.png")])
        assert not (tmp_path / "o.png").exists()
    with pytest.raises(ConfigError, match=r"loss\.jpg"):
        main([str(ra), "--out", str(tmp_path / "loss.jpg")])
    with pytest.raises(SystemExit):  # argparse: --out is required
        main([str(ra)])


def test_the_pretrain_plot_and_plan_commands(runs, tmp_path):
    """The real CLI: `pretrain plot A B --out F.png`, and `pretrain plan` (wiring only)."""
    from tests.helpers.runs import run_cli

    out = tmp_path / "cli.png"
    r = run_cli("plot", *map(str, runs), "--out", str(out))
    assert r.returncode == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stderr
    assert r.stdout.startswith(f"{out}: 2 runs")
    r = run_cli("plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and r.stderr.startswith("config error:"), r.stderr
    r = run_cli("plan", "--flops", "5.76e23")
    assert r.returncode == 0 and "40.4B" in r.stdout, r.stdout + r.stderr
