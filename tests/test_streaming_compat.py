"""`pretrain.data.streaming_compat`: streaming 0.13 imports without transformers or torchvision,
its data loader still saves and resumes the exact position, and real transformers still
imports beside it.

The import checks run in fresh interpreters: what a process has already imported decides
which path `streaming_module()` takes, and the pytest process imports whatever other tests
need.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import UserDict
from pathlib import Path

import pytest
import torch

from pretrain.data.streaming_compat import _dataloader_module

REPO = Path(__file__).resolve().parents[1]

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
NEEDS_TRANSFORMERS = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers is not installed"
)


def run_python(code: str, tmp_path: Path, *args: str, pythonpath: Path | None = None) -> str:
    """Run `code` in a fresh interpreter (lock files in tmp_path); its stdout."""
    env = {"TMPDIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}:{REPO}"
    r = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


RESUME = """
import gc, sys
import numpy as np
from pretrain.data.streaming_compat import streaming_module

streaming = streaming_module()
assert "transformers" not in sys.modules, "importing streaming imported transformers"
assert "torchvision" not in sys.modules, "importing streaming imported torchvision"
root = sys.argv[1]
with streaming.MDSWriter(out=root, columns={"tokens": "ndarray:int64"}) as out:
    for i in range(40):
        out.write({"tokens": np.arange(i, i + 5, dtype=np.int64)})

def loader():
    dataset = streaming.StreamingDataset(
        local=root, batch_size=4, shuffle=True, shuffle_seed=7, num_canonical_nodes=1
    )
    return streaming.StreamingDataLoader(dataset, batch_size=4, drop_last=True)

def firsts(batch):  # a dict batch: {"tokens": (4, 5) tensor}
    return batch["tokens"][:, 0].tolist()

full = loader()
everything = [firsts(b) for b in full]
assert full.num_samples_yielded == 40, full.num_samples_yielded
assert sorted(i for b in everything for i in b) == list(range(40))
del full
gc.collect()  # frees the dataset's shared memory, keyed by its folder

first = loader()
it = iter(first)
head = [firsts(next(it)) for _ in range(3)]
state = first.state_dict()
assert first.num_samples_yielded == 12 and state["sample_in_epoch"] == 12, state
del it, first
gc.collect()

resumed = loader()
resumed.load_state_dict(state)
tail = [firsts(b) for b in resumed]
assert head + tail == everything, (head, tail, everything)
assert "transformers" not in sys.modules
print("ok", type(resumed).__module__)
"""


def test_streaming_imports_without_transformers_and_resumes_exactly(tmp_path: Path) -> None:
    out = run_python(RESUME, tmp_path, str(tmp_path / "mds"))
    assert out.split() == ["ok", "streaming.base.dataloader"]


@NEEDS_TRANSFORMERS
def test_real_transformers_imports_after_streaming(tmp_path: Path) -> None:
    code = """
import sys
from collections.abc import Mapping
from pretrain.data.streaming_compat import streaming_module

streaming = streaming_module()
assert "transformers" not in sys.modules
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
from transformers.feature_extraction_utils import BatchFeature
from transformers.tokenization_utils_base import BatchEncoding

assert transformers.__file__ and "site-packages" in transformers.__file__, transformers.__file__
loader = streaming.StreamingDataLoader([])
assert isinstance(BatchEncoding({"input_ids": [[1, 2]] * 3}), Mapping)
assert loader._get_batch_size(BatchEncoding({"input_ids": [[1, 2]] * 3})) == 3
assert loader._get_batch_size(BatchFeature({"pixels": [0] * 5})) == 5
print("ok")
"""
    assert run_python(code, tmp_path).split() == ["ok"]


@NEEDS_TRANSFORMERS
def test_transformers_already_imported_keeps_streamings_own_modules(tmp_path: Path) -> None:
    code = """
import sys
import transformers  # noqa: F401
from pretrain.data.streaming_compat import streaming_module

streaming = streaming_module()
print(streaming.base.dataloader.__file__, hasattr(streaming.text, "StreamingC4"))
"""
    path, has_c4 = run_python(code, tmp_path).split()
    assert path.endswith("streaming/base/dataloader.py") and has_c4 == "True"


# A stand-in `streaming` package that records which of its submodules were already loaded.
FAKE_INIT = """
import sys
PRELOADED = sorted(k for k in sys.modules if k.startswith("streaming."))
from streaming._version import __version__
"""


@pytest.mark.parametrize(
    ("version", "stubbed"),
    [
        (
            "0.13.4",
            "streaming.base.dataloader,streaming.multimodal,streaming.text,streaming.vision",
        ),
        ("0.14.0", "streaming.vision"),  # another release is not patched: only torchvision
    ],
)
def test_only_streaming_0_13_is_patched(tmp_path: Path, version: str, stubbed: str) -> None:
    package = tmp_path / "site" / "streaming"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_INIT)
    (package / "_version.py").write_text(f"__version__ = '{version}'\n")
    code = """
import sys
from pretrain.data.streaming_compat import streaming_module

streaming = streaming_module()
print(streaming.__version__, ",".join(streaming.PRELOADED), "transformers" in sys.modules)
"""
    out = run_python(code, tmp_path, pythonpath=tmp_path / "site")
    assert out.split() == [version, stubbed, "False"]


class Columns(UserDict):
    """Like transformers' BatchEncoding: a UserDict, so a Mapping but not a dict."""


@pytest.mark.parametrize(
    ("batch", "size"),
    [
        ({"tokens": torch.zeros(3, 5)}, 3),
        (Columns(input_ids=[[1], [2]], mask=[[1], [1]]), 2),
        (torch.zeros(4, 7), 4),
        ((torch.zeros(6, 2), torch.zeros(6)), 6),
        ([[1, 2, 3, 4, 5]], 5),
    ],
)
def test_batch_size_of_every_batch_shape(batch, size: int) -> None:
    loader = _dataloader_module().StreamingDataLoader([])
    assert loader._get_batch_size(batch) == size


def test_an_empty_mapping_batch_is_an_error() -> None:
    loader = _dataloader_module().StreamingDataLoader([])
    with pytest.raises(ValueError, match="Batch is empty"):
        loader._get_batch_size({})
