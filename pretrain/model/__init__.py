"""Decoder-only transformer as plain nn.Modules; imports nothing else from `pretrain`."""

from pretrain.model.attention import Attention, flash_attn_available
from pretrain.model.config import ModelConfig
from pretrain.model.flops import count_params, flops_per_token
from pretrain.model.kv_cache import KVCache
from pretrain.model.positions import alibi_slopes, apply_rope, rope_cos_sin
from pretrain.model.transformer import NORM_CLASSES, Block, LayerNorm, RMSNorm, Transformer

__all__ = [
    "NORM_CLASSES",
    "Attention",
    "Block",
    "KVCache",
    "LayerNorm",
    "ModelConfig",
    "RMSNorm",
    "Transformer",
    "alibi_slopes",
    "apply_rope",
    "count_params",
    "flash_attn_available",
    "flops_per_token",
    "rope_cos_sin",
]
