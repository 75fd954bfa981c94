"""Causal self-attention with grouped-query heads, sliding window and ALiBi.

One fused q/k/v projection feeds one of three interchangeable kernels, picked per call
because the right choice depends on the tensors (device, dtype under autocast):

- flash: `flash_attn.flash_attn_func` on CUDA fp16/bf16 tensors when the package imports.
  It takes (B, T, H, D) directly and does GQA, windows and ALiBi natively.
- sdpa: `F.scaled_dot_product_attention`. Plain causal attention passes `is_causal=True` and
  no mask so PyTorch can use its fused kernels; windows and ALiBi need an additive float
  mask, built once per (T, device, dtype) and shared by every layer.
- naive: softmax(QK^T / sqrt(D) + mask) V written out; the reference the tests compare to.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.config import ModelConfig
from pretrain.model.positions import alibi_slopes, apply_rope

try:
    from flash_attn import flash_attn_func
except ImportError:  # not installed, or built against another torch
    flash_attn_func = None

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_available() -> bool:
    return flash_attn_func is not None


def attention_bias(
    n_heads: int,
    alibi: bool,
    window: int | None,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive mask (1, H or 1, T, T): causal (and window) as -inf, ALiBi as -slope * distance.

    Query t may attend to keys t - window + 1 .. t. Built once per argument tuple and shared
    by every layer and step; under torch.compile it is traced into the graph instead.
    """
    if torch.compiler.is_compiling():
        return _build_attention_bias(n_heads, alibi, window, seq_len, device, dtype)
    return _cached_attention_bias(n_heads, alibi, window, seq_len, device, dtype)


@functools.lru_cache(maxsize=8)
def _cached_attention_bias(*args) -> torch.Tensor:
    # A mask first built under inference_mode must still be usable by autograd later.
    with torch.inference_mode(False):
        return _build_attention_bias(*args)


def _build_attention_bias(
    n_heads: int,
    alibi: bool,
    window: int | None,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    pos = torch.arange(seq_len, device=device)
    distance = pos[:, None] - pos[None, :]  # (T, T) query minus key position
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    bias = torch.zeros(seq_len, seq_len, device=device).masked_fill(~allowed, -math.inf)
    if alibi:
        slopes = torch.tensor(alibi_slopes(n_heads), device=device)
        bias = bias - slopes[:, None, None] * distance  # (H, T, T)
    return bias.to(dtype).view(1, -1, seq_len, seq_len)  # (1, H or 1, T, T)


def _alibi_slopes_tensor(n_heads: int, device: torch.device) -> torch.Tensor:
    """Slopes as flash_attn wants them: float32 (H,) on the device."""
    if torch.compiler.is_compiling():
        return torch.tensor(alibi_slopes(n_heads), dtype=torch.float32, device=device)
    return _cached_alibi_slopes(n_heads, device)


@functools.lru_cache(maxsize=8)
def _cached_alibi_slopes(n_heads: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.tensor(alibi_slopes(n_heads), dtype=torch.float32, device=device)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.kv_heads < 1 or cfg.n_heads % cfg.kv_heads:
            raise ValueError(
                f"n_heads ({cfg.n_heads}) must be a multiple of n_kv_heads ({cfg.kv_heads})"
            )
        if cfg.attention == "flash" and not flash_attn_available():
            raise RuntimeError(
                "attention='flash' but the flash_attn package cannot be imported; "
                "install flash-attn (CUDA only) or set attention to 'auto' or 'sdpa'"
            )
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.impl = cfg.attention
        self.alibi = cfg.position == "alibi"
        self.window = cfg.sliding_window
        self.dropout_p = cfg.dropout
        qkv_dim = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_dim, bias=cfg.bias)
        # Writes into the residual stream: gets the scaled init in Transformer.init_weights.
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)

    def backend(self, q: torch.Tensor) -> str:
        """The kernel for query q: 'flash', 'sdpa' or 'naive'.

        'auto' and 'flash' both fall back to SDPA for tensors flash_attn cannot take (CPU,
        fp32), so evaluation outside autocast still works.
        """
        if self.impl == "naive":
            return "naive"
        if (
            self.impl in ("auto", "flash")
            and flash_attn_func is not None
            and q.is_cuda
            and q.dtype in FLASH_DTYPES
        ):
            return "flash"
        return "sdpa"

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). rope: cos, sin tables (T, D/2) or None."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * K, D)
        if rope is None:
            q, k, v = qkv.split([H, K, K], dim=2)  # (B, T, H, D), (B, T, K, D), (B, T, K, D)
        else:
            # q and k sit next to each other in qkv: rotate both in one pass. split (not
            # slicing) so the backward is one concatenation instead of zero-fills and adds.
            qk, v = qkv.split([H + K, K], dim=2)
            q, k = apply_rope(qk, *rope).split([H, K], dim=2)  # (B, T, H, D), (B, T, K, D)
        p = self.dropout_p if self.training else 0.0

        backend = self.backend(q)
        if backend == "flash":
            y = self._flash(q, k, v, p)  # (B, T, H, D)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|K, T, D), views
            attend = self._sdpa if backend == "sdpa" else self._naive
            y = attend(q, k, v, p).transpose(1, 2)  # (B, T, H, D)
        # SDPA and flash return (B, T, H, D)-contiguous memory, so this reshape is a view.
        return self.out_proj(y.reshape(B, T, H * D))

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        window = (-1, -1) if self.window is None else (self.window - 1, 0)
        slopes = _alibi_slopes_tensor(self.n_heads, q.device) if self.alibi else None
        return flash_attn_func(
            q, k, v, dropout_p=p, causal=True, window_size=window, alibi_slopes=slopes
        )

    def _mask(self, q: torch.Tensor) -> torch.Tensor | None:
        if not self.alibi and self.window is None:
            return None
        return attention_bias(self.n_heads, self.alibi, self.window, q.shape[2], q.device, q.dtype)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        gqa = self.n_kv_heads != self.n_heads
        mask = self._mask(q)
        if mask is None:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa
            )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)

    def _naive(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads  # query head h reads kv head h // repeat
            k = k.repeat_interleave(repeat, dim=1)  # (B, H, T, D)
            v = v.repeat_interleave(repeat, dim=1)
        T = q.shape[2]
        mask = attention_bias(self.n_heads, self.alibi, self.window, T, q.device, torch.float32)
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)  # (B, H, T, T)
        probs = torch.softmax(scores + mask, dim=-1).to(v.dtype)
        probs = F.dropout(probs, p)
        return probs @ v  # (B, H, T, D)
