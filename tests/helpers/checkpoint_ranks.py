"""One rank of the checkpoint tests on real ranks; run by tests/test_checkpoint_ranks.py and
tests/test_checkpoint_legacy.py under torchrun (2 ranks, gloo), it writes what it saw to
OUT/rank{r}.json.

    strategies OUT ROOT NAME...   real strategies save twice and resume; who wrote what
    views OUT ROOT_0 ROOT_1       each rank sees its own copy of the run's checkpoints
    s3 OUT ROOT URL SLOW_URL      per-rank upload and download through a real S3 server
    fused OUT ROOT                fsdp, hsdp, ddp resume from a sharded checkpoint of the
                                  earlier fused q/k/v layout (`fused_layout`)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # torchrun runs this file: the repository makes tests importable

from pretrain.checkpoint.checkpointer import Checkpointer  # noqa: E402
from pretrain.errors import StoreError  # noqa: E402
from tests.helpers.runs import STRATEGIES, TINY_MODEL  # noqa: E402

COLLECTIVE_TIMEOUT_S = 5
TINY = [*TINY_MODEL, "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.threads=1"]
VARIANTS = {**STRATEGIES, "fsdp": [*STRATEGIES["fsdp"], "checkpoint.async_save=true"]}


class Writes:
    """The files this process writes: Python-level opens for writing (DCP, shutil) and
    torch.save to a path (DeepSpeed, rng), whose C++ writer raises no audit event."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        sys.addaudithook(self._audit)
        save = torch.save

        def recording_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                self.paths.append(os.path.abspath(f))
            return save(obj, f, *args, **kwargs)

        torch.save = recording_save

    def _audit(self, event: str, args) -> None:
        if event != "open" or not isinstance(args[0], (str, os.PathLike)):
            return
        mode, flags = args[1], args[2]
        writing = any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR)
        if writing:
            self.paths.append(os.path.abspath(args[0]))

    def under(self, folder: Path) -> list[str]:
        """Files written under `folder`, relative (a `NAME.tmp` is renamed to NAME)."""
        folder = os.path.abspath(folder)
        names = {os.path.relpath(p, folder) for p in self.paths if p.startswith(folder + "/")}
        return sorted({n.removesuffix(".tmp") for n in names})


def strategies(out: dict, root: Path, names: list[str]) -> None:
    from pretrain.config.load import load_config
    from pretrain.parallel import build_strategy

    writes = Writes()
    for name in names:
        cfg = load_config(REPO / "configs/tiny.yaml", [*TINY, *VARIANTS[name]])
        strategy = build_strategy(cfg)
        strategy.setup()
        tokens = torch.randint(0, 512, (2, 65))
        strategy.backward(strategy.forward(tokens[:, :-1]).float().mean())
        strategy.step(1.0)
        ck = Checkpointer(root / name, keep_last=1)
        seen = {}
        for step in (1, 2):
            writes.paths.clear()
            ck.save(step, {"step": step}, strategy.save, {"config.yaml": "x: 1\n"})
            ck.wait()
            seen[step] = writes.under(root / name / f".tmp-step_{step:08d}")
        path = Checkpointer(root / name, keep_last=1).resume_point()
        strategy.load(path)
        out[name] = {"written": seen, "resumed": path.name}
        del strategy
        dist.barrier()


def fused_layout(state: dict) -> dict:
    """A checkpoint state ({"model", "optim"} as `get_state_dict` gives it) as the earlier
    fused q/k/v layout saved it: each attention's q, k and v rows (weight, bias, AdamW
    moments) one `qkv` entry, its `step` q's, the param groups naming `qkv` where they named
    q_proj. A sharded DTensor stays sharded as the parts were (every rank gathers the parts
    and keeps its slice of the whole: for test models only)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from pretrain.model.attention import QKV_NAMES

    def parts(key: str) -> list[str] | None:  # q's key: the keys of q, k and v; else None
        return [key.replace(".q_proj.", f".{n}.") for n in QKV_NAMES] if ".q_proj." in key else None

    def fuse(tensors: list[torch.Tensor]) -> torch.Tensor:
        if tensors[0].dim() == 0:  # AdamW's step, the same in all three
            return tensors[0]
        if isinstance(tensors[0], DTensor):
            whole = torch.cat([t.full_tensor() for t in tensors])
            mesh, placements = tensors[0].device_mesh, tensors[0].placements
            return distribute_tensor(whole, mesh, placements, src_data_rank=None)
        return torch.cat(tensors)

    def fused(entries: dict, value_of) -> dict:
        out = {}
        for key in entries:
            names = parts(key)
            if names is not None:
                out[key.replace(".q_proj.", ".qkv.")] = value_of([entries[n] for n in names])
            elif not any(f".{n}." in key for n in QKV_NAMES):
                out[key] = entries[key]
        return out

    optim = state["optim"]
    groups = [
        {**g, "params": list(fused(dict.fromkeys(g["params"]), lambda _: None))}
        for g in optim["param_groups"]
    ]
    return {
        "model": fused(state["model"], fuse),
        "optim": {
            "state": fused(optim["state"], lambda ss: {k: fuse([s[k] for s in ss]) for k in ss[0]}),
            "param_groups": groups,
        },
    }


def fused(out: dict, root: Path) -> None:
    """fsdp on 2 ranks saves a checkpoint in each layout (the fused one sharded too, its
    shard boundaries falling inside q); fsdp, hsdp and ddp then load the fused one, and
    hold what loading the other gives."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    from pretrain.config.load import load_config
    from pretrain.parallel import build_strategy

    def built(*extra: str):
        # q 64 rows, k and v 16 each: the fused 96 rows split 48/48 on 2 ranks
        model = ["model.bias=true", "model.n_kv_heads=1"]
        cfg = load_config(REPO / "configs/tiny.yaml", [*TINY, *model, *extra])
        strategy = build_strategy(cfg)
        strategy.setup()
        return strategy

    def local_state(strategy) -> tuple[dict[str, torch.Tensor], list]:
        """This rank's part of every model and optimizer tensor, and the param groups (all
        of them: not ddp's share of them to save)."""
        model, optim = get_state_dict(strategy.model, strategy.optimizer)
        flat = {f"model.{k}": v for k, v in model.items()}
        for key, states in optim["state"].items():
            flat |= {f"optim.{key}.{k}": v for k, v in states.items()}
        flat = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in flat.items()}
        return flat, optim["param_groups"]

    strategy = built(*STRATEGIES["fsdp"])
    tokens = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        strategy.backward(strategy.forward(tokens[:, :-1], tokens[:, 1:]))
        strategy.step(1.0)
    strategy.save(root / "split")
    dcp.save(fused_layout(strategy.checkpoint_state()), checkpoint_id=root / "fused")
    del strategy
    loaders = {
        "fsdp": STRATEGIES["fsdp"],
        "hsdp": [*STRATEGIES["fsdp"], "parallel.dp_replicate=2"],
        "ddp": STRATEGIES["ddp"],  # whole tensors, read from both ranks' shards
    }
    for name, overrides in loaders.items():
        loaded = {}
        for layout in ("split", "fused"):
            strategy = built(*overrides)
            strategy.load(root / layout)
            loaded[layout] = local_state(strategy)
            del strategy
        (split, split_groups), (fused_, fused_groups) = loaded["split"], loaded["fused"]
        out[name] = {
            "keys": sorted(split) == sorted(fused_),
            "different": sorted(k for k in split if not torch.equal(split[k], fused_[k])),
            "groups": split_groups == fused_groups,
            "q_rows": fused_["model.layers.0.attn.q_proj.weight"].shape[0],
        }
        dist.barrier()


def views(out: dict, roots: list[Path]) -> None:
    ck = Checkpointer(roots[dist.get_rank()], keep_last=3)
    path = ck.resume_point()
    out["resumed"] = path.name
    out["step"] = ck.load(path, lambda folder: None)["step"]


def _writer(rank: int, step: int):
    def write(folder: Path) -> None:  # a rank's shard, named as DCP names it
        (folder / f"__{rank}_0.distcp").write_bytes(bytes([step]) * (1000 + rank))

    return write


def s3(out: dict, root: Path, url: str, slow_endpoint: str) -> None:
    from pretrain import objstore
    from pretrain.checkpoint.mirror import CheckpointMirror

    rank, endpoint = dist.get_rank(), os.environ["S3_ENDPOINT_URL"]
    mirror = CheckpointMirror(url, keep_last=2, min_mb_per_s=10.0)
    ck = Checkpointer(root / "first", keep_last=2, mirror=mirror)
    for step in (1, 2, 3):
        ck.save(step, {"step": step}, _writer(rank, step))
        mirror.wait()  # each upload ends before the next save: none is skipped
    out["store"] = mirror.complete_checkpoints()
    out["upload_failures"] = mirror.failures

    # Rank 1 cannot upload (a wrong secret): rank 0 hears of it, no manifest goes up.
    good = os.environ["AWS_SECRET_ACCESS_KEY"]
    if rank == 1:
        os.environ["AWS_SECRET_ACCESS_KEY"] = "a-wrong-secret-4242"
        objstore._client.cache_clear()
    ck.save(4, {"step": 4}, _writer(rank, 4))
    mirror.wait()
    out["failures_after_denied"] = mirror.failures
    out["store_after_denied"] = mirror.complete_checkpoints() if rank == 0 else None
    out["local_after_denied"] = ck.latest().name
    os.environ["AWS_SECRET_ACCESS_KEY"] = good
    objstore._client.cache_clear()
    dist.barrier()

    # A fresh node: an empty run directory; every rank downloads its share. Rank 1's
    # store is slow: its download takes longer than any collective may wait.
    if rank == 1:
        os.environ["S3_ENDPOINT_URL"] = slow_endpoint
    fresh = Checkpointer(root / "second", keep_last=2, mirror=CheckpointMirror(url, 2))
    path = fresh.resume_point()
    os.environ["S3_ENDPOINT_URL"] = endpoint
    out["fetched"] = path.name
    out["fetched_state"] = fresh.load(path, lambda folder: None)
    out["fetched_own"] = (path / f"__{rank}_0.distcp").read_bytes()[:1].hex()

    # Rank 1 cannot download: every rank gets the error; with nothing local, it stops.
    if rank == 1:
        os.environ["AWS_SECRET_ACCESS_KEY"] = "a-wrong-secret-4242"
        objstore._client.cache_clear()
    third = Checkpointer(root / "third", keep_last=2, mirror=CheckpointMirror(url, 2))
    try:
        third.resume_point()
        out["denied_fetch"] = None
    except StoreError as e:
        out["denied_fetch"] = str(e)
    out["third"] = sorted(p.name for p in (root / "third").iterdir())


def main() -> None:
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ['RANK']}] %(message)s")
    out: dict = {}
    if mode == "strategies":  # the strategies join the process group as in training
        strategies(out, Path(sys.argv[3]), sys.argv[4:])
    elif mode == "fused":
        fused(out, Path(sys.argv[3]))
    else:
        # Collectives give up after COLLECTIVE_TIMEOUT_S: no wait for a transfer may be one.
        dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        if mode == "views":
            views(out, [Path(p) for p in sys.argv[3:5]])
        else:
            s3(out, Path(sys.argv[3]), sys.argv[4], sys.argv[5])
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
