"""AdamW with weight-decay groups, and learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config.schema import OptimConfig, ScheduleConfig
from pretrain.model import LayerNorm, RMSNorm


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters into decayed and not-decayed groups.

    Matrices in linear layers are decayed. Norm weights, biases and embeddings are not,
    unless `decay_norms_and_biases` / `decay_embeddings` say so. A tied embedding and
    LM head is one parameter and is classed as an embedding.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        is_embedding = isinstance(module, nn.Embedding)
        is_norm = isinstance(module, (RMSNorm, LayerNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if is_embedding:
                exempt = not cfg.decay_embeddings
            else:
                exempt = (is_norm or name == "bias") and not cfg.decay_norms_and_biases
            if exempt:
                no_decay.add(id(p))
    decay, rest, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (rest if id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.impl == "fused" or (cfg.impl == "auto" and _fused_supported(model)):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, cfg), **kwargs)


def _fused_supported(model: nn.Module) -> bool:
    # Fused AdamW exists for CPU and CUDA floating-point parameters in torch >= 2.4.
    return all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters()
    )


def lr_at(step: int, base_lr: float, sched: ScheduleConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay.

    Warmup goes linearly from base_lr / warmup_steps at step 0 to base_lr at step
    warmup_steps - 1. Decay runs from base_lr at warmup_steps to min_lr at decay_steps
    (default max_steps) and stays at min_lr after that.
    """
    if step < sched.warmup_steps:
        return base_lr * (step + 1) / sched.warmup_steps
    if sched.name == "constant":
        return base_lr
    min_lr = base_lr * sched.min_lr_ratio
    decay_steps = sched.decay_steps if sched.decay_steps is not None else max_steps
    span = max(decay_steps - sched.warmup_steps, 1)
    progress = min((step - sched.warmup_steps) / span, 1.0)
    if sched.name == "linear":
        return base_lr - (base_lr - min_lr) * progress
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
