"""Tensor + sequence parallelism: the plan of which module is split how over the `tp` ranks.

This is the one place that names the model's modules for tensor parallelism. Megatron's
layout, with torch's DTensor styles (`parallelize_module`), as torchtitan applies it:

- each block's attention and MLP: the projections that widen (q, k, v; MLP gate/up) are
  split by output rows (column-parallel: whole query heads with their kv heads on each rank,
  `Attention.shard_heads`), the ones that narrow (attention out, MLP down) by input columns
  (row-parallel), so a block needs one gather of its input and one reduce-scatter of its
  output, and nothing in between;
- sequence parallelism between them: the norms and the residual stream hold 1/tp of the
  sequence (Shard(1)), so activations outside attention and MLP are split too;
- the embedding is split over the vocabulary (each rank looks up its rows, the partial sums
  are reduce-scattered into sequence shards); the final norm's output is gathered whole,
  and the output head is split over the vocabulary too: its logits stay sharded (B*T x V/tp
  per rank) and the loss is taken on them by `loss_parallel` (loss.py), chunk by chunk, so
  neither a rank nor the group ever holds B*T x V logits;
- tied embeddings: both the embedding and the head split their (V, d) weight by rows, so
  the one tensor is re-tied after the split (left apart, each would train alone:
  torchtitan#594).

Applied to the model on the meta device, before activation checkpointing, compile and FSDP
(which then shards each DTensor over the data-parallel dimensions: 2-D parameters), and
before any parameter is materialised: `init_weights` draws each full tensor and keeps this
rank's part, so the split model starts as one process's would.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from pretrain.model.transformer import GeluMLP, SwiGLU, Transformer

# The projections of each MLP kind that widen (column-parallel) and narrow (row-parallel).
MLP_SPLIT = {SwiGLU: (("w1", "w3"), "w2"), GeluMLP: (("fc",), "proj")}


def block_plan(block) -> dict:
    """The styles of one transformer block's modules (names relative to the block)."""
    widen, narrow = MLP_SPLIT[type(block.mlp)]
    plan = {
        "attn_norm": SequenceParallel(),
        # The attention's first argument (the normed sequence shard) is gathered whole; the
        # rope tables and start position pass as they are.
        "attn": PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.out_proj": RowwiseParallel(output_layouts=Shard(1)),
        "mlp_norm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        f"mlp.{narrow}": RowwiseParallel(output_layouts=Shard(1)),
    }
    plan.update({f"mlp.{name}": ColwiseParallel() for name in widen})
    return plan


def apply_tensor_parallel(model: Transformer, tp_mesh) -> None:
    """Split `model` (on the meta device, not yet sharded by FSDP) over the 1-D `tp_mesh`."""
    rank, parts = tp_mesh.get_local_rank(), tp_mesh.size()
    tied = model.cfg.tie_embeddings
    # The head first: with tied embeddings its weight is still the embedding's plain
    # parameter here; the embedding's own split below makes a new one, re-tied after.
    parallelize_module(
        model,
        tp_mesh,
        {
            # Logits stay split over the vocabulary (a DTensor): loss.py takes the loss on them.
            "lm_head": ColwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
            ),
            "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
        },
    )
    # The final norm's output, gathered whole: the head and the chunked loss take every
    # position (each rank its vocabulary part).
    parallelize_module(
        model.norm,
        tp_mesh,
        PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate()),
    )
    if tied:
        model.lm_head.weight = model.tok_emb.weight
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan(block))
        block.attn.shard_heads(rank, parts)
