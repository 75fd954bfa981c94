"""Run by test_zero_steps.py in a process of its own (DeepSpeed's ZeRO-3 keeps its process
group and its F.linear for the rest of a process): one rank of the ZeRO strategy on CPU
takes three steps of two micro-batches, the second step's first micro-batch with a NaN
loss, and records what the host read off tensors in each backward and step and what each
step did to the weights.

    python tests/helpers/zero_steps.py OUT.json key=value ...
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist

# Each of these copies a value to the host: on a GPU, a wait for every queued kernel.
HOST_READS = ("item", "__bool__", "__float__", "__int__", "tolist")


class HostReads:
    """Counts the host reads of tensors made inside `with reads:` (restored on exit)."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()

    def __enter__(self) -> HostReads:
        self.counts = collections.Counter()
        self.saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._counted(name, method))
        return self

    def __exit__(self, *exc) -> None:
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)

    def _counted(self, name, method):
        def counted(tensor, *args, **kwargs):
            self.counts[name] += 1
            return method(tensor, *args, **kwargs)

        return counted


def main(out: str, overrides: list[str]) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.config.load import load_config
    from pretrain.parallel import build_strategy

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", 1), rank=0, world_size=1)  # fmt: skip
        cfg = load_config(REPO / "configs/tiny.yaml", overrides)
        strategy = build_strategy(cfg)
        strategy.setup()
        accum = strategy.accum_steps
        torch.manual_seed(0)

        def weights():
            return [safe_get_full_fp32_param(p).clone() for p in strategy.unwrapped.parameters()]

        steps = []
        for step in range(3):
            before, backward_reads = weights(), []
            for i in range(accum):
                tokens = torch.randint(cfg.model.vocab_size, (cfg.train.micro_batch_size, 17))
                loss = strategy.forward(tokens[:, :-1], tokens[:, 1:]) / accum
                if step == 1 and i == 0:
                    loss = loss * float("nan")
                with HostReads() as reads:
                    strategy.backward(loss, last=i == accum - 1)
                backward_reads.append(sum(reads.counts.values()))
            with HostReads() as reads:
                norm = strategy.step(cfg.optim.grad_clip)
            after = weights()
            steps.append({
                "backward_reads": backward_reads,
                "step_reads": dict(reads.counts),
                "grad_norm": norm.item(),
                "changed": sum(not torch.equal(a, b) for a, b in zip(before, after, strict=True)),
                "params": len(before),
            })  # fmt: skip
        Path(out).write_text(json.dumps(steps))
        strategy.close()


REPO = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
