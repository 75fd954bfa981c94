"""The device and the process group: CUDA when every rank can use it, otherwise CPU + gloo."""

from __future__ import annotations

import logging
import os

import torch

from pretrain.errors import ConfigError

log = logging.getLogger(__name__)


def init_distributed(timeout_s: float = 600.0, device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes; (rank, world_size). (0, 1) without torchrun.

    The backend follows the device every rank agreed on (`agree_on_device`): NCCL on
    CUDA, gloo on CPU, so one node whose CUDA failed cannot quietly pick gloo while the
    others pick NCCL. The group is built on a store prefixed by the restart attempt: after
    `torchrun --max-restarts` restarts the workers, the new attempt must not read the
    addresses the old one left in the reused rendezvous store (pytorch#135712), and every
    collective has a timeout so a dead peer ends in an error, not a hang.
    """
    import datetime

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        if not dist.is_initialized():
            choose_device(device, cuda_usable())  # a one-process run checks alone
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rank = int(os.environ["RANK"])
    timeout = datetime.timedelta(seconds=timeout_s)
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timeout,
    )
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)
    kind = agree_on_device(device, store, rank, world)
    backend = "nccl" if kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    log.info("process group: %d ranks, %s on %s (parallel.device=%s)", world, backend, kind, device)
    return rank, world


# Test-only fault injection: "RANK:0|1[,RANK:0|1...]" makes those ranks report CUDA as
# (un)usable whatever the truth, so a test on a machine without GPUs can make ranks disagree.
FAULT_CUDA_ENV = "PRETRAIN_FAULT_CUDA_USABLE"


def cuda_usable(rank: int | None = None) -> bool:
    """Whether this process can run on CUDA: a device is visible and initialises."""
    forced = dict(item.split(":") for item in os.environ.get(FAULT_CUDA_ENV, "").split(",") if item)
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if str(rank) in forced:
        return forced[str(rank)] == "1"
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except RuntimeError:  # a driver that fails to initialise
        return False


def choose_device(requested: str, usable: bool, where: str = "this process") -> str:
    """The device kind, cuda or cpu, for `parallel.device` (auto|cuda|cpu), given whether
    CUDA is usable (`where`: the processes that verdict is about, for the error)."""
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" and not usable:
        raise ConfigError(
            f"parallel.device=cuda, but CUDA is not usable in {where}: check the GPU and "
            "driver (nvidia-smi), or set parallel.device=cpu to train on CPU"
        )
    return "cuda" if usable else "cpu"


def agree_on_device(requested: str, store, rank: int, world: int) -> str:
    """The device kind every rank uses, decided together before any backend is chosen.

    Each rank adds its verdict (is CUDA usable here?) to counters in the rendezvous store
    and waits until all have; a constant number of store calls per rank. All usable: cuda
    (unless cpu was asked for), none: cpu; a mix is an error on every rank naming a rank
    without CUDA, never a silent CPU run on some nodes or a hang in NCCL init.
    """
    import socket

    import torch.distributed as dist

    here = f"rank {rank} ({socket.gethostname()})"
    usable = requested != "cpu" and cuda_usable(rank)
    votes = dist.PrefixStore("device", store)
    if requested != "cpu" and not usable:
        votes.compare_set("without", "", here)  # the first rank to say so is named
    votes.add("usable", int(usable))
    if votes.add("arrived", 1) == world:
        votes.set("done", "1")
    votes.wait(["done"])
    count = votes.add("usable", 0)
    if 0 < count < world:
        without = votes.get("without").decode()
        raise ConfigError(
            f"parallel.device={requested}: CUDA is usable on {count} of {world} ranks but not "
            f"on {without} (this is {here}); fix that node's GPU or driver, or set "
            "parallel.device=cpu"
        )
    return choose_device(requested, count == world, f"any of the {world} ranks")
