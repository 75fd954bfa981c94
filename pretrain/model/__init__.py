"""Decoder-only transformer as plain nn.Modules; imports nothing else from `pretrain`.

The names below are imported on first use (PEP 562), not with the package: the config
schema imports `pretrain.model.config`, which runs this file, and `pretrain config`,
`status` and `sweep-status` must not pay for importing torch.
"""

import importlib

_EXPORTS = {
    "Attention": "attention",
    "flash_attn_available": "attention",
    "ModelConfig": "config",
    "count_params": "flops",
    "flops_per_token": "flops",
    "KVCache": "kv_cache",
    "alibi_slopes": "positions",
    "apply_rope": "positions",
    "rope_cos_sin": "positions",
    "NORM_CLASSES": "transformer",
    "Block": "transformer",
    "LayerNorm": "transformer",
    "RMSNorm": "transformer",
    "Transformer": "transformer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
