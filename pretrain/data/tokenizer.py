"""The tokenizer that data prep writes with and the trainer reads with.

A thin wrapper around a sentencepiece model file. It also carries the sha256 of the model
bytes: `pretrain prep shards` records it in the dataset's meta.json, so a dataset can be tied
to the exact model that produced its ids (token ids from two models with the same vocab size
are silently incompatible).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

# sentencepiece writes a space as U+2581 inside pieces, so a literal U+2581 in the text would
# come back from decode() as a space. encode() spells it with byte-fallback pieces instead.
_SPACE_SYMBOL = "\u2581"


class Tokenizer:
    """A sentencepiece model loaded from `path`; encode/decode never add BOS/EOS themselves."""

    def __init__(self, path: str | os.PathLike[str], data: bytes | None = None) -> None:
        """The model at `path`; `data`: its bytes, already read (the file is not opened)."""
        self.path = Path(path)
        if data is None:
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                raise FileNotFoundError(f"tokenizer model not found: {self.path}") from None
            except OSError as e:
                raise ValueError(f"cannot read tokenizer model {self.path}: {e.strerror}") from None
        self._data = data
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except RuntimeError:
            raise ValueError(f"not a sentencepiece model: {self.path}") from None
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        symbol_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_SYMBOL.encode()]
        has_bytes = all(self._sp.is_byte(i) for i in symbol_bytes)
        self._space_symbol_ids = symbol_bytes if has_bytes else None

    def encode(self, text: str) -> list[int]:
        if _SPACE_SYMBOL not in text or self._space_symbol_ids is None:
            return self._sp.encode(text, out_type=int)
        ids: list[int] = []
        for i, part in enumerate(text.split(_SPACE_SYMBOL)):
            if i:
                ids += self._space_symbol_ids
            ids += self._sp.encode(part, out_type=int)
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts at once; sentencepiece spreads them over `num_threads` threads."""
        threads = num_threads if num_threads is not None else (os.cpu_count() or 1)
        texts = list(texts)
        rare = [i for i, text in enumerate(texts) if _SPACE_SYMBOL in text]
        batch = self._sp.encode(
            [text if _SPACE_SYMBOL not in text else "" for text in texts],
            out_type=int,
            num_threads=threads,
        )
        for i in rare:
            batch[i] = self.encode(texts[i])
        return batch

    def decode(self, ids: Iterable[int]) -> str:
        # numpy arrays and torch tensors (e.g. uint16 samples) become plain ints first.
        as_list = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._sp.decode(as_list)

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[Path, bytes]]:
        # The sentencepiece processor does not pickle; its model's bytes do. Sent with them,
        # a tokenizer needs no file where it arrives: rank 0 reads the model once and
        # broadcasts it, instead of every rank reading it from a shared filesystem.
        return (Tokenizer, (self.path, self._data))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
