"""Everything checked about the data before the first training step.

For each stream (local folder or `s3://` prefix) and each split it is read from: the
dataset is complete (`meta.json`, written last by `pretrain prep shards`), it was made
with this tokenizer and sequence length, it has samples, and every shard listed in its
index is present with the listed size (and, for local shards, the listed xxh64 hash when
`data.validate_hashes`). Problems are one-line `DataError`s naming the stream, and
object-store problems (credentials, bucket, prefix) surface here, not mid-training.

Every stream is read through a folder of the run's own (`RUN_DIR/cache/streamsN`, local
shards linked into it), holding the index checked here. With `data.skip_bad_shards`,
damaged shards are left out of that index, with a warning, instead of refusing to start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pretrain import objstore
from pretrain.checkpoint import has_checkpoint
from pretrain.config import Config, ConfigError, StreamConfig
from pretrain.tokenizer import Tokenizer

log = logging.getLogger("pretrain")
META_FORMAT = "pretrain-mds-v1"
HASH = "xxh64"


class DataError(ValueError):
    """Data that cannot be trained on; the message is one line naming the stream."""


@dataclass(frozen=True)
class StreamSource:
    """Where one stream's split is read from: `remote` (None for local data) and `local`."""

    name: str  # e.g. "data.streams[0] (s3://bucket/ds)"
    remote: str | None
    local: str
    split: str
    proportion: float | None
    repeat: float | None
    validate_hash: str | None
    fingerprint: dict  # what the data is, wherever it is stored


def check_same_data(run_dir: Path, sources: list[StreamSource], write: bool) -> None:
    """Refuse to resume a run on datasets other than the ones it started with."""
    path = run_dir / f"data_{sources[0].split}.json"
    now = [s.fingerprint for s in sources]
    if path.exists() and has_checkpoint(run_dir):
        before = json.loads(path.read_text())
        for source, old, new in zip(sources, before, now, strict=False):
            if old != new:
                raise DataError(
                    f"{source.name} is not the dataset this run started with ({_diff(old, new)}); "
                    "use another run.name for new data"
                )
        if len(before) != len(now):
            raise DataError(
                f"this run started with {len(before)} {sources[0].split} stream(s), not {len(now)}"
            )
    elif write:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=1))


def _diff(old: dict, new: dict) -> str:
    key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    return f"{key} was {old.get(key)}, now {new.get(key)}"


def stream_sources(
    cfg: Config, run_dir: Path, split: str, validation: bool = False
) -> list[StreamSource]:
    """Check every stream for `split` and say where streaming should read it from."""
    field = "val_streams" if validation and cfg.data.val_streams else "streams"
    tokenizer = Tokenizer(cfg.data.tokenizer)
    return [
        _check_stream(
            cfg,
            tokenizer,
            s,
            f"data.{field}[{i}] ({s.remote})",
            split,
            run_dir / "cache" / f"{field}{i}",
        )
        for i, s in enumerate(getattr(cfg.data, field))
    ]


def read_meta(stream: StreamConfig, name: str) -> dict:
    """The dataset's meta.json; its absence means `prep shards` never finished there."""
    url = _join(stream.remote, "meta.json")
    missing = f"{name}: no meta.json; is this a dataset written by `pretrain prep shards`?"
    try:
        raw = objstore.read_bytes(url) if objstore.is_remote(url) else Path(url).read_bytes()
    except objstore.StoreError as e:
        raise DataError(missing if str(e).endswith(": not found") else f"{name}: {e}") from None
    except FileNotFoundError:
        raise DataError(missing) from None
    except OSError as e:
        raise DataError(f"{name}: cannot read meta.json: {e.strerror}") from None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}: meta.json is not valid JSON ({e})") from None
    if meta.get("format") != META_FORMAT:
        raise DataError(
            f"{name}: meta.json has format {meta.get('format')!r}, expected {META_FORMAT!r}"
        )
    return meta


def check_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer, checked against model.vocab_size."""
    try:
        tokenizer = Tokenizer(cfg.data.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
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


def _check_stream(
    cfg: Config, tokenizer: Tokenizer, stream: StreamConfig, name: str, split: str, cache: Path
) -> StreamSource:
    meta = read_meta(stream, name)
    if meta["tokenizer_sha256"] != tokenizer.sha256 or meta["vocab_size"] != tokenizer.vocab_size:
        raise DataError(
            f"{name} was tokenized with {meta['tokenizer']} (vocab {meta['vocab_size']}), not with "
            f"data.tokenizer {tokenizer.path} (vocab {tokenizer.vocab_size}); re-run `pretrain prep shards`"
        )
    if meta["seq_len"] != cfg.data.seq_len:
        raise DataError(
            f"{name} packs sequences of {meta['seq_len']} tokens but data.seq_len is "
            f"{cfg.data.seq_len}; set data.seq_len={meta['seq_len']} or re-run `pretrain prep shards`"
        )
    if meta["splits"].get(split, {}).get("samples", 0) == 0:
        raise DataError(f"{name}: split '{split}' has no samples")

    is_remote = objstore.is_remote(stream.remote)
    raw_index = _read(_join(stream.remote, split, "index.json"), name)
    index = json.loads(raw_index)
    bad = _bad_shards(stream.remote, split, index, is_remote, cfg.data.validate_hashes)
    if bad:
        listed = ", ".join(f"{split}/{b}" for b in bad[:3]) + (
            f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        )
        if not cfg.data.skip_bad_shards:
            raise DataError(
                f"{name}: damaged shard(s) {listed} (missing, truncated or failing their checksum); "
                "re-run `pretrain prep shards`, or set data.skip_bad_shards=true to train without them"
            )
        log.warning("%s: skipping damaged shard(s) %s", name, listed)
        index = {
            **index,
            "shards": [s for s in index["shards"] if _shard_file(s)["basename"] not in bad],
        }
        if not index["shards"]:
            raise DataError(f"{name}: every shard of split '{split}' is damaged")
    # Streaming reads each stream through a folder of this run's own (local shards are
    # linked there): its shared memory is registered per folder, so two runs never share
    # it, and the index there is the one checked now (filtered, or as the store has it).
    local = Path(stream.local) if is_remote and stream.local else cache
    if _local_leader():
        index_bytes = json.dumps(index).encode() if bad else raw_index
        _sync_cache(local / split, index_bytes, stream.remote, split, index, is_remote)
    hashed = all(HASH in s.get("hashes", []) for s in index["shards"])
    return StreamSource(
        name=name,
        remote=stream.remote if is_remote else None,
        local=str(local),
        split=split,
        proportion=stream.proportion,
        repeat=stream.repeat,
        validate_hash=HASH if hashed and cfg.data.validate_hashes else None,
        fingerprint={
            "tokenizer_sha256": meta["tokenizer_sha256"],
            "seq_len": meta["seq_len"],
            "samples": sum(s["samples"] for s in index["shards"]),
            "shards": len(index["shards"]),
        },
    )


def _local_leader() -> bool:
    """One process per node writes the shared cache (the others wait at a barrier)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _shard_file(shard: dict) -> dict:
    """The file a shard is stored as: compressed if the writer compressed it."""
    return shard["zip_data"] or shard["raw_data"]


def _bad_shards(root: str, split: str, index: dict, remote: bool, hashes: bool) -> list[str]:
    """Basenames of shards that are missing, of the wrong size, or (local) fail their hash."""
    if remote:  # one listing instead of a request per shard
        sizes = {
            url.rsplit("/", 1)[1]: size for url, size in objstore.list_objects(_join(root, split))
        }
    else:
        sizes = {p.name: p.stat().st_size for p in (Path(root) / split).iterdir() if p.is_file()}
    bad = []
    for shard in index["shards"]:
        info = _shard_file(shard)
        name = info["basename"]
        wrong_size = sizes.get(name) != info["bytes"]
        check_hash = not remote and not wrong_size and hashes and HASH in info.get("hashes", {})
        if wrong_size or (check_hash and _xxh64(Path(root) / split / name) != info["hashes"][HASH]):
            bad.append(name)
    return bad


def _xxh64(path: Path) -> str:
    import xxhash

    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _sync_cache(
    folder: Path, index_bytes: bytes, root: str, split: str, index: dict, is_remote: bool
) -> None:
    """Make `folder` a streaming cache for `index`; a cache of another index is emptied first."""
    current = folder / "index.json"
    if current.exists() and current.read_bytes() != index_bytes:
        log.info("%s: the dataset changed since it was cached; emptying %s", root, folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_remote:  # local shards are linked into the cache, not copied
        for shard in index["shards"]:
            name = _shard_file(shard)["basename"]
            _replace_symlink(Path(root).resolve() / split / name, folder / name)
    tmp = folder / f".index.json.{os.getpid()}"
    tmp.write_bytes(index_bytes)
    os.replace(tmp, current)


def _replace_symlink(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _read(url: str, name: str) -> bytes:
    try:
        return objstore.read_bytes(url) if objstore.is_remote(url) else Path(url).read_bytes()
    except (objstore.StoreError, OSError) as e:
        raise DataError(f"{name}: cannot read {url.rsplit('/', 2)[-2]}/index.json: {e}") from None


def _join(root: str, *parts: str) -> str:
    return objstore.join(root, *parts) if objstore.is_remote(root) else str(Path(root, *parts))
