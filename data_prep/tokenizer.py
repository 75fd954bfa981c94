"""Train a lossless, deterministic sentencepiece tokenizer on the corpus.

Lossless means `decode(encode(text)) == text` for any text: no normalization
(`identity`), whitespace kept as is (no dummy prefix, no collapsing of runs), and
`byte_fallback` so characters outside the vocabulary become byte pieces instead of `<unk>`.
`character_coverage=1.0` fails on small vocabularies, and byte fallback makes 0.9995 lossless
anyway. Runs of spaces may become single pieces (`allow_whitespace_only_pieces`), which keeps
indented text short.

Deterministic means the same inputs give the same model bytes: inputs are read in sorted
order and sentencepiece's global random seed is fixed (it drives the sampling behind
`--max-sentences`).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from data_prep.inputs import InputFile, check_readable, iter_documents
from pretrain.data.tokenizer import Tokenizer
from pretrain.errors import PrepError
from pretrain.files import write_atomic, write_json

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
# 4 special pieces + 256 byte pieces + at least one character of the corpus.
MIN_VOCAB_SIZE = len(SPECIAL_IDS) + 256 + 1
MODEL_TYPES = ("bpe", "unigram")
# sentencepiece silently drops "sentences" longer than max_sentence_length (4192 bytes by
# default), so documents are fed as chunks of whole lines under this size.
MAX_CHUNK_BYTES = 4096
SPM_SEED = 0
_SPM_ERROR_PREFIX = re.compile(r"^\w+: (?:\S+\(\d+\) \[.*?\] )?")


def training_chunks(text: str, max_bytes: int = MAX_CHUNK_BYTES) -> Iterator[str]:
    """Cut a document into pieces of at most `max_bytes` UTF-8 bytes, at line ends if possible.

    The pieces concatenate back to `text`, so newlines are part of what the tokenizer learns.
    """
    pending: list[str] = []
    pending_bytes = 0
    for line in text.splitlines(keepends=True):
        size = len(line.encode("utf-8"))
        if pending and pending_bytes + size > max_bytes:
            yield "".join(pending)
            pending, pending_bytes = [], 0
        if size > max_bytes:
            step = max_bytes // 4  # a character is at most 4 bytes
            for start in range(0, len(line), step):
                yield line[start : start + step]
            continue
        pending.append(line)
        pending_bytes += size
    if pending:
        yield "".join(pending)


def train_tokenizer(
    inputs: Sequence[InputFile],
    out: Path,
    vocab_size: int,
    model_type: str = "bpe",
    text_field: str = "text",
    max_sentences: int | None = None,
) -> dict[str, Any]:
    """Train on `inputs`, write `out` (a .model) and its `.json` sidecar; return the sidecar."""
    if out.suffix != ".model":
        raise PrepError(f"--out must end in .model (got {out})")
    if vocab_size < MIN_VOCAB_SIZE:
        raise PrepError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (got {vocab_size})")
    if model_type not in MODEL_TYPES:
        raise PrepError(f"--model-type must be one of {', '.join(MODEL_TYPES)} (got {model_type})")
    if max_sentences is not None and max_sentences <= 0:
        raise PrepError(f"--max-sentences must be > 0 (got {max_sentences})")
    check_readable(inputs)

    # An exception raised inside sentence_iterator reaches us as a RuntimeError with a
    # traceback in its text, so keep the real PrepError aside and re-raise it afterwards.
    failures: list[PrepError] = []

    def sentences() -> Iterator[str]:
        try:
            for item in inputs:
                for doc in iter_documents(item, text_field):
                    yield from training_chunks(doc)
        except PrepError as e:
            failures.append(e)

    model = io.BytesIO()
    spm.set_random_generator_seed(SPM_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            character_coverage=0.9995,
            split_digits=True,
            max_sentence_length=MAX_CHUNK_BYTES + 96,
            input_sentence_size=max_sentences or 0,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,  # sentencepiece's training log is hundreds of lines
            **SPECIAL_IDS,
        )
    except RuntimeError as e:
        if failures:
            raise failures[0] from None
        raise PrepError(f"sentencepiece training failed: {_spm_message(e)}") from None
    if failures:
        raise failures[0]

    write_atomic(out, model.getvalue())
    tokenizer = Tokenizer(out)
    sidecar: dict[str, Any] = {
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "unk_id": tokenizer.unk_id,
        "model_type": model_type,
        "sha256": tokenizer.sha256,
        "inputs": [item.name for item in inputs],
    }
    write_json(out.with_suffix(".json"), sidecar, indent=2)
    return sidecar


def _spm_message(error: RuntimeError) -> str:
    """sentencepiece's first line without its `INTERNAL: file.cc(123) [check]` prefix."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return _SPM_ERROR_PREFIX.sub("", first_line)
