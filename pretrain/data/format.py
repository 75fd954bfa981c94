"""The dataset format `pretrain prep shards` writes and the trainer checks: one module both import."""

from __future__ import annotations

META_FORMAT = "pretrain-mds-v1"


META_NAME = "meta.json"
INDEX_NAME = "index.json"  # in each split's folder: mosaicml-streaming's list of its shards
PREP_DIR = (
    "_prep"  # an array prep job's plan, part manifests and task progress (not read by training)
)


def is_dataset_key(relative: str) -> bool:
    """Whether a file or object at this path inside a dataset is one that prep writes."""
    top = relative.partition("/")[0]
    return relative == META_NAME or (top in (*SPLITS, PREP_DIR) and "/" in relative)


SPLITS = ("train", "val")
