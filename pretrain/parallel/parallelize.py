"""How the model is laid out over the ranks: `parallelize` applies every plan, in one order.

This is the one file that names the model's modules for parallelism (the tensor-parallel
styles, the FSDP units, which blocks are checkpointed and compiled); a strategy says only
which mesh and precision. `parallelize(model, p, dims, mesh)` applies, in the anchors'
order (torchtitan's parallelize.py): tensor + sequence parallelism over the mesh's tp
dimension, activation checkpointing, compile, then FSDP over its data-parallel dimensions.
Single-process, DDP and ZeRO runs get the middle two only (no mesh).

Tensor + sequence parallelism: Megatron's layout, with torch's DTensor styles
(`parallelize_module`), as torchtitan applies it:

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

import functools

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from pretrain.model.mlp import GeluMLP, SwiGLU
from pretrain.model.transformer import Transformer
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.expert_parallel import apply_expert_parallel, expert_modules


def parallelize(
    model: Transformer,
    p,
    dims: ParallelDims | None = None,
    mesh=None,
    mp_policy: MixedPrecisionPolicy | None = None,
    expert_mesh=None,
) -> Transformer:
    """Lay `model` out as the config's `parallel` section `p` says, in place: tensor
    parallelism over `mesh["tp"]` (when dims.tp > 1) or expert parallelism over
    `expert_mesh["ep"]` (when dims.ep > 1), then activation checkpointing and compile of
    the blocks, then FSDP over the data-parallel dimensions of `mesh` (when a mesh is
    given; split experts over their own mesh's). Tensor and expert parallelism and FSDP
    need the model still on the meta device; checkpointing and compile take it on either.
    Parameter names stay the same whatever is applied (DCP drops the wrappers' names), so
    checkpoints interchange between layouts."""
    if dims is not None and dims.tp > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if dims is not None and dims.ep > 1:
        apply_expert_parallel(model, expert_mesh["ep"])
    apply_activation_checkpointing(
        model, p.activation_checkpointing, p.activation_checkpointing_every
    )
    if p.compile:
        for block in model.layers.values():
            block.compile()
    if mesh is not None:
        dp_mesh = mesh if dims.tp == 1 else mesh[dims.dp_names]
        policy = mp_policy or MixedPrecisionPolicy()
        if dims.ep > 1:  # inner units first: the experts, on their own mesh
            experts_dp = expert_mesh[dims.expert_names[:-1]]
            shard_experts(model, experts_dp, policy, p.reshard_after_forward)
        apply_fsdp(model, dp_mesh, policy, p.reshard_after_forward)
    return model


def shard_experts(model: Transformer, mesh, mp_policy, reshard: bool) -> None:
    """FSDP units of the expert-parallel experts over `mesh` (the expert mesh's efsdp, and
    dp_replicate under HSDP), split as `_expert_placement` says (by expert again, within
    ep's split, where that is even). FSDP averages their gradients over these dp / ep
    ranks; `scale_expert_gradients` makes that 1 / dp."""
    for experts in expert_modules(model):
        fully_shard(
            experts,
            mesh=mesh,
            mp_policy=mp_policy,
            reshard_after_forward=reshard,
            shard_placement_fn=functools.partial(_expert_placement, ranks=mesh.size(mesh.ndim - 1)),
        )


def _expert_placement(weight, ranks: int) -> Shard:
    """FSDP's split of a routed expert weight over `ranks`: by expert (dim 0) when this
    rank's experts divide evenly among them, else by dim 1 (a copy in and out of the
    interleaved layout at each gather and reduce-scatter, but no rank left empty)."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return Shard(0) if local.shape[0] % ranks == 0 else Shard(1)


@torch.no_grad()
def scale_expert_gradients(model: Transformer, ep: int) -> None:
    """Divide the split experts' reduced gradients by `ep`. An expert's gradient already
    sums the tokens of its whole ep group (the all-to-all's backward brings them), and FSDP
    averaged it over the dp / ep ranks holding that expert: 1 / ep of that is the mean over
    all dp ranks, as the dense gradients are. (FSDP's own divide factor would do it in the
    reduce-scatter, with NCCL's PreMulSum, which gloo lacks: one elementwise op on each
    rank's gradient shards, once a step, does it on every backend.)"""
    for experts in expert_modules(model):
        for w in experts.parameters():
            if w.grad is not None:
                w.grad.div_(ep)


def apply_activation_checkpointing(model: Transformer, mode: str, every: int) -> None:
    """Recompute the activations of checkpointed blocks in backward instead of storing them.

    `full` wraps every block, `every` each `every`-th one (trading less memory for less
    recomputation). Done before any sharding; DCP state dicts drop the wrapper's name, so
    checkpoints load with or without it.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return
    step = 1 if mode == "full" else every
    for i, (name, block) in enumerate(model.layers.items()):
        if i % step == step - 1 or step == 1:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_fsdp(model: Transformer, dp_mesh, mp_policy, reshard_after_forward: bool) -> None:
    """FSDP2 units over `dp_mesh` (1-D: FSDP; 2-D (dp_replicate, dp_shard): HSDP): each
    block, then (untied) the embedding and the head, then the root with what is left."""
    shard = dict(mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # Routed experts' (E, d, h) weights not split by expert parallelism: by expert (dim 0,
    # FSDP's default) where the experts divide evenly over the shard group; else by dim 1.
    # By dim 0, 8 experts over 64 ranks would give 8 ranks a whole expert each (21 GiB of
    # Mixtral-8x7B's weights alone) and the other 56 nothing. Dim 1 costs a copy into and
    # out of the interleaved layout at each gather and reduce-scatter (OLMoE-1B-7B on 8
    # H100s: 2.5 s of a 16.8 s step planned), so it is used only where dim 0 is uneven.
    shard_ranks = dp_mesh.size(dp_mesh.ndim - 1)  # dp_shard (FSDP's, or HSDP's inner dim)
    experts = {id(w) for e in expert_modules(model) for w in e.parameters()}

    def placement(param):
        return _expert_placement(param, shard_ranks) if id(param) in experts else None

    for block in model.layers.values():  # one all-gather per block, freed after use
        fully_shard(block, **shard, shard_placement_fn=placement)
    if not model.cfg.tie_embeddings:
        # The embedding and the output head (with the final norm) in groups of their own;
        # left in the root group, both would stay gathered for the whole step (4.2 GB at
        # 70B in bf16). The head takes all its loss chunks in one call (OutputHead), so it
        # is gathered once a micro-batch and kept for its backward (reshard_after_forward
        # off), and its gradient is reduced once. A tied weight is one parameter and stays
        # in the root group (torchtitan#594).
        fully_shard(model.tok_emb, **shard)
        fully_shard([model.norm, model.lm_head], **{**shard, "reshard_after_forward": False})
    fully_shard(model, **shard)


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
    parallelize_module(
        model,
        tp_mesh,
        {
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
    # The head's (V, d) weight split by rows, as the embedding's was: its logits stay split
    # over the vocabulary (OutputHead.logits) and loss.py takes the loss on them. A tied
    # weight is the embedding's split one, tied again (split apart, each would train alone).
    head = model.lm_head
    if model.cfg.tie_embeddings:
        head.weight = model.tok_emb.weight
    else:
        head.weight = nn.Parameter(distribute_tensor(head.weight, tp_mesh, [Shard(0)]))
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan(block))
        block.attn.shard_heads(rank, parts)
