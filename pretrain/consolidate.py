"""Full model weights from any checkpoint, sharded or not, one tensor at a time.

A DCP checkpoint written by any number of ranks holds each tensor in pieces. This reads
the checkpoint's metadata, writes a safetensors header for every model tensor, then loads
and appends the tensors one by one, so peak memory is one tensor, never the model. The
output loads with `safetensors.torch.load_file` (and is what an export builds on).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

# safetensors dtype names
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
PREFIX = "model."


def model_tensors(checkpoint: Path) -> dict[str, TensorStorageMetadata]:
    """Name (without the `model.` prefix) -> metadata of every model tensor, in save order."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    return {
        key[len(PREFIX) :]: meta
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(PREFIX) and isinstance(meta, TensorStorageMetadata)
    }


def consolidate(checkpoint: Path, out: Path) -> int:
    """Write `checkpoint`'s model weights to the safetensors file `out`; returns tensor count."""
    tensors = model_tensors(checkpoint)
    if not tensors:
        raise ValueError(f"{checkpoint}: no model tensors; is this a checkpoint folder (step_N)?")
    header, offset = {}, 0
    for name, meta in tensors.items():
        dtype = meta.properties.dtype
        nbytes = meta.size.numel() * torch.tensor([], dtype=dtype).element_size()
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(meta.size),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format wants the data 8-byte aligned
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, meta in tensors.items():
            tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
                warnings.filterwarnings("ignore", message=".*assuming the intent is to")
                dcp.load({"model": {name: tensor}}, checkpoint_id=str(checkpoint))
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            del tensor
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return len(tensors)
