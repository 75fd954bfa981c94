"""The memory check `pretrain launch` and `pretrain submit` run before anything starts.

A config that will not fit on the target GPUs is refused in one line with the planned
figure and the smallest fix (pretrain.planner.fit.require_fit), instead of reaching an
out-of-memory error minutes into a job on hundreds of GPUs. The GPU type comes from
--gpu-type, else from the cluster: the partition's GRES under SLURM (gpu:h100:8, or the
name GRES autodetection writes, gpu:nvidia_h100_80gb_hbm3:8), the local GPU's name under
`launch`. The card's capacity is its usable memory (79.11 GiB on an H100 80GB,
pretrain.hardware), not the nominal size. CPU runs are not checked (the planner models GPUs).
`--no-fit-check` skips it. It runs where the command is typed (a login node for submit,
each node's launcher for a multi-node launch: the same answer everywhere, from the config
alone, no file touched); the jobs that `submit` starts launch with --no-fit-check, so a
requeued job does not plan again.
"""

from __future__ import annotations

import re

from pretrain import hardware


def card_named(gpu_type: str, source: str) -> hardware.Accelerator:
    """The card of a --gpu-type or GRES type (`h100`, `nvidia_h100_80gb_hbm3`), or a
    one-line ConfigError; `a100` is refused (40 or 80 GB) with the names to pass."""
    return hardware.lookup(gpu_type, source, ": pass --gpu-type or --no-fit-check")


def gres_gpu_type(gres: list[str]) -> str | None:
    """The GPU type of a partition's GRES (`gpu:h100:8(S:0-1)` -> 'h100'); None if untyped."""
    for g in gres:
        m = re.match(r"gpu:([^:(]+):\d+", g)
        if m:
            return m.group(1)
    return None


def local_card() -> hardware.Accelerator | None:
    """The table entry of this node's GPU, None without CUDA or for a GPU not in the table."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    card = hardware.from_device_name(name)
    if card is None:
        print(f"fit check skipped: GPU {name!r} is not in the table; pass --gpu-type")
    return card


def check_fit(cfg, nodes: int, gpus_per_node: int, card: hardware.Accelerator) -> None:
    """ConfigError (one line, with the fix) if `cfg` does not fit on the cluster."""
    from pretrain.planner.fit import require_fit
    from pretrain.planner.plan import Cluster

    if cfg.parallel.device == "cpu":
        return
    require_fit(cfg, Cluster(nodes, gpus_per_node, card))
