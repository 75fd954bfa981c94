"""The one place that imports mosaicml-streaming.

`import streaming` (0.13) always imports `streaming.vision`, which imports torchvision. A
torchvision wheel built for another torch fails to load beside the CPU torch
("operator torchvision::nms does not exist"), and that would take the whole text pipeline
down with it. We never use the vision datasets, so when `streaming.vision` is not loaded
yet we register an empty module under that name before the first import. Everything else
in the package imports streaming through `streaming_module()`.
"""

from __future__ import annotations

import sys
import types


def streaming_module() -> types.ModuleType:
    if "streaming" not in sys.modules and "streaming.vision" not in sys.modules:
        stub = types.ModuleType("streaming.vision")
        stub.__doc__ = "Left empty by pretrain.streaming_compat: torchvision is not needed."
        sys.modules["streaming.vision"] = stub
    import streaming

    return streaming
