"""The one place that imports mosaicml-streaming.

`import streaming` (0.13) drags in two heavy dependencies that we never use:

- `streaming.vision` imports torchvision. A torchvision wheel built for another torch fails
  to load beside the CPU torch ("operator torchvision::nms does not exist"), and that would
  take the whole text pipeline down with it.
- `streaming.text` and `streaming.multimodal` import `transformers` (AutoTokenizer), and
  `streaming.base.dataloader` imports it only to name `BatchEncoding`/`BatchFeature` in an
  isinstance check. That is ~2.4 s of a ~3.9 s import, paid by every torchrun rank and CLI
  run.

So before the first import we register an empty module under `streaming.vision`, and, for
streaming 0.13.x only, empty `streaming.text`/`streaming.multimodal` modules and our own
`streaming.base.dataloader`, whose `StreamingDataLoader` behaves like 0.13's (see
`_dataloader_module`). A name that is already loaded is left alone, and `transformers`
itself is never faked: when it is already imported (so costs nothing more), or when
streaming is another version than the one this copy was written against, only the
torchvision stub is used. The stubbed modules then hold nothing: `streaming.text.StreamingC4`
and friends are not available in this process. Everything else in the package imports
streaming through `streaming_module()`.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

PATCHED_VERSION = "0.13."  # the streaming release whose dataloader.py we stand in for


def streaming_module() -> types.ModuleType:
    """The `streaming` package, imported without torchvision (and transformers, on 0.13)."""
    if "streaming" not in sys.modules:
        _stub("streaming.vision", "torchvision is not needed")
        if "transformers" not in sys.modules and _installed_version().startswith(PATCHED_VERSION):
            _stub("streaming.text", "its datasets import transformers, and are not needed")
            _stub("streaming.multimodal", "its datasets import transformers, and are not needed")
            if "streaming.base.dataloader" not in sys.modules:
                sys.modules["streaming.base.dataloader"] = _dataloader_module()
    import streaming

    # A module found in sys.modules is not set as its parent's attribute by the import.
    base, loader = sys.modules.get("streaming.base"), sys.modules.get("streaming.base.dataloader")
    if base is not None and loader is not None and not hasattr(base, "dataloader"):
        base.dataloader = loader
    return streaming


def _stub(name: str, why: str) -> None:
    if name not in sys.modules:
        stub = types.ModuleType(name)
        stub.__doc__ = f"Left empty by pretrain.data.streaming_compat: {why}."
        sys.modules[name] = stub


def _installed_version() -> str:
    """`__version__` of the `streaming` package that `import streaming` would load, or ''.

    Read from its `_version.py` without importing the package, so that it is the very copy
    we would patch (not merely whichever distribution metadata is installed).
    """
    spec = importlib.util.find_spec("streaming")
    if spec is None or not spec.submodule_search_locations:
        return ""
    for folder in spec.submodule_search_locations:
        try:
            text = (Path(folder) / "_version.py").read_text()
        except OSError:
            continue
        found = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE)
        return found.group(1) if found else ""
    return ""


def _dataloader_module() -> types.ModuleType:
    """A stand-in for streaming 0.13's `streaming.base.dataloader`, without transformers.

    Same behaviour as the original: it counts the samples this rank has yielded, turns them
    into the global sample position (times the number of ranks, divided by `replication`)
    for `StreamingDataset.state_dict`, and shuts persistent workers down when collected.
    The only change is batch-size detection: any Mapping counts as a dict of columns, which
    covers transformers' `BatchEncoding` and `BatchFeature` (UserDict subclasses) without
    importing them. Built on first use so that importing this module does not import torch.
    """
    from collections.abc import Iterator, Mapping
    from typing import Any

    from torch import Tensor
    from torch.utils.data import DataLoader

    module = types.ModuleType("streaming.base.dataloader")
    module.__doc__ = "Streaming DataLoader (pretrain.data.streaming_compat's copy of 0.13's)."

    class StreamingDataLoader(DataLoader):
        """A DataLoader that can save and restore its StreamingDataset's position."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.num_samples_yielded = 0

        def _get_batch_size(self, batch: Any) -> int:
            if isinstance(batch, Mapping):
                for value in batch.values():
                    return len(value)
                raise ValueError("Batch is empty")
            if isinstance(batch, Tensor):
                return len(batch)
            return len(batch[0])

        def __iter__(self) -> Iterator[Any]:
            self.num_samples_yielded = 0
            for batch in super().__iter__():
                self.num_samples_yielded += self._get_batch_size(batch)
                yield batch

        def state_dict(self) -> dict[str, Any] | None:
            from streaming.base.dataset import StreamingDataset
            from streaming.base.world import World

            if not isinstance(self.dataset, StreamingDataset):
                return None
            num_samples = self.num_samples_yielded * World.detect().num_ranks
            if self.dataset.replication is not None:
                # `replication` consecutive ranks share sample ids: each pair (say) of ranks
                # has advanced the sample partition by one rank's worth, not two.
                num_samples //= self.dataset.replication
            return self.dataset.state_dict(num_samples, False)

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            from streaming.base.dataset import StreamingDataset

            if isinstance(self.dataset, StreamingDataset):
                self.dataset.load_state_dict(obj)

        def __del__(self) -> None:
            # getattr: __init__ may have failed before DataLoader set `_iterator`.
            if getattr(self, "_iterator", None) is not None:
                self._iterator._shutdown_workers()

    StreamingDataLoader.__module__ = module.__name__
    StreamingDataLoader.__qualname__ = "StreamingDataLoader"
    module.StreamingDataLoader = StreamingDataLoader
    return module
