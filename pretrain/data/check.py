"""Everything checked about the data before the first training step: once, on global rank 0.

The tokenizer (`check_tokenizer`), then for each stream (local folder or `s3://` prefix)
and each split it is read from: the dataset is complete (`meta.json`, written last by
`pretrain prep shards`), it was made with this tokenizer and sequence length, it has
samples, and every shard listed in its index is present with the listed size (and, for
local shards, the listed xxh64 hash when `data.validate_hashes`). Problems are one-line
`DataError`s naming the stream, and object-store problems (credentials, bucket, prefix)
surface here, not mid-training.

Who does the work, and how often: at 1,000 ranks, every rank reading every index, listing
every prefix and hashing every shard on every start and requeue would be O(ranks x data)
against one shared filesystem or store. So only global rank 0 runs `check_tokenizer` and
`check_streams`, for both splits in one round; its verdict (the tokenizer, and per stream a
`CheckedStream`: the checked index, fingerprint, how to read it) goes to every rank
(pretrain.data.loader.check_data). Hashes of local shards are kept in
RUN_DIR/data_hashes.json by path, size and mtime, so a restart re-hashes only shards that
changed: the first start costs one pass over the data, later ones a listing. Hashing and
listing are counted by `pretrain.iotrace`.

Every stream is read through a folder of the node's own (`prepare_cache`, by each node's
local leader): SCRATCH/cache/streamsN on node-local scratch (train.process.scratch_dir), local
shards linked into it, holding the index checked here. Nodes never share a streaming
cache: on a shared filesystem they would download and decompress into one folder. With
`data.skip_bad_shards`, damaged shards are left out of that index, with a warning,
instead of refusing to start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pretrain import files, iotrace, objstore
from pretrain.config.schema import Config, StreamConfig
from pretrain.data.format import INDEX_NAME, META_FORMAT, META_NAME
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import ConfigError, DataError
from pretrain.rundir import RunDir

log = logging.getLogger("pretrain")
HASH = "xxh64"


@dataclass(frozen=True)
class CheckedStream:
    """Rank 0's verdict on one stream's split, sent to every rank (small and picklable)."""

    name: str  # e.g. "data.streams[0] (s3://bucket/ds)"
    cache_name: str  # e.g. "streams0": its folder under SCRATCH/cache
    root: str  # the dataset root as configured (folder or s3:// prefix)
    remote: bool
    local: str | None  # the user's own cache folder for remote data (StreamConfig.local)
    split: str
    proportion: float | None
    repeat: float | None
    validate_hash: str | None
    fingerprint: dict  # what the data is, wherever it is stored
    index: bytes  # the index.json streaming reads: as stored, or without damaged shards
    shards: tuple[str, ...]  # file names of the shards in `index`


@dataclass(frozen=True)
class StreamSource:
    """Where this rank's streaming reads one stream's split: `remote` (None for local data)
    through the node-local folder `local`."""

    name: str
    remote: str | None
    local: str
    split: str
    proportion: float | None
    repeat: float | None
    validate_hash: str | None


def check_streams(
    cfg: Config,
    run_dir: Path,
    split: str,
    validation: bool = False,
    progress: Callable[[], None] = lambda: None,
    tokenizer: Tokenizer | None = None,
) -> list[CheckedStream]:
    """Check every stream for `split` (global rank 0 only) against `tokenizer` (else the
    one data.tokenizer names); `progress()` is called as work is done, so that ranks
    waiting for the verdict can tell slow from stuck."""
    field = "val_streams" if validation and cfg.data.val_streams else "streams"
    tokenizer = tokenizer or Tokenizer(cfg.data.tokenizer)
    hashes = HashCache(RunDir(run_dir).data_hashes, progress)
    try:
        checked = [
            _check_stream(
                cfg,
                tokenizer,
                s,
                f"data.{field}[{i}] ({s.path})",
                f"{field}{i}",
                split,
                hashes,
                progress,
            )
            for i, s in enumerate(getattr(cfg.data, field))
        ]
    finally:
        hashes.save()  # what was hashed stays hashed, even when a shard is refused
    check_same_data(run_dir, checked)
    return checked


def stream_sources(checked: list[CheckedStream], scratch: Path) -> list[StreamSource]:
    """This node's view of rank 0's verdict: each stream read through SCRATCH/cache/NAME."""
    return [
        StreamSource(
            name=c.name,
            remote=c.root if c.remote else None,
            local=c.local if c.remote and c.local else str(scratch / "cache" / c.cache_name),
            split=c.split,
            proportion=c.proportion,
            repeat=c.repeat,
            validate_hash=c.validate_hash,
        )
        for c in checked
    ]


def prepare_cache(source: StreamSource, checked: CheckedStream) -> None:
    """Make this node's cache folder of one stream read the checked index (local leader).

    Streaming registers its shared memory per folder, so two runs never share it, and the
    index there is the one checked (filtered, or as the store has it). A cache of another
    index is emptied first; local shards are linked, not copied.
    """
    folder = Path(source.local) / checked.split
    current = folder / INDEX_NAME
    if current.exists() and current.read_bytes() != checked.index:
        log.info("%s: the dataset changed since it was cached; emptying %s", checked.root, folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not checked.remote:
        shards = Path(checked.root).resolve() / checked.split
        for name in checked.shards:  # part/shard.00000.mds in a merged dataset
            if "/" in name:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
            _link(shards / name, folder / name)
    files.write_atomic(current, checked.index, durable=False)  # rewritten at every start


def check_same_data(run_dir: Path, checked: list[CheckedStream]) -> None:
    """Refuse to resume a run on datasets other than the ones it started with."""
    run = RunDir(run_dir)
    path = run.data_fingerprints(checked[0].split)
    now = [c.fingerprint for c in checked]
    if path.exists() and run.has_checkpoint():
        before = json.loads(path.read_text())
        for c, old, new in zip(checked, before, now, strict=False):
            if old != new:
                raise DataError(
                    f"{c.name} is not the dataset this run started with ({_diff(old, new)}); "
                    "use another run.name for new data"
                )
        if len(before) != len(now):
            raise DataError(
                f"this run started with {len(before)} {checked[0].split} stream(s), not {len(now)}"
            )
    else:
        files.write_json(path, now)


def _diff(old: dict, new: dict) -> str:
    key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    return f"{key} was {old.get(key)}, now {new.get(key)}"


def read_meta(stream: StreamConfig, name: str) -> dict:
    """The dataset's meta.json; its absence means `prep shards` never finished there."""
    url = _join(stream.path, META_NAME)
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
    cfg: Config,
    tokenizer: Tokenizer,
    stream: StreamConfig,
    name: str,
    cache_name: str,
    split: str,
    hashes: HashCache,
    progress: Callable[[], None],
) -> CheckedStream:
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

    is_remote = objstore.is_remote(stream.path)
    raw_index = _read(_join(stream.path, split, INDEX_NAME), name)
    index = json.loads(raw_index)
    check_hashes = cfg.data.validate_hashes and not is_remote
    bad = _bad_shards(stream.path, split, index, is_remote, hashes if check_hashes else None)
    progress()
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
    hashed = all(HASH in s.get("hashes", []) for s in index["shards"])
    return CheckedStream(
        name=name,
        cache_name=cache_name,
        root=stream.path,
        remote=is_remote,
        local=stream.local,
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
        index=json.dumps(index).encode() if bad else raw_index,
        shards=tuple(_shard_file(s)["basename"] for s in index["shards"]),
    )


def _shard_file(shard: dict) -> dict:
    """The file a shard is stored as: compressed if the writer compressed it."""
    return shard["zip_data"] or shard["raw_data"]


def _bad_shards(
    root: str, split: str, index: dict, remote: bool, hashes: HashCache | None
) -> list[str]:
    """Basenames of shards that are missing, of the wrong size, or (local, with `hashes`)
    fail their hash."""
    if remote:  # one listing instead of a request per shard
        url = _join(root, split)
        iotrace.record(iotrace.LIST, url)
        start = len(url.rstrip("/")) + 1  # names relative to the split: part/shard.00000.mds
        stats = {u[start:]: (size, None) for u, size in objstore.list_objects(url)}
    else:
        stats = _local_stats(Path(root) / split)
    bad = []
    for shard in index["shards"]:
        info = _shard_file(shard)
        name = info["basename"]
        size, mtime_ns = stats.get(name, (None, None))
        if size != info["bytes"]:
            bad.append(name)
        elif hashes is not None and HASH in info.get("hashes", {}):
            path = Path(root).absolute() / split / name
            if hashes.xxh64(path, size, mtime_ns) != info["hashes"][HASH]:
                bad.append(name)
    return bad


def _local_stats(folder: Path, prefix: str = "") -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under `folder`, by path relative to it: a merged
    dataset keeps each part's shards in a subfolder (data_prep.shards)."""
    stats = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file():
                st = entry.stat()
                stats[prefix + entry.name] = (st.st_size, st.st_mtime_ns)
            elif entry.is_dir():
                stats |= _local_stats(Path(entry.path), f"{prefix}{entry.name}/")
    return stats


class HashCache:
    """xxh64 of local shards, by absolute path, size and mtime: a shard is hashed again
    only when it changed. Kept in the run directory by global rank 0; a damaged or missing
    file is an empty cache (everything is hashed once more), never an error."""

    def __init__(self, path: Path, progress: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.progress = progress
        self.changed = False
        try:
            self.entries: dict[str, list] = json.loads(path.read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}

    def xxh64(self, path: Path, size: int, mtime_ns: int) -> str:
        key = str(path)
        entry = self.entries.get(key)
        if entry is not None and entry[:2] == [size, mtime_ns]:
            return entry[2]
        digest = _xxh64(path)
        self.entries[key] = [size, mtime_ns, digest]
        self.changed = True
        self.progress()
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        doc = {"version": 1, "shards": self.entries}
        files.write_json(self.path, doc, indent=None, durable=False)  # a cache: no fsync
        self.changed = False


def _xxh64(path: Path) -> str:
    import xxhash

    iotrace.record(iotrace.HASH, path)
    h = xxhash.xxh64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _link(target: Path, link: Path) -> None:
    """`link` -> `target`, replaced atomically; left alone when it already points there."""
    try:
        if os.readlink(link) == str(target):
            return
    except OSError:
        pass
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
