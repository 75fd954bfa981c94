"""`import streaming` in a user's own script of the project's venv (issue 26, item 2).

The venv `make setup` builds has no loadable torchvision (none exists for the CPU torch),
and streaming 0.13's `__init__` imports `streaming.vision`, which imports torchvision.
These run a fresh interpreter of the same environment, with none of pretrain imported."""

from __future__ import annotations

import subprocess
import sys

from pretrain.data import streaming_site


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_setup_installed_the_site_hook():
    assert streaming_site.pth_path().read_text() == streaming_site.PTH_LINE, (
        "run `make setup` (or python -m pretrain.data.streaming_site --install)"
    )


def test_user_script_imports_streaming_as_its_docs_show(tmp_path):
    out = tmp_path / "mds"
    r = python(
        "import streaming\n"
        "from streaming import MDSWriter, StreamingDataset\n"
        f"with MDSWriter(out={str(out)!r}, columns={{'x': 'int'}}) as w:\n"
        "    for i in range(5): w.write({'x': i})\n"
        f"ds = StreamingDataset(local={str(out)!r}, batch_size=1)\n"
        "print(sorted(int(s['x']) for s in ds))\n"
        # Without a loadable torchvision, the vision datasets alone are missing, saying why.
        "try:\n"
        "    from streaming.vision import StreamingCIFAR10\n"
        "    print('vision: real')\n"
        "except ImportError as e:\n"
        "    print('vision:', e)\n"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "[0, 1, 2, 3, 4]"
    if streaming_site._torchvision_error() is None:
        assert lines[1] == "vision: real"
    else:
        assert lines[1].startswith("vision: streaming.vision.StreamingCIFAR10 is unavailable")
        assert "torchvision" in lines[1]


def test_hook_imports_nothing_at_start_up():
    r = python(
        "import sys; print(sorted(m for m in ('torch', 'streaming', 'numpy') if m in sys.modules))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
