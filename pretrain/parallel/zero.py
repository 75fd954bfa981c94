"""DeepSpeed ZeRO stages 1, 2 and 3, configured from our config.

Stage 1 shards optimizer state, 2 also gradients, 3 also parameters. The engine wraps our
own model and our torch AdamW (with its weight-decay groups), so no fused op has to be
JIT-compiled; DeepSpeed's CPU communication op (`shm_comm`) is built once into
TORCH_EXTENSIONS_DIR (about a minute, the first time on a machine). `parallel.deepspeed`
passes any further DeepSpeed keys through. DeepSpeed writes its own checkpoint files
inside our atomic checkpoint folder; they resume on the same number of ranks only.

Under stage 3 no rank ever holds the whole model: it is built on the meta device and each
module is materialised, initialised and partitioned in turn (`build_partitioned`), with the
same initial weights as a single process. In bf16, gradients are still accumulated and
reduced in fp32 (DeepSpeed's default would do both in bf16), as FSDP's reduce_dtype does;
gradient reduction overlaps backward (`overlap_comm`) at every stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from torch import nn

from pretrain.errors import ConfigError
from pretrain.model import Transformer
from pretrain.parallel.base import new_transformer
from pretrain.parallel.distributed import DistributedStrategy
from pretrain.parallel.parallelize import parallelize

TAG = "zero"


class ZeroStrategy(DistributedStrategy):
    """Our model and AdamW inside a DeepSpeed engine, which shards (by stage) optimizer
    state, gradients and parameters, takes the optimizer step and writes its own
    checkpoints: for comparison with FSDP, and for runs that want DeepSpeed's stages."""

    casts_weights = True  # DeepSpeed keeps bf16 weights itself: no autocast

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if self.device.type == "cpu":  # as agreed (parallel.device), even where GPUs exist
            os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def ds_config(self) -> dict:
        cfg = self.cfg
        config = {
            "train_batch_size": cfg.train.global_batch_size,
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": self.accum_steps,
            "zero_optimization": self.zero_optimization(),
            "gradient_clipping": cfg.optim.grad_clip,
            "bf16": {"enabled": self.mixed_dtype is not None},
            # fp32 gradients whatever the weights: accumulated across micro-batches and
            # reduced across ranks without bf16 rounding (with bf16, stage 1 becomes
            # DeepSpeed's BF16_Optimizer, which shards the optimizer state the same way).
            "data_types": {"grad_accum_dtype": "fp32"},
            "communication_data_type": "fp32",
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
        zero = {
            "stage": stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            # Reduce gradients while backward goes on (DeepSpeed's default: stage 3 only).
            "overlap_comm": True,
        }
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * bucket)
            zero["stage3_param_persistence_threshold"] = 10 * d
        return zero

    def setup(self) -> None:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # DeepSpeed's communication wraps the process group built already (its batch-size
        # checks need the world size before the model is built and partitioned).
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        super().setup()  # the seeded build, with `wrap` making the engine

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The DeepSpeed engine around the built model and optimizer (both, as the engine
        hands them back, are what trains from here on)."""
        import deepspeed

        with _device_names_equal_devices():
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=self.ds_config()
            )
        return engine, optimizer

    def build_model(self) -> nn.Module:
        """The model the engine wraps: whole on every rank for stages 1/2 (they replicate
        parameters), already partitioned for stage 3."""
        if self.cfg.parallel.zero_stage == 3:
            dtype = self.mixed_dtype or torch.float32
            return build_partitioned(self.cfg, self.device, self.ds_config(), dtype)
        return new_transformer(self.cfg, self.device)

    @property
    def unwrapped(self) -> nn.Module:
        return self.model.module

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        # Nothing here reads the loss: a micro-batch queues its backward and the host goes
        # on. A non-finite loss needs no check of ours either: every stage skips the step
        # when the global gradient norm is not finite (DeepSpeed >= 0.19.8's stage 3 too,
        # stage3.py `step`: `is_invalid_grad_norm` -> overflow -> gradients cleared), and
        # the trainer counts the skipped step as for any strategy.
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already divided by accumulation
        if not last:
            self.model.step()  # counts the micro-batch; the optimizer steps at the boundary

    def step(self, max_norm: float) -> torch.Tensor:
        # DeepSpeed reads the norm on the host once here, to skip a non-finite step (that
        # read waits for backward, not for the update). The norm stays on the device for
        # the trainer to read with its other metrics: reading it here would wait for the
        # whole update before the next forward could be queued. DeepSpeed sums it in fp64;
        # it is logged in fp32 (a copy: DeepSpeed may reuse its tensor).
        self.model.step()  # clips to gradient_clipping (= optim.grad_clip) and steps
        norm = self.model.get_global_grad_norm()  # a tensor; a float (inf) after a skip
        self.balance_experts()
        if torch.is_tensor(norm):
            return norm.detach().to(torch.float32, copy=True)
        return torch.tensor(float(norm), dtype=torch.float32)

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


def build_partitioned(cfg, device: torch.device, ds_config: dict, dtype: torch.dtype) -> nn.Module:
    """The model of `cfg` with ZeRO-3 partitioned parameters, never whole on any rank.

    Built on the meta device; then `init_weights` runs once over the model while each
    module is materialised just before its turn and partitioned just after (DeepSpeed's own
    conversion, as `deepspeed.zero.Init(module=...)` does it: rank 0's values broadcast,
    each rank keeps its slice, cast to `dtype` first as the engine would). Every parameter
    gets the values a whole-model init gives, from the same random draws in the same order,
    and a rank holds its partitions plus one module's full weights at most.
    """
    import deepspeed

    with torch.device("meta"):
        model = Transformer(cfg.model)
    # Set up as the engine would for a whole model (incl. its memory-efficient linear);
    # the empty module has nothing to convert yet.
    zero = deepspeed.zero.Init(module=nn.Module(), config_dict_or_path=ds_config)
    materialised: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(meta) -> (meta, real)

    def one_module_at_a_time():
        for module in nn.Module.modules(model):
            for name, p in module.named_parameters(recurse=False):
                if id(p) in materialised:  # tied to a parameter materialised before
                    setattr(module, name, materialised[id(p)][1])
            meta = {n: p for n, p in module.named_parameters(recurse=False) if p.is_meta}
            if meta or any(b.is_meta for b in module.buffers(recurse=False)):
                module.to_empty(device=device, recurse=False)
            for name, p in meta.items():
                materialised[id(p)] = (p, getattr(module, name))
            yield module  # init_weights initialises it now
            fresh = [p for p in module.parameters(recurse=False) if not hasattr(p, "ds_id")]
            for p in fresh:
                p.data = p.data.to(dtype)
            zero._convert_to_zero_parameters(fresh)

    model.modules = one_module_at_a_time  # what init_weights iterates over
    try:
        model.init_weights()
    finally:
        del model.modules
    whole = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if whole:
        raise RuntimeError(f"ZeRO-3 build left parameters unpartitioned: {whole[:3]}")
    return parallelize(model, cfg.parallel)  # checkpointing and compile: no mesh


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
