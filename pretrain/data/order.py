"""The run's global sample order: `num_canonical_nodes`, chosen once and recorded in the run.

mosaicml-streaming orders an epoch's samples by `shuffle_seed` and `num_canonical_nodes`,
not by the number of ranks, so a run resumes on another number of nodes with the same
global batches, as long as that number stays the same for the run. It must also fit the
physical node count: streaming's partitioning (streaming/base/partition/orig.py) refuses
to start unless one of num_canonical_nodes and the node count divides the other.

So with `data.num_canonical_nodes` unset (None), global rank 0 chooses it at the run's
first start, from the node count (WORLD_SIZE // LOCAL_WORLD_SIZE) or, for an elastic job
(`pretrain launch --nnodes MIN:MAX` exports PRETRAIN_NNODES_RANGE=MIN:MAX), the least
common multiple of every count in the range, so that the job can lose or regain nodes and
still start. The choice is written to RUN_DIR/data_order.json, and every later start uses
it, whatever its node count. An explicit `data.num_canonical_nodes` is used as is (and
recorded at the first start, so dropping the override later keeps the order). The file
is read and written by `pretrain.rundir.RunDir`, which also keeps the value of a run made
before the file existed.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from pretrain.rundir import RunDir

log = logging.getLogger("pretrain")
NNODES_RANGE_ENV = "PRETRAIN_NNODES_RANGE"
# Above this the range's least common multiple is not worth it (it grows like e^MAX):
# 1 divides every node count, at the cost of every node reading from every shard.
MAX_CHOSEN = 4096


def node_count(env: dict | None = None) -> int:
    """Physical nodes of this job, as streaming counts them."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    per_node = int(env.get("LOCAL_WORLD_SIZE", world))
    return max(1, world // max(1, per_node))


def nnodes_range(env: dict | None = None) -> tuple[int, int] | None:
    """(MIN, MAX) from PRETRAIN_NNODES_RANGE, or None when unset or unreadable."""
    text = (os.environ if env is None else env).get(NNODES_RANGE_ENV, "")
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        if text:
            log.warning("ignoring %s=%r (expected MIN:MAX)", NNODES_RANGE_ENV, text)
        return None
    return (low, high) if 1 <= low <= high else None


def choose(nodes: int, elastic: tuple[int, int] | None = None) -> int:
    """num_canonical_nodes that streaming accepts at `nodes` and at every count in `elastic`."""
    counts = {nodes} | (set(range(elastic[0], elastic[1] + 1)) if elastic else set())
    if len(counts) == 1:
        return nodes
    value = math.lcm(*counts)
    if value > MAX_CHOSEN:
        log.warning(
            "node counts %d..%d have no common multiple up to %d: data.num_canonical_nodes=1 "
            "(every node reads from every shard); set data.num_canonical_nodes to choose",
            min(counts),
            max(counts),
            MAX_CHOSEN,
        )
        return 1
    return value


def recorded(run_dir: Path) -> int | None:
    """The value recorded in the run directory, if any."""
    return RunDir(run_dir).recorded_data_order()


def resolve(explicit: int | None, run_dir: Path, env: dict | None = None) -> tuple[int, str]:
    """(num_canonical_nodes, why) for this start; records a first choice. Global rank 0 only."""
    before = recorded(run_dir)
    if explicit is not None:
        if before is not None and before != explicit:
            log.warning(
                "data.num_canonical_nodes=%d differs from the %d recorded in %s: a run resumed "
                "from a checkpoint keeps the checkpoint's sample order",
                explicit,
                before,
                RunDir.data_order.name,
            )
        value, why = explicit, "data.num_canonical_nodes"
    elif before is not None:
        return before, f"recorded in {RunDir.data_order.name} at the run's first start"
    else:
        nodes, elastic = node_count(env), nnodes_range(env)
        value = choose(nodes, elastic)
        why = (
            f"for {elastic[0]}..{elastic[1]} nodes ({NNODES_RANGE_ENV})"
            if elastic and elastic[0] != elastic[1]
            else f"for {nodes} node(s)"
        )
    if before is None:
        RunDir(run_dir).record_data_order(value, why)
    return value, why
