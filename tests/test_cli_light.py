"""The commands a user runs to look at things (`pretrain config`, `status`, `sweep-status`,
`--help`) start in a fraction of a second: they import no torch (2.5 s of CPU, 8 s on a
loaded machine), nor numpy, streaming, DeepSpeed or boto3 (issue 26)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers.runs import REPO

HEAVY = ("torch", "numpy", "streaming", "deepspeed", "boto3", "sentencepiece", "tqdm")

# One fresh interpreter runs the commands as the CLI does, on a run directory made of what
# training leaves (a config, metrics, a complete checkpoint) and a sweep of that run, then
# says which heavy packages got imported.
PROBE = """
import contextlib, io, json, sys
from pathlib import Path
from pretrain.__main__ import main

def run(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0, argv
    return out.getvalue()

root = Path(sys.argv[1])
run_dir, ckpt = root / "sweep" / "00_a", root / "sweep" / "00_a" / "checkpoints" / "step_00000010"
ckpt.mkdir(parents=True)
(ckpt / "manifest.json").write_text(json.dumps({"files": {}}))
(run_dir / "config.yaml").write_text(run("config", "configs/tiny.yaml", "train.max_steps=30"))
(run_dir / "metrics.jsonl").write_text('{"event": "start"}\\n{"step": 10, "loss": 3.5}\\n')
(root / "sweep" / "sweep.json").write_text(json.dumps(
    {"runs": [{"name": "00_a", "values": {"optim.lr": "1e-3"}}]}))
outputs = [run("--help"), run("status", str(run_dir)), run("sweep-status", str(root / "sweep"))]
print(json.dumps({"outputs": outputs, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def test_config_status_and_sweep_status_import_no_torch(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    help_text, status, sweep_status = result["outputs"]
    assert "status RUN_DIR" in help_text
    assert "step        10 / 30" in status and "checkpoint  step_00000010" in status, status
    assert "00_a  1e-3" in sweep_status and "10/30" in sweep_status, sweep_status
    assert result["heavy"] == []
