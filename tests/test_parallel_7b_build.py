"""A 7B-shaped model (Llama-2 7B's layer shapes with grouped-query attention, only 2 of its
32 layers) built by fsdp and ZeRO-3 on 2 real ranks (torchrun, gloo, fp32): no rank ever
holds the whole model while it is built.

The whole model is 617M parameters, 2.47 GB in fp32. Each rank's peak resident memory
(Linux VmHWM, reset when setup starts) is measured while the strategy builds the model;
the ranks stop there (tests/helpers/parallel_ranks.py's `memory` check: no DeepSpeed engine
is made around the built model, which would cost a third of the run and is not measured).
Sharded from the start, a rank holds its half plus, for a moment, one whole weight being
initialised (the 32000 x 4096 output projection, 0.52 GB, drawn whole, then copied into
place): 2.06 GB for fsdp, 2.08 GB for ZeRO-3, about 0.84 of the whole model. ZeRO-3 used to
build the whole model on every rank before partitioning it: 3.05 GB (1.24) for the same
build, and at least the whole model on any number of ranks. (After the build, DeepSpeed's engine briefly holds the
partitions twice plus its gradient partitions, 1.5 of the whole model on 2 ranks, 3/N on
N: that part shrinks with the number of ranks, the whole-model build did not.)
"""

from __future__ import annotations

import pytest

from tests.helpers.runs import STRATEGIES
from tests.test_parallel_ranks import run_parallel_ranks

pytestmark = pytest.mark.torchrun

SEVEN_B_SHAPED = [
    "model.d_model=4096", "model.n_heads=32", "model.n_kv_heads=8", "model.mlp_hidden=11008",
    "model.vocab_size=32000", "model.tie_embeddings=false", "model.n_layers=2",
    "model.max_seq_len=64", "data.seq_len=64",
    "train.global_batch_size=4", "train.micro_batch_size=1",
]  # fmt: skip


@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_a_7b_shaped_model_is_never_whole_on_a_rank_while_it_is_built(tmp_path, name):
    # Freed memory goes back to the system at once (malloc keeps no tensor in its heap).
    malloc = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    ranks = run_parallel_ranks(
        tmp_path, ["memory"], *STRATEGIES[name], *SEVEN_B_SHAPED, env=malloc, timeout=600
    )
    for r in ranks:
        memory = r["memory"]
        assert memory["param_bytes"] > 2.4e9  # the whole model in fp32
        assert memory["build_peak"] < 0.9 * memory["param_bytes"], memory
