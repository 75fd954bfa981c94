"""Causal self-attention with grouped-query heads, sliding window and ALiBi.

Separate q, k and v projections (so a tensor-parallel column split gives each rank whole
query heads with their kv heads; checkpoints of the earlier fused `qkv` load, see
`Attention._split_fused_qkv`) feed one of three interchangeable kernels, picked per call by
`select_backend` because the right choice depends on the tensors (device, dtype under
autocast) and on the GPU:

- flash: `flash_attn.flash_attn_func`, only where flash-attn runs: the package imports, a
  CUDA GPU of compute capability >= 8.0 (Ampere, Hopper and later), fp16/bf16 tensors and
  a head_dim it supports. It takes (B, T, H, D) directly and does GQA, windows and ALiBi
  natively, without a (T, T) mask.
- sdpa: `F.scaled_dot_product_attention`. Plain causal attention passes `is_causal=True` and
  no mask so PyTorch can use its fused kernels, with `enable_gqa` where SDPA's own flash
  kernel takes grouped heads. Windows and ALiBi need an additive mask: then k/v heads are
  expanded to the query heads and the mask is in the query dtype, because SDPA's
  memory-efficient kernel (the one that takes a mask on CUDA) neither accepts `enable_gqa`
  nor a mask of another dtype; otherwise SDPA silently runs its math kernel, which holds
  B*H*T*T fp32 scores. The mask is built once per (T, device, dtype) and shared by every
  layer (and, through autograd, by every layer's backward) in a small cache bounded in
  entries and bytes: an ALiBi bias is (1, H, T, T), a GiB at H=32, T=4096 in bf16.
- naive: softmax(QK^T / sqrt(D) + mask) V written out; the reference the tests compare to.

Generation runs this same forward with a `KVCache` (`Transformer.set_kv_cache`): the new
keys and values are written at their positions and the T new queries attend over every key
so far, i.e. they are the last T rows of a causal (Tk, Tk) attention. All three kernels
take that from the shapes alone: flash-attn aligns its causal mask, window and ALiBi to
the bottom right when there are fewer queries than keys (since 2.1; windows and ALiBi need
2.4 anyway), and the SDPA and naive masks are built for queries starting at position
Tk - T. Without a cache Tk == T: the training path, unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.config import ModelConfig
from pretrain.model.kv_cache import KVCache
from pretrain.model.positions import alibi_slopes, apply_rope

try:
    from flash_attn import flash_attn_func
except ImportError:  # not installed, or built against another torch
    flash_attn_func = None

QKV_NAMES = ("q_proj", "k_proj", "v_proj")
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
# SDPA's memory-efficient kernel wants the mask's strides to be multiples of this; a mask
# that is not gets padded (a copy) on every call, so cached masks are built padded.
MASK_ALIGNMENT = 16


def flash_attn_available() -> bool:
    return flash_attn_func is not None


def flash_supported(
    capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int, dropout: float = 0.0
) -> bool:
    """Whether flash-attn 2 runs on a GPU of this compute capability (None: not CUDA).

    Ampere (8.0) or newer, fp16/bf16, head_dim <= 256; its backward for head_dim in
    (192, 224], or above 224 with dropout, only runs on sm80 and sm90 (A100, H100).
    """
    if capability is None or capability < (8, 0) or dtype not in FLASH_DTYPES:
        return False
    if head_dim > FLASH_MAX_HEAD_DIM:
        return False
    big_backward = 192 < head_dim <= 224 or (head_dim > 224 and dropout > 0)
    return not big_backward or capability in ((8, 0), (9, 0))


def select_backend(
    impl: str,
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    head_dim: int,
    dropout: float = 0.0,
    flash_importable: bool | None = None,
) -> str:
    """The kernel for `impl` (model.attention) on this GPU and dtype: flash, sdpa or naive.

    'auto' and 'flash' use flash-attn where `flash_supported` and the package imports, else
    SDPA (so evaluation outside autocast, or on the CPU, still works).
    """
    if flash_importable is None:
        flash_importable = flash_attn_available()
    if impl in ("naive", "sdpa"):
        return impl
    if flash_importable and flash_supported(capability, dtype, head_dim, dropout):
        return "flash"
    return "sdpa"


def sdpa_native_gqa(
    device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int
) -> bool:
    """Whether unmasked SDPA with `enable_gqa` reaches a fused kernel without copying k/v.

    On the CPU its flash kernel takes grouped heads; on CUDA only its flash kernel does
    (sm80+, fp16/bf16, head_dim <= 256): fp32 or an older GPU falls to the memory-efficient
    kernel, which does not, so k/v are expanded there instead of letting SDPA run the math
    kernel.
    """
    if device_type == "cpu":
        return True
    if device_type == "cuda" and capability is not None:
        return capability >= (8, 0) and dtype in FLASH_DTYPES and head_dim <= FLASH_MAX_HEAD_DIM
    return False


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other (constant-folded under compile)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, K, T, D) -> (B, H, T, D): query head h reads kv head h // (H / K), as
    repeat_interleave on dim 1 would."""
    batch, kv_heads, seq, dim = x.shape
    if kv_heads == n_heads:
        return x
    repeat = n_heads // kv_heads
    return x[:, :, None].expand(batch, kv_heads, repeat, seq, dim).reshape(batch, n_heads, seq, dim)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q (B, H, Tq, D), k and v (B, K, Tk, D) -> (B, H, Tq, D) through SDPA.

    `mask` (additive, broadcastable to (B, H, Tq, Tk)) replaces `causal`. With a mask, or
    where SDPA cannot do GQA in a fused kernel, k/v heads are expanded to the query heads.
    """
    H = q.shape[1]
    if mask is not None:
        k, v = expand_kv(k, H), expand_kv(v, H)
        mask = mask.to(q.dtype)  # a no-op for the cached masks, built in the query dtype
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    gqa = k.shape[1] != H
    native = sdpa_native_gqa(q.device.type, cuda_capability(q.device), q.dtype, q.shape[-1])
    if gqa and not native:
        k, v, gqa = expand_kv(k, H), expand_kv(v, H), False
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa
    )


# ------------------------------------------------------------------ masks
def build_attention_bias(
    n_heads: int,
    alibi: bool,
    window: int | None,
    q_start: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    dtype: torch.dtype,
    heads: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Additive mask (1, H or 1, q_len, k_len) for queries at positions q_start.. and keys
    at 0..k_len-1: causal (and window) as -inf, ALiBi as -slope * distance.

    `heads` (first, count): only those of the n_heads heads (a tensor-parallel rank's), each
    with the slope of its global index; None: all of them.

    Query t may attend to keys t - window + 1 .. t. The storage's last dimension is padded
    to a multiple of MASK_ALIGNMENT, so SDPA's memory-efficient kernel takes it as is.
    """
    q_pos = torch.arange(q_start, q_start + q_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    distance = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk) query minus key position
    allowed = distance >= 0
    if window is not None:
        allowed &= distance < window
    bias = torch.zeros(q_len, k_len, device=device).masked_fill(~allowed, -math.inf)
    if alibi:
        slopes = torch.tensor(head_slopes(n_heads, heads), device=device)
        bias = bias - slopes[:, None, None] * distance  # (H, Tq, Tk)
    bias = bias.view(1, -1, q_len, k_len)  # (1, H or 1, Tq, Tk)
    padded = -(-k_len // MASK_ALIGNMENT) * MASK_ALIGNMENT
    out = torch.zeros(1, bias.shape[1], q_len, padded, device=device, dtype=dtype)
    out = out[..., :k_len]
    out.copy_(bias)
    return out


class BiasCache:
    """Least-recently-used masks, at most `max_entries` and `max_bytes` (the newest is
    always kept, whatever its size: every layer of the current forward uses it)."""

    def __init__(self, max_entries: int = 4, max_bytes: int = 256 << 20) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        # A mask first built under inference_mode must still be usable by autograd later.
        with torch.inference_mode(False):
            bias = build()
        self.entries[key] = bias
        while len(self.entries) > 1 and (
            len(self.entries) > self.max_entries or self.nbytes() > self.max_bytes
        ):
            self.entries.popitem(last=False)
        return bias

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()


BIAS_CACHE = BiasCache()


def attention_bias(
    n_heads: int,
    alibi: bool,
    window: int | None,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
    q_start: int = 0,
    heads: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The (1, H or 1, T, q_start + T) mask of T = seq_len queries at positions q_start..
    (0 in training; the cached prefix's length in generation), from BIAS_CACHE; under
    torch.compile it is traced into the graph instead. `heads`: see build_attention_bias."""
    heads = heads if alibi and heads != (0, n_heads) else None
    args = (n_heads, alibi, window, q_start, seq_len, q_start + seq_len, device, dtype, heads)
    if torch.compiler.is_compiling():
        return build_attention_bias(*args)
    return BIAS_CACHE.get(args, lambda: build_attention_bias(*args))


def head_slopes(n_heads: int, heads: tuple[int, int] | None) -> list[float]:
    """The ALiBi slopes of heads first..first+count-1 of n_heads (None: every head)."""
    slopes = alibi_slopes(n_heads)
    return slopes if heads is None else slopes[heads[0] : heads[0] + heads[1]]


_SLOPES: dict[tuple, torch.Tensor] = {}


def _alibi_slopes_tensor(
    n_heads: int, heads: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Slopes as flash_attn wants them: float32 (count,) on the device, one tensor per head
    range."""
    if torch.compiler.is_compiling():
        return torch.tensor(head_slopes(n_heads, heads), dtype=torch.float32, device=device)
    key = (n_heads, heads, device)
    if key not in _SLOPES:
        with torch.inference_mode(False):
            _SLOPES[key] = torch.tensor(
                head_slopes(n_heads, heads), dtype=torch.float32, device=device
            )
    return _SLOPES[key]


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
        # The heads this module computes, (first, count) of n_heads: all of them, unless
        # tensor parallelism gave this rank a slice (`shard_heads`).
        self.heads = (0, self.n_heads)
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self._register_load_state_dict_pre_hook(self._split_fused_qkv)
        # Writes into the residual stream: gets the scaled init in Transformer.init_weights.
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        # Set for generation only (Transformer.set_kv_cache); a plain attribute, not a
        # submodule, so it is neither in state_dict nor moved or sharded with the weights.
        self.kv_cache: KVCache | None = None

    def _split_fused_qkv(self, state: dict, prefix: str, *_) -> None:
        """A state dict of the earlier layout (one fused `qkv`) loads into the three."""
        for kind in ("weight", "bias"):
            fused = state.pop(f"{prefix}qkv.{kind}", None)
            if fused is not None:
                parts = split_qkv(fused, self.n_heads, self.n_kv_heads, self.head_dim)
                for name, part in zip(QKV_NAMES, parts, strict=True):
                    state[f"{prefix}{name}.{kind}"] = part

    def shard_heads(self, rank: int, parts: int) -> None:
        """Compute only query heads rank*H/parts.. (and their kv heads): what a
        tensor-parallel column split of the projections leaves on `rank` of `parts`."""
        count = self.n_heads // parts
        self.heads = (rank * count, count)

    def backend(self, q: torch.Tensor) -> str:
        """The kernel for query q: 'flash', 'sdpa' or 'naive' (see `select_backend`)."""
        capability = cuda_capability(q.device)
        backend = select_backend(self.impl, capability, q.dtype, self.head_dim, self.dropout_p)
        if self.impl == "flash" and backend != "flash" and capability is not None:
            warnings.warn(
                f"attention='flash' but flash-attn cannot run on this GPU (compute capability "
                f"{capability}, {q.dtype}, head_dim {self.head_dim}); using SDPA",
                stacklevel=2,
            )
        return backend

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). rope: cos, sin tables (T, D/2) or None, of
        x's positions. start_pos: the position of x's first token; with a KV cache, x's keys
        and values are stored from there and x attends over positions 0..start_pos+T-1."""
        B, T, _ = x.shape
        D = self.head_dim
        H = self.heads[1]  # this rank's query heads (all of them without tensor parallelism)
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, -1, D)  # (B, T, K, D)
        v = self.v_proj(x).view(B, T, -1, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v)  # (B, start_pos + T, K, D) each
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
        slopes = _alibi_slopes_tensor(self.n_heads, self.heads, q.device) if self.alibi else None
        return flash_attn_func(
            q, k, v, dropout_p=p, causal=True, window_size=window, alibi_slopes=slopes
        )

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        T, q_start = q.shape[2], k.shape[2] - q.shape[2]  # q_start > 0 only with a KV cache
        # Plain causal attention needs no mask when the queries start at 0 (is_causal) or are
        # one token, which sees every key: SDPA keeps its fused kernels.
        if not self.alibi and self.window is None and (q_start == 0 or T == 1):
            return sdpa_attention(q, k, v, None, causal=q_start == 0, dropout_p=p)
        mask = attention_bias(
            self.n_heads, self.alibi, self.window, T, q.device, q.dtype, q_start, self.heads
        )
        return sdpa_attention(q, k, v, mask, causal=True, dropout_p=p)

    def _naive(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])  # (B, H, Tk, D)
        T, q_start = q.shape[2], k.shape[2] - q.shape[2]
        mask = attention_bias(
            self.n_heads, self.alibi, self.window, T, q.device, torch.float32, q_start,
            self.heads,
        )  # fmt: skip
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)  # (B, H, T, Tk)
        probs = torch.softmax(scores + mask, dim=-1).to(v.dtype)
        probs = F.dropout(probs, p)
        return probs @ v  # (B, H, T, D)


def split_qkv(fused: torch.Tensor, n_heads: int, kv_heads: int, head_dim: int) -> list:
    """The earlier layout's fused `qkv` weight or bias (rows: the H query heads, then the K
    key heads, then the K value heads) as the q_proj, k_proj and v_proj tensors."""
    q, kv = n_heads * head_dim, kv_heads * head_dim
    return list(fused.split([q, kv, kv]))
