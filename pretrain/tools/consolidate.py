"""Full model weights from any checkpoint, sharded or not, one tensor at a time.

A DCP checkpoint written by any number of ranks holds each tensor in pieces. This reads
the checkpoint's metadata, writes a safetensors header for every model tensor, then loads
and appends the tensors one by one, so peak memory is one tensor, never the model. The
output loads with `safetensors.torch.load_file` (and is what an export builds on).
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pretrain.files import atomic_open

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


def load_tensor(checkpoint: Path, name: str, meta: TensorStorageMetadata) -> torch.Tensor:
    """One model tensor of a (sharded) DCP checkpoint, whole, in memory."""
    tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load({"model": {name: tensor}}, checkpoint_id=str(checkpoint))
    return tensor


@dataclass
class Entry:
    """A tensor to write: its name, shape and dtype up front, its data when `load()`ed."""

    name: str
    shape: list[int]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.tensor([], dtype=self.dtype).element_size()


def write_safetensors(out: Path, entries: list[Entry], on_tensor=None) -> None:
    """Write `entries` as one safetensors file, loading one tensor at a time (the header
    comes first, from the shapes), atomically; `on_tensor(entry)` after each."""
    header, offset = {}, 0
    for e in entries:
        header[e.name] = {
            "dtype": _DTYPES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format wants the data 8-byte aligned
    with atomic_open(out) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for e in entries:
            tensor = e.load().to(e.dtype).contiguous()
            if list(tensor.shape) != list(e.shape):
                raise ValueError(f"{e.name}: shape {list(tensor.shape)}, expected {e.shape}")
            f.write(tensor.view(torch.uint8).numpy().tobytes())
            del tensor
            if on_tensor is not None:
                on_tensor(e)


def consolidate(checkpoint: Path, out: Path) -> int:
    """Write `checkpoint`'s model weights to the safetensors file `out`; returns tensor count."""
    tensors = model_tensors(checkpoint)
    if not tensors:
        raise ValueError(f"{checkpoint}: no model tensors; is this a checkpoint folder (step_N)?")
    entries = [
        Entry(name, list(meta.size), meta.properties.dtype,
              lambda name=name, meta=meta: load_tensor(checkpoint, name, meta))
        for name, meta in tensors.items()
    ]  # fmt: skip
    write_safetensors(out, entries)
    return len(entries)
