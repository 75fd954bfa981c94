"""Resuming from checkpoints of the earlier fused attention projection.

`Attention` had one `qkv` linear layer, its rows the H query heads, then the K key heads,
then the K value heads (`split_qkv`); it now has three, `q_proj`, `k_proj` and `v_proj`.
A DCP checkpoint of the fused layout holds `model.layers.{i}.attn.qkv.weight` (and
`.bias`), the optimizer's `optim.state.layers.{i}.attn.qkv.weight.{exp_avg,exp_avg_sq,
step}` and param groups that list `qkv` parameters by name.

`fused_qkv_planner(folder)` tells the layouts apart from the checkpoint's metadata and, for
a fused one, gives `dcp.load` a planner that reads every q/k/v entry of the state (weight,
bias, each optimizer state of them) out of the fused entry of the same name: its rows
0.. for q, after the query rows for k, after the key rows for v; an optimizer state with
no rows (AdamW's `step`) is read whole into each of the three. The reads are DCP's own
requests, made against the fused tensor's saved chunks shifted by the row offset, so each
rank reads only the rows of what it holds (its shard of a sharded DTensor under FSDP or
HSDP, the whole tensor where it holds it whole) from the files straight into the state
dict's tensors, as DCP loads any tensor: nothing is held whole, and each rank reads the
bytes a checkpoint of the new layout would make it read. The param groups' lists of names
are not read: the optimizer keeps its own.

Cost: one read of the checkpoint's `.metadata` file per rank per load (DCP's load reads it
again), whatever the layout; a checkpoint of the new layout costs nothing more.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem

from pretrain.model.attention import QKV_NAMES

# A q/k/v entry of the state as DCP flattens it: model or optimizer state, the attention
# module, which projection, weight or bias, and the optimizer state's name.
SPLIT_KEY = re.compile(
    rf"^(model|optim\.state)\.(.+\.attn)\.({'|'.join(QKV_NAMES)})\.(weight|bias)(\..+)?$"
)
# The parameter names of an optimizer param group (the fused layout's names, if read).
GROUP_PARAMS = re.compile(r"^optim\.param_groups\.\d+\.params$")


def has_fused_qkv(metadata: Metadata) -> bool:
    """Whether a checkpoint's metadata is of the fused layout (a `model.*.attn.qkv.weight`)."""
    return any(
        key.startswith("model.") and key.endswith(".attn.qkv.weight")
        for key in metadata.state_dict_metadata
    )


def fused_qkv_planner(folder: str | Path) -> DefaultLoadPlanner | None:
    """The planner that loads the DCP checkpoint `folder` of the fused layout into the state
    of the split one; None (DCP's default) for a checkpoint of the split layout."""
    metadata = FileSystemReader(str(folder)).read_metadata()
    return FusedQKVLoadPlanner() if has_fused_qkv(metadata) else None


class FusedQKVLoadPlanner(DefaultLoadPlanner):
    """DCP's default load, but for the q/k/v entries, read out of their fused entries' rows,
    and the param groups' parameter names, kept as they are (see the module docstring)."""

    def create_local_plan(self) -> LoadPlan:
        saved = self.metadata.state_dict_metadata
        strict = not self.allow_partial_load
        plain, items = {}, []
        for key, obj in self.state_dict.items():
            match = SPLIT_KEY.match(key)
            if match and key not in saved:
                items += self._read_rows(key, obj, match, strict)
            elif not GROUP_PARAMS.match(key):
                plain[key] = obj
        return LoadPlan(create_default_local_load_plan(plain, self.metadata, strict).items + items)

    def _read_rows(self, key: str, obj, match: re.Match, strict: bool) -> list[ReadItem]:
        """The reads that fill `key` (a q, k or v entry) from its fused entry's rows."""
        root, module, proj, kind, state = match.groups()
        fused = f"{root}.{module}.qkv.{kind}{state or ''}"
        md = self.metadata.state_dict_metadata.get(fused)
        if not isinstance(md, TensorStorageMetadata):
            if strict:
                raise RuntimeError(f"Missing key in checkpoint state_dict: {key} (or {fused}).")
            return []
        rows = 0
        if len(md.size) > 0:  # a fused matrix or vector: the rows of this projection
            sizes = [self.state_dict[f"model.{module}.{name}.{kind}"].size(0) for name in QKV_NAMES]
            if md.size[0] != sum(sizes) or md.size[1:] != obj.size()[1:]:
                raise ValueError(
                    f"{fused}: saved as {list(md.size)}, which does not split into this model's "
                    f"q/k/v rows {sizes} x {list(obj.size()[1:])}"
                )
            rows = sum(sizes[: QKV_NAMES.index(proj)])
        # The fused tensor's saved chunks, as if they were chunks of `key`'s tensor (offsets
        # shifted by `rows`): DCP makes the reads of the local shard from those; each read
        # then names the fused entry's chunk it really comes from.
        view = dataclasses.replace(
            md,
            size=obj.size(),
            chunks=[
                ChunkStorageMetadata(offsets=_shift(c.offsets, -rows), sizes=c.sizes)
                for c in md.chunks
            ],
        )
        plan = create_default_local_load_plan({key: obj}, Metadata({key: view}))
        return [
            dataclasses.replace(
                item,
                storage_index=MetadataIndex(
                    fused, _shift(item.storage_index.offset, rows), item.storage_index.index
                ),
            )
            for item in plan.items
        ]


def _shift(offsets: torch.Size, rows: int) -> torch.Size:
    """`offsets` moved by `rows` along the first dimension (a 0-d tensor's: unchanged)."""
    return torch.Size([offsets[0] + rows, *offsets[1:]]) if len(offsets) else offsets
