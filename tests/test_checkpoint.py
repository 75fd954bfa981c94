"""The atomic checkpoint protocol, on a real folder."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.ranks import file_owner
from tests.helpers.runs import REPO


def _writer(value: float):
    def write(folder):
        torch.save({"w": torch.full((4,), value)}, folder / "model.pt")

    return write


def _reader(box: dict):
    def read(folder):
        box.update(torch.load(folder / "model.pt"))

    return read


def test_save_then_load_round_trips_state_and_rng(tmp_path):
    ck = Checkpointer(tmp_path / "ck", keep_last=3)
    torch.manual_seed(7)
    random.seed(7)
    path = ck.save(10, {"step": 10, "data": {"epoch": 0, "sample_in_epoch": 160}}, _writer(1.5))
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    box: dict = {}
    state = ck.load(path, _reader(box))
    assert state == {"step": 10, "data": {"epoch": 0, "sample_in_epoch": 160}}
    assert torch.equal(box["w"], torch.full((4,), 1.5))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert json.loads((tmp_path / "ck/latest").read_text()) == {
        "checkpoint": "step_00000010",
        "step": 10,
    }


def test_keep_last_prunes_oldest_complete(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in (5, 10, 15):
        ck.save(step, {"step": step}, _writer(step))
    assert [p.name for p in ck.complete_checkpoints()] == ["step_00000015", "step_00000010"]
    assert not list(tmp_path.glob(".t*"))


def test_interrupted_save_is_never_loaded_and_is_cleaned(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(5, {"step": 5}, _writer(5))
    # A save killed mid-write leaves a .tmp- folder with partial files and no manifest.
    partial = tmp_path / ".tmp-step_00000010"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"\0" * 10)
    assert ck.latest().name == "step_00000005"
    Checkpointer(tmp_path, keep_last=3)  # the next start cleans it
    assert not partial.exists()


def test_damaged_checkpoint_falls_back_to_previous(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(5, {"step": 5}, _writer(5))
    newest = ck.save(10, {"step": 10}, _writer(10))
    with open(newest / "model.pt", "r+b") as f:  # truncated on disk after the commit
        f.truncate(5)
    assert ck.latest().name == "step_00000005"
    (newest / "model.pt").unlink()
    assert ck.latest().name == "step_00000005"


def test_checkpoint_without_manifest_is_not_complete(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=3)
    path = ck.save(5, {"step": 5}, _writer(5))
    (path / "manifest.json").unlink()
    assert ck.latest() is None


def test_a_background_write_is_visible_only_once_committed(tmp_path):
    from concurrent.futures import Future

    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(5, {"step": 5}, _writer(5))
    future: Future = Future()

    def write_later(folder):
        _writer(10)(folder)
        return future

    ck.save(10, {"step": 10}, write_later)
    assert ck.latest().name == "step_00000005"  # still being written: not a checkpoint yet
    future.set_result(None)
    assert ck.wait().name == "step_00000010"
    assert ck.latest().name == "step_00000010" and ck.wait() is None


def test_a_failed_background_write_is_never_committed(tmp_path):
    from concurrent.futures import Future

    ck = Checkpointer(tmp_path, keep_last=3)
    ck.save(5, {"step": 5}, _writer(5))
    future: Future = Future()
    ck.save(10, {"step": 10}, lambda folder: future)
    future.set_exception(OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        ck.wait()
    assert [p.name for p in ck.complete_checkpoints()] == ["step_00000005"]
    Checkpointer(tmp_path, keep_last=3)  # the next start clears the half-written folder
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("name", "rank"),
    [
        ("__3_0.distcp", 3),  # DCP: a rank's shard (ddp, fsdp, single)
        ("__12_1.distcp", 12),
        (".metadata", 0),  # DCP's coordinator
        ("rng_rank7.pt", 7),
        ("zero/zero_pp_rank_5_mp_rank_00_optim_states.pt", 5),  # ZeRO 1/2/3
        ("zero/zero_pp_rank_5_mp_rank_00_model_states.pt", 5),  # ZeRO 3
        ("zero/bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt", 2),
        ("zero/mp_rank_00_model_states.pt", 0),  # ZeRO 1/2: written by rank 0
        ("zero_to_fp32.py", 0),
        ("train_state.json", 0),
        ("config.yaml", 0),
        ("zero.json", 0),
    ],
)
def test_file_owner_names_the_rank_that_writes_a_file(name, rank):
    assert file_owner(name) == rank


def test_a_single_process_checkpoint_lists_every_file_once_made_durable(tmp_path, monkeypatch):
    """The single strategy's real DCP files, and a file no naming rule knows: all in the
    manifest with their sizes, each fsynced once."""
    from pretrain import iotrace
    from pretrain.config.load import load_config
    from pretrain.parallel import build_strategy

    monkeypatch.setenv(iotrace.ENV, str(tmp_path))
    overrides = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1"]
    strategy = build_strategy(load_config(REPO / "configs/tiny.yaml", overrides))
    strategy.setup()

    def write(folder):
        strategy.save(folder)
        (folder / "extra").mkdir()
        (folder / "extra" / "blob.bin").write_bytes(b"x" * 7)

    path = Checkpointer(tmp_path / "ck", keep_last=1).save(
        1, {"step": 1}, write, {"config.yaml": "a: 1\n"}
    )
    files = json.loads((path / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    assert on_disk.pop("manifest.json") and files == on_disk
    assert {".metadata", "__0_0.distcp", "rng_rank0.pt", "extra/blob.bin"} <= set(files)
    fsynced = Counter(r["what"] for r in iotrace.read(tmp_path) if r["kind"] == iotrace.FSYNC)
    tmp = tmp_path / "ck" / ".tmp-step_00000001"
    assert all(fsynced[str(tmp / name)] == 1 for name in files)
