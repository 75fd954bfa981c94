"""Training and validation batches from MDS shards, through mosaicml-streaming.

`pretrain prep shards` writes a dataset root holding `meta.json` and one MDS folder per
split. The trainer reads it with `StreamingDataset`: one `Stream` per `data.streams`
entry (weighted mixtures come from the streams' `proportion`/`repeat`), `shuffle_seed` and
`num_canonical_nodes` fixed by the config so the global sample order never depends on the
number of ranks. `TrainBatches.state_dict()` is the loader's exact position (epoch and
sample within it); it goes into every checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.config import Config, ConfigError, StreamConfig
from pretrain.streaming_compat import streaming_module
from pretrain.tokenizer import Tokenizer

META_FORMAT = "pretrain-mds-v1"


def read_meta(stream: StreamConfig, index: int) -> dict:
    """The dataset's meta.json; its absence means `prep shards` never finished there."""
    path = Path(stream.remote) / "meta.json"
    where = f"data.streams[{index}] ({stream.remote})"
    if not path.is_file():
        raise ConfigError(
            f"{where}: no meta.json; is this a dataset written by `pretrain prep shards`?"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: unreadable meta.json: {e}") from None
    if meta.get("format") != META_FORMAT:
        raise ConfigError(
            f"{where}: meta.json has format {meta.get('format')!r}, expected {META_FORMAT!r}"
        )
    return meta


def check_data(cfg: Config) -> Tokenizer:
    """Refuse, before any training step, data that does not fit the tokenizer or the model."""
    if not cfg.data.streams:
        raise ConfigError(
            "data.streams is empty: give at least one dataset, e.g. data.streams=[{remote: data/mds}]"
        )
    try:
        tokenizer = Tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    for i, stream in enumerate(cfg.data.streams):
        meta = read_meta(stream, i)
        where = f"data.streams[{i}] ({stream.remote})"
        if (
            meta["tokenizer_sha256"] != tokenizer.sha256
            or meta["vocab_size"] != tokenizer.vocab_size
        ):
            raise ConfigError(
                f"{where} was tokenized with {meta['tokenizer']} (vocab {meta['vocab_size']}), not with "
                f"data.tokenizer {tokenizer.path} (vocab {tokenizer.vocab_size}); re-run `pretrain prep shards`"
            )
        if meta["seq_len"] != cfg.data.seq_len:
            raise ConfigError(
                f"{where} packs sequences of {meta['seq_len']} tokens but data.seq_len is "
                f"{cfg.data.seq_len}; set data.seq_len={meta['seq_len']} or re-run `pretrain prep shards`"
            )
        for split in (cfg.data.train_split, cfg.data.val_split):
            if meta["splits"].get(split, {}).get("samples", 0) == 0:
                raise ConfigError(f"{where}: split '{split}' has no samples")
    vocab, model_vocab = tokenizer.vocab_size, cfg.model.vocab_size
    if model_vocab < vocab or (model_vocab > vocab and not cfg.data.allow_vocab_padding):
        raise ConfigError(
            f"model.vocab_size ({model_vocab}) does not match the tokenizer {tokenizer.path} "
            f"({vocab} pieces); set model.vocab_size={vocab}"
            + (
                ""
                if model_vocab < vocab
                else ", or data.allow_vocab_padding=true to keep the padding"
            )
        )
    return tokenizer


def _dataset(cfg: Config, split: str, shuffle: bool, batch_size: int):
    streaming = streaming_module()
    streams = [
        streaming.Stream(
            local=s.remote if s.local is None else s.local,
            remote=None if s.local is None else s.remote,
            split=split,
            proportion=s.proportion,
            repeat=s.repeat,
        )
        for s in cfg.data.streams
    ]
    return streaming.StreamingDataset(
        streams=streams,
        batch_size=batch_size,
        shuffle=shuffle,
        shuffle_seed=cfg.run.seed,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
    )


def _loader(dataset, cfg: Config, batch_size: int):
    streaming = streaming_module()
    return streaming.StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=cfg.data.num_workers,
        drop_last=True,
        persistent_workers=cfg.data.num_workers > 0,
        collate_fn=collate_tokens,
    )


def collate_tokens(samples: list[dict[str, Any]]) -> torch.Tensor:
    """(B, seq_len + 1) int64 tokens from MDS samples.

    MDS hands out read-only uint16 views of the shard; stacking copies them into one
    writable array, and int64 is what the embedding indexes with.
    """
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


class TrainBatches:
    """An endless stream of (micro_batch_size, seq_len + 1) token batches for this rank."""

    def __init__(self, cfg: Config) -> None:
        bs = cfg.train.micro_batch_size
        self.dataset = _dataset(cfg, cfg.data.train_split, cfg.data.shuffle, bs)
        self.loader = _loader(self.dataset, cfg, bs)
        self._iter: Iterator | None = None

    def next(self) -> torch.Tensor:
        for _ in range(2):  # an epoch that ends right at a checkpoint yields nothing once
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
        raise RuntimeError(
            "the training data yields no batch: fewer samples than one micro-batch per rank"
        )

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._iter = None
        self.loader.load_state_dict(state)


class ValBatches:
    """The first `n` validation batches, the same ones at every evaluation."""

    def __init__(self, cfg: Config) -> None:
        bs = cfg.train.micro_batch_size
        self.dataset = _dataset(cfg, cfg.data.val_split, shuffle=False, batch_size=bs)
        self.loader = _loader(self.dataset, cfg, bs)

    def batches(self, n: int) -> Iterator[torch.Tensor]:
        for i, batch in enumerate(self.loader):
            if i >= n:
                break
            yield batch
