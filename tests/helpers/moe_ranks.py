"""Run under torchrun (2 ranks) by test_parallel_ep.py: one MoE layer with its experts
split over the ranks (ep 2, no FSDP), against the same layer whole in this process.

    torchrun --nproc-per-node 2 tests/helpers/moe_ranks.py OUT_DIR

Every rank builds the same layer (same seed), routes its own tokens through the split
layer and, as one process would, all ranks' tokens through the whole one. It writes
OUT_DIR/rank{r}.json: the largest differences of its outputs, of its experts' gradients
(the whole layer's gradient of the sum of every rank's loss, at this rank's experts) and of
the router's gradient (summed over ranks), and the token copies each expert received.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from pretrain.model.config import ModelConfig, MoEConfig
from pretrain.model.moe import MoE
from pretrain.parallel.expert_parallel import apply_expert_parallel


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(d_model=32, n_heads=4, moe=MoEConfig(experts=4, top_k=2, expert_hidden=16,
                                                           shared_experts=1))  # fmt: skip
    torch.manual_seed(0)
    whole = MoE(cfg)
    for p in whole.parameters():
        torch.nn.init.normal_(p, std=0.1)
    # Uneven routing: a bias favouring expert 3, so the ranks exchange unequal splits.
    whole.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.3]))
    split = MoE(cfg)
    split.load_state_dict(whole.state_dict())
    apply_expert_parallel(split, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    for name in ("w1", "w3", "w2"):  # this rank's experts keep the whole layer's values
        local = getattr(split.experts, name).to_local()
        local.data.copy_(getattr(whole.experts, name).data.chunk(world)[rank])
    tokens = [torch.randn(3, 40, 32, generator=torch.Generator().manual_seed(10 + r))
              for r in range(world)]  # fmt: skip
    mine = split(tokens[rank])
    mine.pow(2).mean().backward()
    expected = [whole(t) for t in tokens]
    sum(y.pow(2).mean() for y in expected).backward()
    router = split.router.weight.grad.clone()
    dist.all_reduce(router)
    result = {
        "out": (mine - expected[rank]).abs().max().item(),
        "router": (router - whole.router.weight.grad).abs().max().item(),
        "counts": split.last[0].tolist(),
    }
    for name in ("w1", "w3", "w2"):
        grad = getattr(split.experts, name).grad.to_local()
        result[name] = (
            (grad - getattr(whole.experts, name).grad.chunk(world)[rank]).abs().max().item()
        )
        result[f"{name}_scale"] = grad.abs().max().item()
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
