"""Position encodings: rotary embeddings (RoPE) and ALiBi slopes.

Both are pure functions so they can be tested against their papers in isolation; the
transformer owns the RoPE cos/sin cache as a non-persistent buffer and the attention module
turns ALiBi slopes into a bias. Learned absolute positions are a plain `nn.Embedding` in the
transformer.

RoPE convention: "rotate half" (GPT-NeoX / Llama-HF layout). Channel i of a head is paired
with channel i + head_dim/2 and the pair is rotated by angle `pos * theta^(-2i/head_dim)`.
This is the same rotation as the interleaved (Meta Llama) layout up to a fixed permutation of
the q/k projection rows, and it needs only contiguous half slices, no strided gathers.
"""

from __future__ import annotations

import math

import torch


def rope_cos_sin(
    head_dim: int, seq_len: int, theta: float = 10000.0, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, head_dim // 2), float32 on the CPU.

    `scale` is linear position interpolation (Chen et al. 2023): position p is encoded as
    p / scale, so scale 2 at position 2p gives exactly the rotation of scale 1 at p. The
    angles are computed in float64 so long contexts do not lose precision.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim (got {head_dim})")
    if scale <= 0:
        raise ValueError(f"rope_scale must be > 0 (got {scale})")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    positions = torch.arange(seq_len, dtype=torch.float64) / scale
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by the tables cos, sin (T, D/2); returns a new (B, T, H, D).

    The tables are cast to x's dtype so autocast runs stay in low precision.
    """
    cos = cos[:, None, :].to(x.dtype)  # (T, 1, D/2), broadcasts over batch and heads
    sin = sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def alibi_slopes(n_heads: int) -> list[float]:
    """Per-head ALiBi slopes (Press et al. 2022, and their reference implementation).

    For n a power of two the slopes are the geometric sequence 2^(-8i/n), i = 1..n. Otherwise
    take the slopes of the closest smaller power of two, p, then fill up with every other
    slope of the 2p-head sequence (those interleave between the first ones).
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1 (got {n_heads})")

    def power_of_2_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    if math.log2(n_heads).is_integer():
        return power_of_2_slopes(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = alibi_slopes(2 * closest)[0::2][: n_heads - closest]
    return power_of_2_slopes(closest) + extra
