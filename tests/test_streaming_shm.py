"""`pretrain.data.shm`: a rank that is not its node's leader finds the shared-memory prefix its
leader registered, while other runs' datasets come and go on the node (streaming 0.13 counted
the prefixes again and failed with "prefix=N was not registered by local leader")."""

from __future__ import annotations

import pytest

from pretrain.data import shm
from pretrain.data.streaming_compat import streaming_module

pytestmark = pytest.mark.skipif(not shm.SHM_DIR.is_dir(), reason="no /dev/shm on this machine")


def world(leader: bool):
    from streaming.base.world import World

    return World(num_nodes=1, ranks_per_node=2, workers_per_rank=1, worker=0 if leader else 1)


def test_a_non_leader_finds_its_leaders_prefix_while_other_runs_come_and_go(tmp_path) -> None:
    streaming_module()
    import streaming.base.dataset as dataset_module

    ours, gone, new = ([str(tmp_path / run / "train")] for run in ("ours", "gone", "new"))
    segments = []
    with shm.registering_in_turn():
        lookup = dataset_module.get_shm_prefix  # what StreamingDataset.__init__ calls
        try:
            # Another run's dataset holds a prefix below the one our leader registers...
            segments.append(lookup(gone, [None], world(leader=True))[1])
            prefix, leader_segment = lookup(ours, [None], world(leader=True))
            segments.append(leader_segment)
            # ...then ends, and a third run's dataset starts, before our other rank looks.
            segments.pop(0).cleanup()
            segments.append(lookup(new, [None], world(leader=True))[1])
            found, segment = lookup(ours, [None], world(leader=False))
            segments.append(segment)
            assert bytes(segment.buf) == bytes(leader_segment.buf)  # what our leader wrote
        finally:
            for segment in segments:
                segment.cleanup()
    assert found == prefix


def test_a_non_leader_without_its_leader_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(
        RuntimeError, match=r"no shared memory in /dev/shm registers .*LOCAL_RANK 0"
    ):
        shm.get_shm_prefix([str(tmp_path / "train")], [None], world(leader=False))
