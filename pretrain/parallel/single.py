"""One process, one device: the reference every other strategy is compared against."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.parallel.base import Strategy, new_transformer
from pretrain.parallel.device import choose_device, cuda_usable


class SingleStrategy(Strategy):
    """The interface's defaults on this process's one device (CUDA when usable, as
    `parallel.device` allows): no process group, nothing to reduce or wait for."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.device = torch.device(choose_device(cfg.parallel.device, cuda_usable()))

    def build_model(self) -> nn.Module:
        return new_transformer(self.cfg, self.device)
