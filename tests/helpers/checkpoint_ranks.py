"""One rank of the checkpoint tests on real ranks; run by tests/test_checkpoint_ranks.py
under torchrun (2 ranks, gloo), it writes what it saw to OUT/rank{r}.json.

    strategies OUT ROOT NAME...   real strategies save twice and resume; who wrote what
    views OUT ROOT_0 ROOT_1       each rank sees its own copy of the run's checkpoints
    s3 OUT ROOT URL SLOW_URL      per-rank upload and download through a real S3 server
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
