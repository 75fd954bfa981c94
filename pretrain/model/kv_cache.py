"""Keys and values of earlier positions, kept for incremental decoding.

`Transformer.set_kv_cache` gives every `Attention` one `KVCache`; `Attention.forward` then
writes the keys and values of its new tokens at their positions and attends over all
positions so far, so each generated token costs one position's work instead of a forward
over the whole sequence. The tensors are allocated once, for `max_len` positions: no
per-token concatenation, and memory bounded up front. Training never sets one.
"""

from __future__ import annotations

import torch


class KVCache:
    """One attention layer's keys and values for positions 0..max_len-1, preallocated."""

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(
                f"KV cache needs batch_size and max_len >= 1 (got {batch_size}, {max_len})"
            )
        # (B, K, max_len, D): each head's positions are contiguous, as SDPA reads them.
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions 0..length-1 hold keys and values

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def check(self, start: int, batch_size: int, seq_len: int) -> None:
        """Raise ValueError unless `seq_len` tokens of `batch_size` rows fit at `start`."""
        end = start + seq_len
        if start < 0 or start > self.length:
            raise ValueError(
                f"start position {start}: the KV cache holds positions 0..{self.length - 1}, "
                f"so new tokens can start at 0..{self.length}"
            )
        if end > self.max_len:
            raise ValueError(
                f"positions {start}..{end - 1} exceed the KV cache's max_len {self.max_len}"
            )
        if batch_size > self.k.shape[0]:
            raise ValueError(
                f"batch of {batch_size} rows exceeds the KV cache's batch_size {self.k.shape[0]}"
            )

    def update(
        self, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, K, D) at positions start..start+T-1 (forgetting any later ones);
        returns the keys and values of positions 0..start+T-1, (B, start+T, K, D) views."""
        B, T = k.shape[:2]
        self.check(start, B, T)
        end = start + T
        self.k[:B, :, start:end] = k.transpose(1, 2)
        self.v[:B, :, start:end] = v.transpose(1, 2)
        self.length = end
        # A cache kept in another dtype than the compute (autocast) is cast to it here.
        keys = self.k[:B, :, :end].to(k.dtype).transpose(1, 2)
        return keys, self.v[:B, :, :end].to(v.dtype).transpose(1, 2)
