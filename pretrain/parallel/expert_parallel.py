"""Expert parallelism: each group of `parallel.ep` consecutive data-parallel ranks splits
every MoE layer's routed experts among its members and exchanges tokens with all-to-alls.

Each rank keeps its own samples (ep borrows from the data-parallel ranks: nothing about the
data changes). In a MoE layer every rank routes its own tokens and sorts their copies by
expert (moe.py); then (`ExpertParallel`):

1. the per-expert counts go to the ranks holding those experts (an all-to-all of E
   integers) and are read on the host once (the uneven splits of the next exchange: the
   one host sync of a layer's forward, as in every dropless EP);
2. the copies travel to their experts' ranks (an all-to-all with uneven splits, autograd's
   form: its backward is the reverse exchange); each rank regroups what it received by
   local expert (it arrives by source rank), runs its experts as one grouped matmul, puts
   the outputs back in arrival order and
3. sends them back (the reverse all-to-all), where moe.py weights and sums them per token.

The expert weights are DTensors split by expert (Shard(0)) over the ep dimension of their
own mesh (dims.expert_mesh: dp_replicate x efsdp x ep, efsdp = dp_shard / ep); FSDP then
shards them over efsdp (by dim 1, so the two splits do not interleave) and replicates them
over dp_replicate. An expert's gradient holds the tokens of every rank in its ep group, so
FSDP divides the reduced gradient by all data-parallel ranks (`set_gradient_divide_factor`),
as it divides the dense ones. Gradient clipping takes each mesh's norm and combines them
(fsdp.py). Checkpoints are DCP, so a run resumes on another ep (or none).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import Shard, distribute_tensor

from pretrain.model.moe import GroupedExperts, MoE


class ExpertParallel:
    """A MoE layer's `expert_runner` over one expert-parallel group (moe.py)."""

    def __init__(self, ep_mesh) -> None:
        self.group = ep_mesh.get_group()
        self.size = ep_mesh.size()
        self.rank = ep_mesh.get_local_rank()

    def __call__(
        self,
        experts: GroupedExperts,
        rows: torch.Tensor,
        counts: torch.Tensor,
        host_counts: list[int] | None = None,
    ) -> torch.Tensor:
        """rows (M, d) sorted by expert, counts (E,) -> the experts' outputs, same order."""
        ep, local = self.size, counts.numel() // self.size
        if host_counts is None:
            received = torch.empty_like(counts)
            dist.all_to_all_single(received, counts, group=self.group)
            sent, got = torch.stack([counts, received]).tolist()  # the one host sync
        else:  # a forced balanced routing: every rank's counts are the same, known here
            sent = host_counts
            mine = host_counts[self.rank * local : (self.rank + 1) * local]
            got = mine * ep
            received = torch.tensor(got, device=rows.device)
        send_splits = [sum(sent[j * local : (j + 1) * local]) for j in range(ep)]
        recv_splits = [sum(got[j * local : (j + 1) * local]) for j in range(ep)]
        arrived = all_to_all_single_autograd(rows, recv_splits, send_splits, self.group)
        # Arrived by (source rank, local expert); regroup by (local expert, source rank).
        per_block = received.view(ep, local)
        blocks = torch.arange(ep * local, device=rows.device)
        block_of_row = torch.repeat_interleave(
            blocks, per_block.flatten(), output_size=sum(recv_splits)
        )
        key = (block_of_row % local) * ep + block_of_row // local
        order = key.argsort(stable=True)
        local_host = [sum(got[j * local + e] for j in range(ep)) for e in range(local)]
        out = experts(arrived[order], per_block.sum(0), local_host)
        back = torch.empty_like(out).index_copy_(0, order, out)  # arrival order again
        return all_to_all_single_autograd(back, send_splits, recv_splits, self.group)


def apply_expert_parallel(model: nn.Module, ep_mesh) -> None:
    """Split every MoE layer's experts over the 1-D `ep_mesh` (on the meta device, before
    FSDP) and give the layer the exchange that reaches them."""
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        for name in ("w1", "w3", "w2"):
            weight = getattr(experts, name)
            split = distribute_tensor(weight, ep_mesh, [Shard(0)])
            setattr(experts, name, nn.Parameter(split))
        moe.expert_runner = ExpertParallel(ep_mesh)


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    return [m.experts for m in model.modules() if isinstance(m, MoE)]
