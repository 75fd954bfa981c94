"""Make `import streaming` work in any script of this environment, as streaming's docs show.

mosaicml-streaming 0.13's `__init__` imports `streaming.vision`, which imports torchvision.
torchvision is not installable beside the CPU torch build we use (PyPI's wheels link
torch's CUDA libraries: "operator torchvision::nms does not exist"), so a user's own
`import streaming` or `from streaming import StreamingDataset` failed in our venv, while
`pretrain` itself worked only through its private shim (`streaming_compat`).

`make setup` writes a `.pth` file into the venv's site-packages (`python -m
pretrain.data.streaming_site --install`) that calls `install()` at interpreter start-up.
`install()` only appends a finder to `sys.meta_path`: it imports nothing, so every Python
start in the venv stays as fast as before. The finder acts on `streaming.vision` alone,
and only when torchvision cannot be imported: it then supplies a module whose attributes
raise an ImportError saying why. Everything else in streaming (StreamingDataset,
MDSWriter, the text datasets, the dataloader) is the real package, untouched; where a
working torchvision exists, the finder steps aside and the real `streaming.vision` loads.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import sysconfig
import types
from pathlib import Path

PACKAGE = "streaming.vision"
PTH_NAME = "pretrain-streaming-vision.pth"
# One line, as site.py runs `import` lines of a .pth: a missing pretrain is no error.
PTH_LINE = (
    "import sys; exec('try:\\n from pretrain.data.streaming_site import install\\n'"
    " ' install()\\nexcept ImportError:\\n pass')\n"
)


def _torchvision_error() -> str | None:
    """Why torchvision cannot be imported here, or None when it can."""
    if "torchvision" in sys.modules:
        return None
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed"
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # a wheel built for another torch fails with RuntimeError
        return f"torchvision does not load beside this torch ({type(e).__name__}: {e})"
    return None


class _Unavailable(types.ModuleType):
    """`streaming.vision` (or a submodule) without torchvision: any name raises."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"{self.__name__}.{name} is unavailable: {self.__dict__['_why']}; streaming's "
            "vision datasets need a torchvision built for this torch (its text datasets, "
            "StreamingDataset and MDSWriter do not)"
        )


class _Loader(importlib.abc.Loader):
    def __init__(self, why: str):
        self.why = why

    def create_module(self, spec):
        module = _Unavailable(spec.name)
        module._why = self.why
        module.__path__ = []  # a package, so its submodules come here too
        module.__all__ = []
        return module

    def exec_module(self, module) -> None:
        pass


class VisionFinder(importlib.abc.MetaPathFinder):
    """Stands in for `streaming.vision` only when torchvision cannot be imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        why = _torchvision_error()
        if why is None:
            return None  # the real streaming.vision loads
        return importlib.machinery.ModuleSpec(fullname, _Loader(why), is_package=True)


def install() -> None:
    """Put the finder first on `sys.meta_path` (once)."""
    if not any(isinstance(f, VisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, VisionFinder())


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str]) -> int:
    if argv != ["--install"]:
        print("usage: python -m pretrain.data.streaming_site --install", file=sys.stderr)
        return 2
    path = pth_path()
    path.write_text(PTH_LINE)
    print(f"wrote {path}: `import streaming` works without torchvision in this environment")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
