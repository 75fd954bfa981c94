"""The dense MLPs of a block: SwiGLU (gated, three matrices; also the shape of every MoE
expert, moe.py) and GELU (two matrices)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.config import ModelConfig


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or cfg.hidden_dim
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)  # gate
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)  # up
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)  # down

    @property
    def out_proj(self) -> nn.Linear:
        return self.w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=cfg.bias)

    @property
    def out_proj(self) -> nn.Linear:
        return self.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))
