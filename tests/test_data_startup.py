"""Start-up work that global rank 0 does once and sends to every rank, instead of every rank
reading shared files itself (the 2-rank behaviour: tests/test_data_cluster.py)."""

from __future__ import annotations

import pickle
import shutil
import time

from pretrain.checkpoint.ranks import _poll
from pretrain.data.tokenizer import Tokenizer


def test_a_tokenizer_travels_with_its_model_and_needs_no_file_where_it_arrives(dataset, tmp_path):
    path = tmp_path / "tok.model"
    shutil.copy(dataset["tokenizer"], path)
    sent = pickle.dumps(Tokenizer(path))  # as rank 0 broadcasts it
    path.unlink()  # the other ranks never open it
    got = pickle.loads(sent)
    assert got.path == path and got.sha256 == Tokenizer(dataset["tokenizer"]).sha256
    assert got.decode(got.encode("To be, or not to be")) == "To be, or not to be"


def test_a_wait_gives_up_only_once_the_awaited_rank_stops_making_progress():
    """The one store-polling rule (checkpoint transfers, rank 0's start-up checks): with a
    progress counter, the patience counts from its last change."""
    start = time.monotonic()
    beats = lambda: min(int((time.monotonic() - start) / 0.05), 6)  # noqa: E731 - 0.3 s of beats
    assert not _poll(lambda: False, 0.2, beats)
    assert time.monotonic() - start >= 0.45  # the last beat (0.3 s) + the patience (0.2 s)
    start = time.monotonic()
    assert not _poll(lambda: False, 0.2)
    assert time.monotonic() - start < 0.45
    assert _poll(lambda: time.monotonic() - start > 0.25, 0.2, beats)
