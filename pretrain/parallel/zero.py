"""DeepSpeed ZeRO stages 1, 2 and 3, configured from our config.

Stage 1 shards optimizer state, 2 also gradients, 3 also parameters. The engine wraps our
own model and our torch AdamW (with its weight-decay groups), so no fused op has to be
JIT-compiled; DeepSpeed's CPU communication op (`shm_comm`) is built once into
TORCH_EXTENSIONS_DIR (about a minute, the first time on a machine). `parallel.deepspeed`
passes any further DeepSpeed keys through. DeepSpeed writes its own checkpoint files
inside our atomic checkpoint folder; they resume on the same number of ranks only.
"""

from __future__ import annotations

import contextlib
import json
import logging

import torch
from torch import nn

from pretrain.config import ConfigError
from pretrain.optim import build_optimizer
from pretrain.parallel.base import new_transformer
from pretrain.parallel.ddp import DDPStrategy
from pretrain.resilience import TrainingStopped

TAG = "zero"


class ZeroStrategy(DDPStrategy):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.bf16 = self.autocast_dtype is not None
        self.autocast_dtype = None  # DeepSpeed keeps bf16 weights itself: no autocast

    def ds_config(self) -> dict:
        cfg = self.cfg
        config = {
            "train_batch_size": cfg.train.global_batch_size,
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": self.accum_steps,
            "zero_optimization": self.zero_optimization(),
            "gradient_clipping": cfg.optim.grad_clip,
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        return _deep_update(config, dict(cfg.parallel.deepspeed))

    def zero_optimization(self) -> dict:
        """Buckets sized to the model (as Hugging Face's "auto" values do) instead of
        DeepSpeed's 5e8 elements, which cost 2 GB per rank in fp32 even for a small model;
        `parallel.deepspeed.zero_optimization` overrides any of them."""
        stage, d = self.cfg.parallel.zero_stage, self.cfg.model.d_model
        bucket = max(d * d, 1 << 20)
        zero = {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * bucket)
            zero["stage3_param_persistence_threshold"] = 10 * d
        return zero

    def setup(self) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        torch.manual_seed(self.cfg.run.seed)
        model = new_transformer(self.cfg, self.device)
        optimizer = build_optimizer(model, self.cfg.optim)
        with _device_names_equal_devices():
            self.model, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=self.ds_config()
            )

    def build_model(self) -> nn.Module:  # setup() builds model and engine together
        raise NotImplementedError

    @property
    def unwrapped(self) -> nn.Module:
        return self.model.module

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        if self.cfg.parallel.zero_stage == 3 and self.any_rank(not torch.isfinite(loss).item()):
            # Stages 1 and 2 skip a step with a non-finite gradient norm; in fp32 stage 3
            # applies it, so stop before the weights are spoiled.
            raise TrainingStopped(
                "non-finite loss under ZeRO-3, which cannot skip a step; the last good "
                "checkpoint stands: lower optim.lr or use zero_stage 1/2 or fsdp, then rerun"
            )
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already divided by accumulation
        if not last:
            self.model.step()  # counts the micro-batch; the optimizer steps at the boundary

    def step(self, max_norm: float) -> torch.Tensor:
        self.model.step()  # clips to gradient_clipping (= optim.grad_clip) and steps
        return torch.as_tensor(float(self.model.get_global_grad_norm()))

    def save(self, folder) -> None:
        self.model.save_checkpoint(str(folder), tag=TAG, save_latest=False)
        if self.rank == 0:
            (folder / "zero.json").write_text(
                json.dumps({"world_size": self.world_size, "stage": self.cfg.parallel.zero_stage})
            )

    def load(self, folder) -> None:
        saved = json.loads((folder / "zero.json").read_text())
        if saved["world_size"] != self.world_size:
            raise ConfigError(
                f"{folder} is a ZeRO checkpoint of {saved['world_size']} ranks; it resumes only on "
                f"{saved['world_size']} (this run has {self.world_size}). Use fsdp to change the number of ranks"
            )
        path, _ = self.model.load_checkpoint(str(folder), tag=TAG, load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"{folder}: DeepSpeed found no checkpoint under tag '{TAG}'")


class _DeviceName(str):
    """A device name (DeepSpeed keeps devices as strings) that also equals the torch.device
    it names, which a plain str never does."""

    def __eq__(self, other):
        if isinstance(other, torch.device):
            return torch.device(str(self)) == other
        return str.__eq__(self, other)

    __hash__ = str.__hash__


@contextlib.contextmanager
def _device_names_equal_devices():
    """While the engine is built, the accelerator names its device with a `_DeviceName`.

    DeepSpeed 0.19's ZeRO-3 reuses the fp32 weight partition as the optimizer's master copy
    only when `partition.device == self.device` (runtime/zero/stage3.py, "we don't need
    another copy of the weights"); `self.device` is a str, so that is never true and fp32
    training keeps a second fp32 copy of every partition: 20 instead of 16 bytes per
    parameter per rank. With the name equal to the device the intended branch is taken.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    original = accelerator.current_device_name
    accelerator.current_device_name = lambda *a, **k: _DeviceName(original(*a, **k))
    try:
        yield
    finally:
        del accelerator.current_device_name  # the class's method again


def _deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base
